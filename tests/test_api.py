"""The Python API's results: counts that read 0, Python's types (JSON's
only in to_json), a window of a run shaped like the run, and one name for
each option in Config, hv.run and the CLI."""
import inspect
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

import hv
from hv import cli
from hv.api import Counters, Window
from hv.memory import parse_size
from hv.stats import TLB_NAMES
from hv.vmm.vm import Config

from conftest import run_src

# CR3 loaded 10 times between marks 1 and 2: 10 CR_ACCESS exits under
# shadow paging, none in the other modes.
CR3_LOOP = """
    xor eax, eax
    mov ebx, 1
    vmcall
    mov rcx, 10
reload:
    mov rax, cr3
    mov cr3, rax
    dec rcx
    jnz reload
    xor eax, eax
    mov ebx, 2
    vmcall
    mov al, 0
    mov dx, 0xf4
    out dx, al
"""


@pytest.fixture(scope="module")
def shadow():
    return run_src(CR3_LOOP, "shadow")


@pytest.fixture(scope="module")
def native():
    return run_src(CR3_LOOP, "native")


def test_counts_never_counted_read_zero(native):
    assert "CR_ACCESS" not in native.exits and native.exits["CR_ACCESS"] == 0
    assert "pf_fixed" not in native.counters and native.counters["pf_fixed"] == 0
    w = native.between(1, 2)
    assert w.exits["INVLPG"] == 0 and w.counters["pf_guest"] == 0
    # reading a count adds nothing: the JSON is the same
    assert "CR_ACCESS" not in native.to_json()["exits"]
    assert "pf_fixed" not in json.loads(json.dumps(native.to_json()))["counters"]


def test_unknown_names_are_still_key_errors(native):
    with pytest.raises(KeyError, match="no exit reason 'INVLPGG'"):
        native.exits["INVLPGG"]
    with pytest.raises(KeyError, match="no counter 'pf_fxed'"):
        native.between(1, 2).counters["pf_fxed"]


def test_every_counter_hv_counts_is_known():
    """Each counter name the code increments literally is in the list
    (stats.OTHER_COUNTERS) that makes it read 0 when never counted."""
    names = set()
    for path in (Path(hv.__file__).parent).rglob("*.py"):
        names |= set(re.findall(r'\[\s*"([\w.]+)"\s*\]\s*[+-]=', path.read_text()))
    assert len(names) > 20
    known = Counters.known | {f"tlb.{n}" for n in TLB_NAMES}
    assert names - known == set()


def test_walk_lengths_are_ints_in_python_strings_in_json():
    r = hv.run("hello", vms=2, vcpus=2)
    hists = [r.tlb["walk_refs_hist"]] + [vm["tlb"]["walk_refs_hist"] for vm in r.vms] + [
        cpu["tlb"]["walk_refs_hist"] for vm in r.vms for cpu in vm["vcpus"]]
    assert all(h and all(type(k) is int for k in h) for h in hists)
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["tlb"]["walk_refs_hist"] == {str(k): n for k, n in r.tlb["walk_refs_hist"].items()}
    vm = doc["vms"][1]
    assert vm["tlb"]["walk_refs_hist"] == {str(k): n for k, n in
                                           r.vms[1]["tlb"]["walk_refs_hist"].items()}
    assert vm["vcpus"][1]["tlb"]["walk_refs_hist"] == {
        str(k): n for k, n in r.vms[1]["vcpus"][1]["tlb"]["walk_refs_hist"].items()}
    assert list(vm["marks"]) == [str(m) for m in r.vms[1]["marks"]]


def test_a_window_has_the_shape_of_a_result(shadow):
    def cr3_exits(f):                   # the same code reads a run and a window
        return f.exits["CR_ACCESS"], f.counters["cr3_loads"], f.tlb["walks"] >= 0

    w = shadow.between(1, 2)
    assert isinstance(w, Window) and (w.start, w.end) == (1, 2)
    assert cr3_exits(w) == (10, 10, True)
    assert cr3_exits(shadow) == (10, 10, True)
    assert w.exits == {"CR_ACCESS": 10, "VMCALL": 1}        # the ones that occurred
    # the counts are the marks' differences
    a, b = shadow.marks[1], shadow.marks[2]
    assert w.flat() == {k: b.get(k, 0) - a.get(k, 0) for k in a.keys() | b.keys()
                        if not (k.startswith("exit.") and b.get(k, 0) == a.get(k, 0))}
    assert w.tlb == {n: b[f"tlb.{n}"] - a[f"tlb.{n}"] for n in TLB_NAMES}
    assert w.counters["insns"] == b["insns"] - a["insns"] > 0


def test_a_window_still_reads_flat_names(shadow):
    """between() returned one flat dict: its names still read."""
    w = shadow.between(1, 2)
    assert (w["exit.CR_ACCESS"], w["cr3_loads"], w["tlb.walks"]) == (10, 10, w.tlb["walks"])
    assert w["exit.INVLPG"] == 0
    with pytest.raises(TypeError):      # not a dict: no silent False for a count of 0
        "cr3_loads" in w


def test_assert_exits_reads_a_run_and_a_window(shadow):
    from hv.pytest_plugin import ExitTable
    assert ExitTable.of(shadow.between(1, 2)) == {"CR_ACCESS": 10, "VMCALL": 1}
    assert ExitTable.of(shadow) == ExitTable.of(shadow.exits) == dict(shadow.exits)


def test_a_window_runs_forwards(shadow):
    with pytest.raises(hv.HvError, match=r"recorded mark 1 before mark 2: a window runs from "):
        shadow.between(2, 1)
    with pytest.raises(hv.HvError, match=r"test \(shadow\) recorded no mark 3 \(its marks: 1, 2\)"):
        shadow.between(1, 3)


# -- one name for each option ---------------------------------------------------------

OPTIONS = [f for f in fields(Config) if f.name != "mmu"]


def test_hv_run_takes_every_option_by_name():
    params = inspect.signature(hv.run).parameters
    doc = inspect.getdoc(hv.run)
    for f in OPTIONS:
        p = params[f.name]
        assert p.kind is p.KEYWORD_ONLY
        assert (parse_size(p.default) if f.name == "ram" else p.default) == f.default, f.name
        assert re.search(rf"\b{f.name}\b", doc), f"help(hv.run) omits {f.name}"
    assert params["mmu"].default == Config.mmu


def test_the_cli_names_each_option_as_python_does():
    """--tlb-entries is tlb_entries; an option on by default is turned off by
    --no-<name>. Each of run's options sets the field of its name, and its
    default is Config's."""
    run = next(a for a in cli._parser()._actions if a.dest == "command").choices["run"]
    actions = {a.dest: a for a in run._actions}
    # (trace, an object, is built from --trace and its options: test_trace.py)
    for f in (f for f in OPTIONS if f.name != "trace"):
        flag = ("--no-" if f.default is True else "--") + f.name.replace("_", "-")
        assert flag in actions[f.name].option_strings, f.name
        default = actions[f.name].default
        assert (parse_size(default) if f.name == "ram" else default) == f.default, f.name


def test_check_invariants_from_the_cli(capsys):
    assert cli.main(["run", "hello", "--check-invariants", "--no-memo", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["check_invariants"] is True and config["memo"] is False
