"""Agile paging (hv.vmm.agile): the walk's arithmetic at every switch
level, what a nested table no longer costs, and the degenerate policies,
which must be exactly the `shadow` and `ept` modes."""
import re

import pytest

import hv
from hv import compare
from hv.api import make_result
from hv.vmm import agile
from hv.vmm.agile import AgilePolicy
from hv.vmm.vm import VM, Config

from conftest import image

WRITES = AgilePolicy.SWITCH_WRITES      # emulated writes that move a table to nested
EXIT = "xor eax, eax\nmov dx, 0xf4\nout dx, al\n"


def mark(n: int) -> str:
    return f"xor eax, eax\nmov ebx, {n}\nvmcall\n"


# Its own 4 tables for 16 pages of 4 KiB at VA 0x8000000000 (PML4 entry 1):
# PML4 0x700000 (entry 0 the boot PML4's, for the identity map of the
# code), PDPT 0x701000, PD 0x702000, PT 0x703000, built before the guest
# loads that CR3 (so before any is shadowed). The pages are touched once,
# so that the shadow path and EPT are warm. Then the guest writes an unused
# entry of the table at `table` WRITES + 1 times (the first WRITES take a
# write-protection exit each, and the last of them moves the table to
# nested; the next costs none), INVLPGs every page, and marks 2-3 bracket one read of every page: 16
# TLB misses, each a walk that reads the shadow entries above `table` and
# the guest's tables from `table` down, in two dimensions.
PML4, PT, VA = 0x700000, 0x703000, 0x8000000000


def switch_at(table: int) -> str:
    return f"""
    mov rax, qword ptr [0x2000]
    mov qword ptr [{PML4:#x}], rax
    mov qword ptr [{PML4:#x} + 8], {PML4 + 0x1003:#x}
    mov qword ptr [{PML4 + 0x1000:#x}], {PML4 + 0x2003:#x}
    mov qword ptr [{PML4 + 0x2000:#x}], {PT | 3:#x}
    mov rbx, {PT:#x}
    mov rax, 0x600003
    mov rcx, 16
map:
    mov qword ptr [rbx], rax
    add rbx, 8
    add rax, 0x1000
    loop map
    mov rax, {PML4:#x}
    mov cr3, rax
    mov r12, {VA:#x}
    mov rcx, 16
first:
    mov rdx, rcx
    shl rdx, 12
    mov rax, qword ptr [r12 + rdx - 0x1000]
    loop first
""" + mark(1) + f"""
    xor eax, eax
    mov rcx, {WRITES + 1}
rewrite:
    mov qword ptr [{table:#x} + 0xff8], rax
    loop rewrite
    mov rcx, 16
flush:
    mov rdx, rcx
    shl rdx, 12
    invlpg [r12 + rdx - 0x1000]
    loop flush
""" + mark(2) + """
    mov rcx, 16
second:
    mov rdx, rcx
    shl rdx, 12
    mov rax, qword ptr [r12 + rdx - 0x1000]
    loop second
""" + mark(3) + EXIT


# table -> (shadow references, guest references, EPT references) of one walk:
# s shadow entries, then g guest entries nested (each guest-physical
# address through 4 EPT entries), then the 4 EPT entries of the final
# guest-physical address: s + g + 4 * (g + 1), from 3 + 1 + 8 = 12 to 24.
SWITCHES = {PT: (3, 1, 8), PML4 + 0x2000: (2, 2, 12), PML4 + 0x1000: (1, 3, 16),
            PML4: (0, 4, 20)}


def agile_run(src: str, **kw) -> hv.Result:
    """Started shadowed (rent=0), unless `agile_policy` says otherwise: the
    tables go nested by the writes these tests make."""
    kw.setdefault("agile_policy", "dynamic:rent=0")
    vm = VM(image(src), Config(mmu="agile", check_invariants=True, **kw))
    vm.run()
    vm.mmu.check()
    return make_result("test", vm)


