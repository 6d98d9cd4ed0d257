"""hv compare and the cycle cost model: the arithmetic, the CPU profiles,
the directions the published record gives, and the command line."""
from __future__ import annotations

import json
import re

import pytest

from hv import api, cli, compare
from hv.api import Counters
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


def test_an_agile_switch_is_priced_as_a_shadow_page_built(profile):
    base = cycles(profile, "agile", FIGURES)["exits"]
    moved = cycles(profile, "agile", {**FIGURES, "agile.to_nested": 2, "agile.to_shadow": 1})
    assert moved["exits"] == base + 3 * 7000


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


def test_every_counter_the_suite_counts_reads_zero_when_never_counted(suite):
    names = {k for c in suite["cases"] for r in c["runs"].values() for k in r["figures"]
             if not k.startswith(("exit.", "tlb."))}
    assert {"pf_fixed", "mmu_pte_write", "pages_4k", "pages_2m"} <= names
    assert names <= Counters.known


def test_the_suite_runs_clean(suite):
    assert [c["label"] for c in suite["cases"]] == [c.label for c in compare.SUITE]
    for c in suite["cases"]:
        assert c["same_output"], c["label"]
        assert all(r["ok"] for r in c["runs"].values()), c["label"]
    assert compare.all_ok(suite)


