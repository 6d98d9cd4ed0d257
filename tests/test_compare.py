"""hv compare and the cycle cost model: the arithmetic, the CPU profiles,
the directions the published record gives, and the command line."""
from __future__ import annotations

import json
import re

import pytest

from hv import cli, compare
from hv.cost import (CYCLE_KEYS, DEFAULT_PROFILE, bundled_profiles, cycles, load_profile,
                     priced_exits)
from hv.errors import HvError

PROFILE_TEXT = """
name = "t"
cpu = "Test CPU"
year = 2020
ept = true
vpid = true
[cycles]
cpi = 1.5
walk_ref = 10
pwc_hit = 2
exit = 1000
handler = 500
pte_write = 3000
shadow_page = 7000
"""


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(PROFILE_TEXT)
    return load_profile(path)


# -- the model -----------------------------------------------------------------------

FIGURES = {"insns": 1000, "insn_emulation": 10, "tlb.walk_refs": 400, "pwc.hits": 5,
           "pwc.ntlb_hits": 3, "exit.EXCEPTION_NMI": 20, "exit.INVLPG": 4,
           "exit.IO_INSTRUCTION": 50, "exit.VMCALL": 2, "exit.HLT": 1,
           "mmu_pte_write": 6, "mmu_cache_miss": 2, "vmm.guest_walk_refs": 30,
           "remote_tlb_flush": 3}


def test_cycles_add_up_by_part(profile):
    c = cycles(profile, "shadow", FIGURES)
    assert c["guest"] == (1000 - 10) * 1.5
    assert c["walks"] == 400 * 10 + (5 + 3) * 2
    # 24 priced exits; console IO, the mark and HLT are not priced
    assert priced_exits(FIGURES) == 24
    # each remote TLB flush kicks a vCPU: one more exit
    assert c["exits"] == (24 + 3) * (1000 + 500) + 6 * 3000 + 2 * 7000 + 30 * 10
    assert c["total"] == c["guest"] + c["walks"] + c["exits"]


def test_native_has_no_vm_exits(profile):
    c = cycles(profile, "native", FIGURES)
    assert c["exits"] == 0
    assert c["total"] == c["guest"] + c["walks"]


# -- profiles ------------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("cpi = 1.5\n", ""), "cycles.cpi is missing"),
    (lambda t: t.replace("exit = 1000", "exit = -1"), "cycles.exit must be a number >= 0"),
    (lambda t: t.replace("exit = 1000", 'exit = "fast"'), "cycles.exit must be a number"),
    (lambda t: t + "tlb_miss = 3\n", "unknown key cycles.tlb_miss"),
    (lambda t: t.replace('year = 2020', 'year = "x"'), "year must be int"),
    (lambda t: t.replace("[cycles]", "[cycle]"), "no [cycles] table"),
    (lambda t: t.replace('name = "t"', 'name = t"'), "t.toml: "),
])
def test_bad_profiles_are_named(tmp_path, edit, message):
    path = tmp_path / "t.toml"
    path.write_text(edit(PROFILE_TEXT))
    with pytest.raises(HvError, match=re.escape(message)) as e:
        load_profile(path)
    assert str(path) in str(e.value)


def test_unknown_profile():
    with pytest.raises(HvError, match="no profile 'pentium-pro'.*bundled profile"):
        load_profile("pentium-pro")


BUNDLED = sorted(bundled_profiles())


def test_the_bundled_profiles():
    """At least a first-generation VT-x part (no EPT, no VPID), a part with
    EPT and VPID, and a recent one; the default is one of them."""
    profiles = [load_profile(p) for p in BUNDLED]
    assert DEFAULT_PROFILE in BUNDLED
    assert any(not p.ept and not p.vpid and p.year <= 2006 for p in profiles)
    assert any(p.ept and p.vpid and p.year <= 2010 for p in profiles)
    assert any(p.ept and p.vpid and p.year >= 2015 for p in profiles)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_number_cites_its_source(name):
    """Each [cycles] number is followed by a comment (its source, or a
    plainly marked assumption), and the profile's name is its file's."""
    path = bundled_profiles()[name]
    assert load_profile(path).name == name
    lines = path.read_text().splitlines()
    section = None
    seen = set()
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip()
        key = line.split("=")[0].strip()
        if section == "[cycles]" and key in CYCLE_KEYS:
            comment = line.split("#", 1)[1].strip() if "#" in line else ""
            # a comment on the line, or on the lines right above it
            j = i - 1
            while not comment and j >= 0 and lines[j].lstrip().startswith("#"):
                comment = lines[j]
                j -= 1
            assert len(comment) > 15, f"{path}:{i + 1}: {key} has no source"
            seen.add(key)
    assert seen == set(CYCLE_KEYS)


# -- the directions of the published record, in hv's numbers -------------------------

@pytest.fixture(scope="module")
def suite():
    """The whole sample suite in every mode, priced with the default profile."""
    return compare.compare(compare.cases([], [1], {}), compare.COUNTING_MODES,
                           load_profile(DEFAULT_PROFILE))


def _case(doc, label):
    return next(c for c in doc["cases"] if c["label"] == label)


def test_the_suite_runs_clean(suite):
    assert [c["label"] for c in suite["cases"]] == [c.label for c in compare.SUITE]
    for c in suite["cases"]:
        assert c["same_output"], c["label"]
        assert all(r["ok"] for r in c["runs"].values()), c["label"]
    assert compare.all_ok(suite)