@pytest.mark.parametrize("memo", [True, False], ids=["memo", "no-memo"])
@pytest.mark.parametrize("table", SWITCHES, ids=["PT", "PD", "PDPT", "PML4"])
def test_a_walk_reads_shadow_entries_down_to_the_switch_then_two_dimensions(table, memo):
    r = agile_run(switch_at(table), memo=memo)
    shadow, guest, ept = SWITCHES[table]
    switched = r.between(1, 2)
    # One write-protection exit moved the table to nested; the second
    # write took none.
    assert switched["agile.to_nested"] == 1 and switched["mmu_pte_write"] == WRITES
    d = r.between(2, 3)
    assert d["tlb.misses"] == 16 and d.exits.get("EPT_VIOLATION", 0) == 0
    assert d["tlb.walk_refs"] == 16 * (shadow + guest + ept)
    assert r.tlb["walk_refs_hist"][shadow + guest + ept] >= 16
    # Below a switch in PML4 entry 1 the hardware read the guest's tables
    # (and EPT) only in those walks; from a nested root, in every walk.
    dims = {}
    for name, n in r.tlb["walk_refs_by_level"].items():
        dims[name.split(".")[0]] = dims.get(name.split(".")[0], 0) + n
    if table != PML4:
        assert dims["guest"] == 16 * guest and dims["ept"] == 16 * ept


def test_below_a_switch_the_guest_pays_no_exit_for_table_writes_or_invlpg():
    """The PT goes nested at its WRITES-th write: the next 64 writes and 64
    INVLPGs of pages it maps, each page read again, cost no exit (under
    `shadow`, each would)."""
    src = switch_at(PT).replace(mark(2), mark(2) + """
    mov rcx, 64
churn:
    mov rax, rcx
    and rax, 15
    mov rdx, rax
    shl rdx, 12
    add rdx, 0x600003
    mov qword ptr [0x703000 + rax * 8], rdx
    shl rax, 12
    invlpg [r12 + rax]
    mov rax, qword ptr [r12 + rax]
    loop churn
""" + mark(4))
    r = agile_run(src)
    d = r.between(2, 4)
    assert d["invlpg"] == 64
    assert d.exits.get("INVLPG", 0) == 0 and d["mmu_pte_write"] == 0
    s = hv.run("test", mmu="shadow", image=image(src)).between(2, 4)
    # Shadow paging emulates every write but the first: the rewrites before
    # mark 2 flooded the table (KVM's write-flood detection), so it was no
    # longer shadowed until the churn's first read shadowed it again.
    assert s.exits["INVLPG"] == 64 and s["mmu_pte_write"] == 63


# After the PT went nested (mark 2): PT entry 15 maps the shadowed PD
# itself, and the guest points PD entry 0 at a new PT through that mapping,
# below the switch. The write must still reach the shadow PD (EPT maps
# shadowed tables read-only: an EPT_VIOLATION, emulated), or the read of
# VA goes on through the old PT (0x11 for 0x22).
WRITE_THROUGH_SWITCH = """
    mov byte ptr [0x600000], 0x11
    mov byte ptr [0x610000], 0x22
    mov qword ptr [0x704000], 0x610003
    mov qword ptr [0x703000 + 15 * 8], 0x702003
    invlpg [r12 + 0xf000]
    mov qword ptr [r12 + 0xf000], 0x704003
    invlpg [r12]
    mov al, byte ptr [r12]
    mov dx, 0xf4
    out dx, al
"""
# After the PT went nested, the guest clears EFER.NXE, walks the switch
# again, and reads through a PTE with bit 63 set: reserved now, a #PF with
# RSVD, though the shadow part runs with NXE set.
NX_BELOW_SWITCH = """
    mov ecx, 0xC0000080
    rdmsr
    and eax, 0xfffff7ff
    wrmsr
    mov al, byte ptr [r12]
    mov rax, 0x8000000000601003
    mov qword ptr [0x703000 + 8], rax
    invlpg [r12 + 0x1000]
    mov al, byte ptr [r12 + 0x1000]
""" + EXIT