@pytest.mark.parametrize("label", ["ptemod", "forkwait", "pgfault", "ctxswitch (no PCID)",
                                   "ctxswitch (PCID)"])
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
    both_large = _case(suite, "hugepages (host large pages)")["runs"]["ept"]
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
    assert "pgfault: marks 1 to 2" in out and "overhead vs native" in out
    assert "VMCALL (not priced)" in out          # the vmcall of mark 2
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
    (["compare", "ptemod", "--between", "2,1", "--mmu", "native"],
     "recorded mark 1 before mark 2: a window runs from the earlier mark to the later"),
    (["compare", "ptemod", "--between", "2,2"], "two different mark ids"),
    (["compare", "--between", "1,2"], "--between applies to the guests named"),
    (["compare", "hello", "--profile", "prescott-2006", "--mmu", "ept"],
     "profile prescott-2006 (Intel Pentium 4 672 (Prescott 2M, 3.8 GHz)) has no EPT"),
    (["compare", "hello", "--mmu", "native", "--plot", "x.pdf"], ".png or .svg"),
    (["compare", "--vcpus", "0"], "must be positive"),
])
def test_cli_bad_input(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hv: error: ") and message in err
    assert "Traceback" not in err


# -- when things differ --------------------------------------------------------------

# Rewrites a page-directory entry of the boot tables with its own value, then
# prints the time-stamp counter and exits with its low bit. The TSC counts
# the modelled cycles the guest ran (hv.cost.CycleClock): the 2-D walks
# under ept and the exits under shadow paging make line 2 differ by mode.
TSC_GUEST = """
    jmp main
.include "serial.s"
.include "hv.s"
main:
    mov rbx, 1
    call hv_mark
    lea rsi, [rip + same]
    call puts
    mov rax, qword ptr [0x4000 + 8 * 100]
    mov qword ptr [0x4000 + 8 * 100], rax
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rdx, rax
    lea rsi, [rip + fmt]
    call putf
    mov rbx, 2
    call hv_mark
    mov rax, rdx
    and al, 1
    out 0xf4, al
same: .asciz "same\\n"
fmt: .asciz "tsc %d\\n"
"""

# Marks 1 and 2, then exit code 3: the guest's own failure, in every mode.
EXIT3_GUEST = """
    jmp main
.include "hv.s"
main:
    mov rbx, 1
    call hv_mark
    mov rcx, 100
spin:
    dec rcx
    jnz spin
    mov rbx, 2
    call hv_mark
    mov al, 3
    out 0xf4, al
"""


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    d = tmp_path_factory.mktemp("guests")
    (d / "tsc.s").write_text(TSC_GUEST)
    (d / "exit3.s").write_text(EXIT3_GUEST)
    return d


def test_a_guest_that_fails_everywhere_keeps_its_figures(guests, capsys):
    doc = compare.compare([compare.Case(str(guests / "exit3.s"), window=(1, 2))],
                          compare.COUNTING_MODES, load_profile(DEFAULT_PROFILE))
    (case,) = doc["cases"]
    assert case["same_output"] and case["console_diff"] is None
    assert not compare.all_ok(doc)
    for mode, run in case["runs"].items():
        assert (run["ok"], run["exit_code"]) == (False, 3), mode
        # the window: the loop and the vmcall of mark 2
        assert run["figures"]["insns"] >= 200 and run["figures"]["exit.VMCALL"] == 1, mode
        assert run["cycles"]["total"] > 0 and run["overhead_pct"] is not None, mode
    from hv.report import print_compare
    from rich.console import Console
    print_compare(doc, Console(width=200))
    out = capsys.readouterr().out
    assert out.count("exit code 3") == 2 * len(compare.COUNTING_MODES)  # case and summary
    assert "Mcycles total" in out and "ended before" not in out


def test_a_guest_whose_output_differs_shows_where(guests, capsys):
    assert cli.main(["compare", str(guests / "tsc.s"), "--mmu", "native,shadow,ept",
                     "--json"]) == 1
    (case,) = json.loads(capsys.readouterr().out)["cases"]
    assert not case["same_output"]
    diff = case["console_diff"]
    assert diff["line"] == 2
    tsc = {m: int(re.fullmatch(r"tsc (\d+)\n", text).group(1))
           for m, text in diff["text"].items()}
    assert tsc["native"] < tsc["ept"] < tsc["shadow"]
    runs = case["runs"]
    assert {m: r["exit_code"] for m, r in runs.items()} == {m: n & 1 for m, n in tsc.items()}
    assert all(r["figures"]["insns"] > 0 and r["cycles"] for r in runs.values())

    assert cli.main(["compare", str(guests / "tsc.s"), "--mmu", "native,shadow"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"ended +│ +exit code \d +│ +exit code \d", out)
    assert "console line 2 differs:" in out
    for mode in ("native", "shadow"):
        assert f'{mode:6}  "tsc {tsc[mode]}\\n"' in out


def test_a_run_that_ends_before_its_window(guests, capsys, tmp_path):
    png = tmp_path / "w.png"
    assert cli.main(["compare", str(guests / "exit3.s"), "--mmu", "native,shadow",
                     "--between", "1,5", "--plot", str(png)]) == 1
    out = capsys.readouterr().out
    assert "native, shadow: ended before recording marks 1 and 5" in out
    assert png.exists()
    assert cli.main(["compare", str(guests / "exit3.s"), "--mmu", "native",
                     "--between", "1,5", "--json"]) == 1
    run = json.loads(capsys.readouterr().out)["cases"][0]["runs"]["native"]
    assert run["figures"] is None and run["cycles"] is None and run["overhead_pct"] is None


def test_windows_of_the_same_runs_run_once(monkeypatch):
    """The suite prices phases over four windows of one run per mode."""
    calls = []
    real = compare.api.run
    monkeypatch.setattr(compare.api, "run", lambda g, **kw: calls.append(g) or real(g, **kw))
    phases = [c for c in compare.SUITE if c.guest == "phases"]
    doc = compare.compare(phases, ("native", "ept"), load_profile(DEFAULT_PROFILE))
    assert calls == ["phases", "phases"]
    assert [c["window"] for c in doc["cases"]] == [(1, 4), (1, 2), (2, 3), (3, 4)]
    whole, *parts = (c["runs"]["ept"]["figures"]["tlb.walk_refs"] for c in doc["cases"])
    assert whole == sum(parts)
    assert compare.SUITE_WINDOWS["phases"] == (1, 4)


def test_a_sample_guest_named_is_measured_over_its_suite_window(tmp_path, monkeypatch):
    windows = {c.guest: c.window for c in compare.SUITE}
    own = tmp_path / "mine.s"
    own.write_text(EXIT3_GUEST)
    got = compare.cases(["ptemod", "forkwait", "tlbstress", str(own)], [1, 2], {})
    assert [(c.guest, c.options["vcpus"], c.window) for c in got] == [
        (g, n, windows.get(g)) for g in ("ptemod", "forkwait", "tlbstress", str(own))
        for n in (1, 2)]
    assert windows["forkwait"] == (1, 3) and windows["tlbstress"] == (2, 3)
    # --between says otherwise, for every guest named
    assert {c.window for c in compare.cases(["forkwait", str(own)], [1], {}, (1, 2))} == {(1, 2)}
    # a file of a sample's name is that file, as for hv.run: the whole run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ptemod").write_bytes(b"\xf4")
    assert compare.cases(["ptemod"], [1], {})[0].window is None
    with pytest.raises(HvError, match="--between applies to the guests named"):
        compare.cases([], [1], {}, (1, 2))


def test_the_readme_example_measures_the_samples_windows(capsys):
    assert cli.main(["compare", "ptemod", "forkwait", "--mmu", "shadow,ept", "--json"]) == 0
    cases = json.loads(capsys.readouterr().out)["cases"]
    assert [(c["guest"], c["window"]) for c in cases] == [("ptemod", [1, 2]), ("forkwait", [1, 3])]
    # ptemod's window: 2,000 PTE updates, each an INVLPG exit under shadow paging
    assert cases[0]["runs"]["shadow"]["figures"]["exit.INVLPG"] == 2000


# -- the plot ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hello_doc():
    return compare.compare([compare.Case("hello"), compare.Case("hello", {"vcpus": 2})],
                           compare.COUNTING_MODES, load_profile(DEFAULT_PROFILE))


def _plotted(monkeypatch, doc, path):
    """compare.plot(doc, path) -> (the figure's box, its title's, its
    legends', its title's text), as saved."""
    from matplotlib.figure import Figure
    saved, savefig = [], Figure.savefig

    def save(fig, *args, **kw):
        savefig(fig, *args, **kw)
        renderer = fig.canvas.get_renderer()
        saved.append((fig.bbox, fig._suptitle.get_window_extent(renderer),
                      [lg.get_window_extent(renderer) for lg in fig.legends],
                      fig._suptitle.get_text()))

    monkeypatch.setattr(Figure, "savefig", save)
    compare.plot(doc, str(path))
    (figure,) = saved
    return figure


@pytest.mark.parametrize("n", [1, 2])
def test_the_plot_of_one_or_two_guests_shows_its_title_and_legend(n, hello_doc, monkeypatch,
                                                                  tmp_path):
    doc = dict(hello_doc, cases=hello_doc["cases"][:n])
    inside, title_box, legends, title = _plotted(monkeypatch, doc, tmp_path / "p.png")
    assert legends
    for box in (title_box, *legends):
        assert (inside.x0 <= box.x0 and box.x1 <= inside.x1
                and inside.y0 <= box.y0 and box.y1 <= inside.y1), box
    assert doc["profile"]["cpu"] in title and doc["profile"]["name"] in title
    # panels with their own y-scales say so
    assert ("each panel has its own scale" in title) == (n > 1)


def test_no_plot_when_no_case_finished(monkeypatch, tmp_path, capsys):
    """Ctrl-C during the first case: the comparison ends with no case."""
    def interrupted(guest, mmu, **options):
        return api.Result(guest=guest, mmu=mmu, exit_code=None, reason="interrupted",
                          detail="by Ctrl-C", console="", exits={}, counters={},
                          tlb={})

    monkeypatch.setattr(api, "run", interrupted)
    png = tmp_path / "x.png"
    assert cli.main(["compare", "hello", "--plot", str(png)]) == 130
    err = capsys.readouterr().err
    assert f"no case finished: no plot written to {png}" in err
    assert not png.exists()
    with pytest.raises(HvError, match="no case finished"):
        compare.plot(dict(profile={}, modes=["native"], cases=[]), str(png))


@pytest.mark.parametrize("name", [n for n in bundled_profiles()
                                  if load_profile(n).ept and load_profile(n).vpid])
def test_agile_is_within_5_percent_of_the_better_of_shadow_and_ept(suite, name):
    """Under every bundled profile with EPT (all with VPID: the suite's
    runs, priced again), on every sample."""
    profile = load_profile(name)
    for case in suite["cases"]:
        total = {m: cycles(profile, m, r["figures"])["total"] for m, r in case["runs"].items()}
        assert total["agile"] <= 1.05 * min(total["shadow"], total["ept"]), (case["label"], total)


def test_agile_beats_both_on_phases_where_they_mix(suite):
    for label in ("phases (all phases)", "phases (A: churn and reads)"):
        total = {m: r["cycles"]["total"] for m, r in _case(suite, label)["runs"].items()}
        assert total["agile"] < min(total["shadow"], total["ept"]), (label, total)
    # alone, each phase is about the better mode's: shadow's reads, ept's churn
    walks = _case(suite, "phases (B: reads)")["runs"]
    assert walks["agile"]["figures"]["tlb.walk_refs"] == walks["shadow"]["figures"]["tlb.walk_refs"]
    churn = _case(suite, "phases (C: churn)")["runs"]
    assert priced_exits(churn["agile"]["figures"]) == 0 < priced_exits(churn["shadow"]["figures"])