@pytest.mark.parametrize("label", ["ptemod", "forkwait", "pgfault", "ctxswitch"])
def test_shadow_loses_through_exits(suite, label):
    runs = _case(suite, label)["runs"]
    shadow, ept = runs["shadow"], runs["ept"]
    assert priced_exits(shadow["figures"]) > 2 * priced_exits(ept["figures"])
    assert shadow["cycles"]["exits"] > ept["cycles"]["exits"]
    assert shadow["cycles"]["total"] > ept["cycles"]["total"] > runs["native"]["cycles"]["total"]


def test_ept_loses_on_tlbstress_through_walks(suite):
    runs = _case(suite, "tlbstress")["runs"]
    f = {m: r["figures"] for m, r in runs.items()}
    # the same misses in every mode; 4 references a walk on shadow tables, 24 on EPT
    assert f["native"]["tlb.misses"] == pytest.approx(f["ept"]["tlb.misses"], rel=0.01)
    assert f["shadow"]["tlb.walk_refs"] / f["shadow"]["tlb.walks"] == pytest.approx(4, abs=0.1)
    assert f["ept"]["tlb.walk_refs"] / f["ept"]["tlb.walks"] == pytest.approx(24, abs=0.5)
    assert priced_exits(f["shadow"]) == priced_exits(f["ept"]) == 0
    assert runs["ept"]["cycles"]["total"] > runs["shadow"]["cycles"]["total"]
    assert runs["ept"]["overhead_pct"] > 100


def test_large_pages_narrow_epts_gap(suite):
    small = _case(suite, "tlbstress")["runs"]["ept"]["overhead_pct"]
    guest_large = _case(suite, "hugepages")["runs"]["ept"]["overhead_pct"]
    both_large = _case(suite, "hugepages (EPT large pages)")["runs"]["ept"]
    assert both_large["overhead_pct"] < guest_large
    assert both_large["overhead_pct"] < small
    assert both_large["figures"]["tlb.misses"] == 0


def test_compute_costs_about_the_same_everywhere(suite):
    for mode, run in _case(suite, "compute")["runs"].items():
        assert abs(run["overhead_pct"]) < 1, mode


def test_smp_makes_shadow_worse_as_vcpus_grow(suite):
    labels = ["smp", "smp (2 vCPUs)", "smp (4 vCPUs)"]
    exits = [priced_exits(_case(suite, lb)["runs"]["shadow"]["figures"]) for lb in labels]
    assert exits[0] < exits[1] < exits[2]
    shadow = [_case(suite, lb)["runs"]["shadow"]["cycles"]["exits"] for lb in labels]
    ept = [_case(suite, lb)["runs"]["ept"]["cycles"]["exits"] for lb in labels]
    assert all(s > e for s, e in zip(shadow, ept))
    assert shadow[2] - shadow[0] > ept[2] - ept[0]


def test_without_vpid_virtualized_runs_flush(tmp_path):
    """A part without VPID runs shadow with asid=False, and has no ept."""
    path = tmp_path / "old.toml"
    path.write_text(PROFILE_TEXT.replace("ept = true", "ept = false")
                    .replace("vpid = true", "vpid = false"))
    old = load_profile(path)
    doc = compare.compare([compare.Case("ptemod", window=(1, 2))], compare.COUNTING_MODES, old)
    assert doc["modes"] == ["native", "shadow"]
    assert any("no EPT" in n for n in doc["notes"])
    new = compare.compare([compare.Case("ptemod", window=(1, 2))], ("native", "shadow"),
                          load_profile(DEFAULT_PROFILE))
    flushed, tagged = (d["cases"][0]["runs"]["shadow"]["figures"] for d in (doc, new))
    assert flushed["tlb.misses"] > tagged["tlb.misses"]


# -- the command line ----------------------------------------------------------------

def test_cli_json(capsys):
    assert cli.main(["compare", "ptemod", "--mmu", "native,shadow", "--between", "1,2",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["modes"] == ["native", "shadow"]
    assert doc["profile"]["name"] == DEFAULT_PROFILE
    (case,) = doc["cases"]
    assert case["window"] == [1, 2] and case["same_output"]
    shadow = case["runs"]["shadow"]
    assert shadow["figures"]["exit.INVLPG"] == 2000
    assert shadow["figures"]["mmu_pte_write"] == 2000
    assert shadow["overhead_pct"] > 0 and case["runs"]["native"]["overhead_pct"] == 0


def test_cli_table_and_plot(tmp_path, capsys):
    png, svg = tmp_path / "c.png", tmp_path / "c.svg"
    assert cli.main(["compare", "pgfault", "--vcpus", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "pgfault: the whole run" in out and "overhead vs native" in out
    assert "IO_INSTRUCTION (not priced)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["compare", "smp", "--vcpus", "1,2", "--mmu", "shadow,ept",
                     "--quantum", "100", "--plot", str(svg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["label"] for c in doc["cases"]] == ["smp", "smp (2 vCPUs)"]
    assert all(c["runs"]["shadow"]["overhead_pct"] is None for c in doc["cases"])
    assert svg.read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("argv, message", [
    (["compare", "--mmu", "native,qemu"], "qemu is the oracle"),
    (["compare", "--mmu", "native,native"], "distinct modes"),
    (["compare", "--profile", "pentium-pro"], "no profile 'pentium-pro'"),
    (["compare", "nosuchguest"], "no guest 'nosuchguest'"),
    (["compare", "hello", "--between", "1"], "two mark ids"),
    (["compare", "hello", "--between", "1,2", "--mmu", "native"], "recorded no mark 1"),
    (["compare", "hello", "--mmu", "native", "--plot", "x.pdf"], ".png or .svg"),
    (["compare", "--vcpus", "0"], "must be positive"),
])
def test_cli_bad_input(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hv: error: ") and message in err
    assert "Traceback" not in err