def _outcome(r: hv.Result) -> tuple:
    chain = [(step["vector"], step["error_code"]) for step in (r.crash or {}).get("chain", ())]
    return r.reason, r.exit_code, chain


@pytest.mark.parametrize("options", [{}, {"memo": False}, {"pwc": True}, {"ept_large_pages": True}],
                         ids=["memo", "no-memo", "pwc", "ept-large-pages"])
@pytest.mark.parametrize("tail", [WRITE_THROUGH_SWITCH, NX_BELOW_SWITCH],
                         ids=["table-written-through-switch", "nx-reserved-below-switch"])
def test_below_a_switch_the_guest_gets_what_every_other_mode_gives(tail, options):
    """Two holes a nested subtree opened in the shadow part (kvm-unit-tests
    access_test found both): a shadowed table written through a mapping
    below a switch, and the guest's EFER.NXE below a switch."""
    src = switch_at(PT).replace(mark(2) + "\n    mov rcx, 16", mark(2) + tail + "\n    mov rcx, 16")
    r = agile_run(src, **options)
    assert r.counters["agile.to_nested"] == 1
    assert _outcome(r) == _outcome(hv.run("test", mmu="native", image=image(src)))
    if tail is WRITE_THROUGH_SWITCH:
        assert r.exit_code == 0x22 and r.exits["EPT_VIOLATION"] >= 1
    else:
        assert r.reason == "triple_fault" and r.crash["chain"][0]["error_code"] == 0x9


# Every sample guest, as `hv compare` runs it, and every other with its defaults.
CASES = list({c.run_key: c for c in compare.SUITE}.values()) + [
    compare.Case(g) for g in ("hello", "pagetouch")]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_degenerate_policies_are_the_shadow_and_ept_modes(case):
    """--agile-policy shadow never nests, nested starts nested: every count
    of the whole run, marks included, is that mode's."""
    for policy, mode in (("shadow", "shadow"), ("nested", "ept")):
        a = hv.run(case.guest, mmu="agile", agile_policy=policy, **case.options).to_json()
        b = hv.run(case.guest, mmu=mode, **case.options).to_json()
        for d in (a, b):
            del d["mmu"], d["config"]
        assert a == b, f"agile --agile-policy {policy} differs from {mode}"


def test_the_policy_knobs_move_tables_back_on_trial():
    """writes=1,window=1,trial=1: at every VM entry whatever is nested is
    tried back as shadow, and the next write moves it to nested again;
    trial=0 never tries (the table stays nested after its first switch)."""
    src = switch_at(PT).replace(mark(2), mark(2) + """
    mov rcx, 8
again:
    mov qword ptr [0x703000 + 0xff0], rax
    mov qword ptr [0x703000 + 0xff0], rax
    invlpg [r12]
    mov rdx, qword ptr [r12]
    push rax
    mov eax, 99
    vmcall
    pop rax
    loop again
""" + mark(4))
    tried = agile_run(src, agile_policy="dynamic:rent=0,writes=1,window=1,trial=1").between(2, 4)
    kept = agile_run(src, agile_policy="dynamic:rent=0,writes=1,trial=0").between(2, 4)
    # (A table tried back is not shadowed until its next use, so the
    # iteration after a trial writes it freely: a round trip at least
    # every other iteration.)
    assert tried["agile.to_shadow"] == tried["agile.to_nested"] >= 4
    assert kept["agile.to_shadow"] == 0 and kept["agile.to_nested"] == 0
    assert kept["mmu_pte_write"] == 0 < tried["mmu_pte_write"]
    assert tried.exits["INVLPG"] >= 8 and "INVLPG" not in kept.exits


def test_a_guest_that_turns_on_pcid_gets_its_root_nested_at_once():
    """ctxswitch sets CR4.PCIDE before its switches (marks 1-2). Started
    shadowed (rent=0), that exit nests the root, and the switches cost what
    they cost under ept; with pcid=0 the root waits for the window's CR3
    loads (one exit, then nested). Started nested (the default), PCID is
    on when the rent is paid, and the root stays nested."""
    at_once = hv.run("ctxswitch", mmu="agile", agile_policy="dynamic:rent=0")
    late = hv.run("ctxswitch", mmu="agile", agile_policy="dynamic:rent=0,pcid=0")
    kept = hv.run("ctxswitch", mmu="agile")
    ept = hv.run("ctxswitch", mmu="ept").between(1, 2)
    assert at_once.counters["agile.to_nested"] == late.counters["agile.to_nested"] == 1
    assert kept.counters["agile.to_nested"] == kept.counters["agile.to_shadow"] == 0
    for window in (at_once.between(1, 2), kept.between(1, 2)):
        assert window.exits == ept.exits and "CR_ACCESS" not in window.exits
        assert window["tlb.walk_refs"] == ept["tlb.walk_refs"]
    assert late.between(1, 2).exits["CR_ACCESS"] == 1
    assert at_once.console == late.console == kept.console


def touched_nested(extra: str = "") -> str:
    """switch_at(PT)'s tables, `extra` run before the CR3 load; the 16
    pages written (A and D set) up to mark 1; marks 2-3 bracket writing
    them again."""
    src = switch_at(PT)
    src = src[:src.index(mark(1))].replace("mov rax, qword ptr [r12 + rdx - 0x1000]",
                                           "mov qword ptr [r12 + rdx - 0x1000], rdx")
    src = src.replace(f"    mov rax, {PML4:#x}\n    mov cr3, rax", f"""
    mov rbx, 0x600000
    mov rcx, 16
frames:
    mov qword ptr [rbx], rcx
    add rbx, 0x1000
    loop frames
{extra}
    mov rax, {PML4:#x}
    mov cr3, rax""")
    return src + mark(1) + mark(2) + """
    mov rcx, 16
again:
    mov rdx, rcx
    shl rdx, 12
    mov qword ptr [r12 + rdx - 0x1000], rcx
    loop again
""" + mark(3) + EXIT


def rent_to_mark_1(src: str) -> str:
    """The policy whose rent is what the nested walks have paid by mark 1
    (EPT knows every frame by then: no exit looks in before), so it is
    paid at that exit."""
    at_mark = agile_run(src, agile_policy="nested").marks[1]
    return f"dynamic:rent={at_mark['tlb.walk_refs'] - 4 * at_mark['tlb.walks']}"


def test_the_rent_paid_the_root_goes_shadowed_with_what_the_nested_walks_touched():
    """The default policy starts nested. Paid at mark 1, the rent sends
    the root shadowed, and the 16 pages the nested walks wrote (A and D
    set) are shadowed at once, so writing them again (marks 2-3) takes no
    hidden fault, and each walk is 4 shadow references. The guest's
    tables end as natively: the prefill set no bit."""
    src = touched_nested()
    policy = rent_to_mark_1(src)
    r = agile_run(src, agile_policy=policy)
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert r.between(1, 2)["agile.to_shadow"] == 1
    assert r.counters["agile.prefilled"] >= 16
    d = r.between(2, 3)
    assert "EXCEPTION_NMI" not in d.exits and d["tlb.walks"] >= 16
    assert d["tlb.walk_refs"] == 4 * d["tlb.walks"]
    tables = {}
    for mmu in ("native", "agile"):
        vm = VM(image(src), Config(mmu=mmu, agile_policy=policy))
        vm.run()
        tables[mmu] = vm.guest.read(PML4, 4 * 4096)
    assert tables["agile"] == tables["native"]


def test_the_prefill_skips_accessed_entries_outside_the_vm():
    """A page, and a table, that accessed guest entries place outside the
    VM's RAM (the guest never touches them): the prefill skips both, as
    neither an escape nor a translation."""
    outside = f"""
    mov qword ptr [{PT + 16 * 8:#x}], 0x10000023
    mov qword ptr [{PML4 + 0x2000 + 8:#x}], 0x20000023"""
    policy = rent_to_mark_1(touched_nested())
    base, r = (agile_run(touched_nested(extra), agile_policy=policy) for extra in ("", outside))
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert r.counters["agile.prefilled"] == base.counters["agile.prefilled"] >= 16


def test_the_prefill_stops_at_its_limits(monkeypatch):
    """At most PREFILL translations, even inside one table; at most
    PREFILL_TABLES tables read (the PML4 alone holds no leaf)."""
    src = touched_nested()
    policy = rent_to_mark_1(src)
    monkeypatch.setattr(agile, "PREFILL", 5)
    assert agile_run(src, agile_policy=policy).counters["agile.prefilled"] == 5
    monkeypatch.undo()
    monkeypatch.setattr(agile, "PREFILL_TABLES", 1)
    r = agile_run(src, agile_policy=policy)
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert r.counters["agile.to_shadow"] == 1 and r.counters["agile.prefilled"] == 0


def test_a_root_nested_until_its_rent_is_paid_is_not_tried_back():
    """A trial at every VM entry (window=1, trial=1) tries back what the
    policy nested, not the root still paying its rent: `compute` misses
    the TLB too rarely to pay it, and stays nested, as under ept."""
    r = hv.run("compute", mmu="agile", agile_policy="dynamic:window=1,trial=1")
    ept = hv.run("compute", mmu="ept")
    assert r.counters["agile.to_shadow"] == r.counters["agile.to_nested"] == 0
    assert r.exits == ept.exits and r.tlb["walk_refs"] == ept.tlb["walk_refs"]


@pytest.mark.parametrize("policy, message", [
    ("bogus", "unknown agile policy 'bogus' (choose from dynamic, whole, shadow, nested)"),
    ("shadow:writes=1", "agile policy 'shadow' has no knobs"),
    ("dynamic:speed=3", "agile policy knob 'speed=3': write knob=N with a knob of writes, cr3, "
                        "pcid, window, trial, rent"),
    ("dynamic:pcid=2", "agile policy knob 'pcid=2': must be 0 (off) or 1 (on)"),
    ("dynamic:writes=0", "agile policy knob 'writes=0': must be at least 1"),
    ("dynamic:window=soon", "agile policy knob 'window=soon': not a number: 'soon'"),
])
def test_a_bad_policy_is_one_clear_error(policy, message):
    with pytest.raises(hv.HvError, match=re.escape(message)):
        hv.run("hello", mmu="agile", agile_policy=policy)


def test_adaptive_switches_the_whole_vm_where_agile_nests_one_table():
    """--mmu adaptive is agile's machinery with the whole-VM policy (VEE
    2011): started shadowed, the PT that agile nests alone makes it nest
    the root, so the measured reads walk in two dimensions from the top
    (ept's 24 references), where agile walks shadow entries down to the
    switch."""
    src = switch_at(PT)
    agile = agile_run(src).between(2, 3)
    whole = agile_run(src, agile_policy="whole:rent=0")
    assert (whole.reason, whole.exit_code) == ("exit", 0)
    assert whole.counters["agile.to_nested"] == 1
    d = whole.between(2, 3)
    assert d["tlb.walk_refs"] == 24 * d["tlb.walks"] > agile["tlb.walk_refs"]
    adaptive = hv.run("test", mmu="adaptive", image=image(src), check_invariants=True)
    assert (adaptive.reason, adaptive.exit_code) == ("exit", 0)
    same = agile_run(src, agile_policy="whole").to_json()
    mine = adaptive.to_json()
    for j in (same, mine):
        del j["mmu"], j["config"]
    assert same == mine         # --mmu adaptive is --mmu agile --agile-policy whole
