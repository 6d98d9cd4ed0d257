"""guests/phases.s: page-table churn and a TLB-hostile working set, together
(phase A, marks 1 -> 2) and apart (B, only the reads, 2 -> 3; C, only the
churn, 3 -> 4), the phased workload of issue 16 (agile paging).

The guest must pass in every mode with the oracle's console, and each
phase must cost what it does: under shadow paging the churn's PTE writes
are exits (A and C) and the reads are none (B); under EPT every read of the
static region misses into a 2-D walk (A and B).
"""
import functools

import pytest

import hv

from conftest import MODES

# What phases does (guests/phases.s): its constants, and its marks.
ROUNDS = 2500           # rounds in each phase
WS_PAGES = 4096         # the static region: 4 KiB pages, beyond the TLB
WS_SLICE = 64           # static pages read in a round (phases A and B)
CHURN_SLOTS = 64        # churn steps before mark 1: one per slot
CHURN_STEPS = CHURN_SLOTS + 2 * ROUNDS      # the warm-up, phases A and C
WS_READS = 2 * ROUNDS * WS_SLICE            # reads in phases A and B
# Checks: the set-up's read of the static region, 3 a churn step, the
# phases' reads, then its frames, the churn PTEs and the count of steps.
CHECKS = WS_PAGES + 3 * CHURN_STEPS + WS_READS + WS_PAGES + CHURN_SLOTS + 1
TLB_ENTRIES = 1536      # hv's default TLB model
A, B, C = (1, 2), (2, 3), (3, 4)

RESULT_LINE = (f"phases: ok (3 phases of {ROUNDS} rounds, {CHURN_STEPS} PTEs churned, "
               f"{WS_READS} pages read, {CHECKS} checks)")


@functools.cache
def run(mmu: str) -> hv.Result:
    """One run per mode, shared by the tests (runs are deterministic)."""
    return hv.run("phases", mmu=mmu)


def test_the_static_region_exceeds_the_tlb():
    assert WS_PAGES > TLB_ENTRIES


@pytest.mark.parametrize("mmu", MODES)
def test_phases_passes_with_the_oracles_console(mmu):
    r = run(mmu)
    assert (r.reason, r.exit_code) == ("exit", 0), f"{r.detail}\n{r.console}"
    lines = r.console.splitlines()
    assert lines[-1] == RESULT_LINE
    assert not any("FAIL" in line for line in lines)
    oracle = run("qemu")
    assert r.console == oracle.console
    assert sorted(r.marks) == sorted(oracle.marks) == [1, 2, 3, 4]
    for window in (A, B, C):            # the console is quiet in the phases
        assert r.between(*window)["io_exits"] == 0


def test_phases_do_what_they_say_natively():
    r = run("native")
    a, b, c = (r.between(*w) for w in (A, B, C))
    # A churn step: one INVLPG (pt_unmap_4k's), and its new page misses.
    assert a["invlpg"] == c["invlpg"] == ROUNDS
    assert b["invlpg"] == 0
    assert a["cr3_loads"] == b["cr3_loads"] == c["cr3_loads"] == 0
    # Every read of the static region misses and walks 4 levels.
    assert b["tlb.misses"] >= ROUNDS * WS_SLICE
    assert b["tlb.walk_refs"] >= 4 * ROUNDS * WS_SLICE
    assert a["tlb.misses"] >= ROUNDS * (WS_SLICE + 1)
    # The churn alone misses a few pages a step, not a slice's worth.
    assert ROUNDS <= c["tlb.misses"] < ROUNDS * WS_SLICE // 8
    # A is B and C together: the same instructions, and about the misses.
    assert a["insns"] == pytest.approx(b["insns"] + c["insns"], rel=0.01)
    assert a["tlb.misses"] == pytest.approx(b["tlb.misses"] + c["tlb.misses"], rel=0.01)
    # The set-up set A and D in every static PTE: the reads set none.
    assert b["tlb.ad_writes"] == 0


def test_shadow_paging_exits_where_the_tables_change():
    r = run("shadow")
    a, b, c = (r.between(*w) for w in (A, B, C))
    for churn in (a, c):
        # Each step's two PTE writes (map, unmap) are emulated, its INVLPG
        # exits, and its new page is a hidden fault.
        assert churn["mmu_pte_write"] == churn["insn_emulation"] == 2 * ROUNDS
        assert churn.exits["INVLPG"] == ROUNDS
        assert churn["pf_fixed"] >= ROUNDS
        assert churn.exits["EXCEPTION_NMI"] >= 2 * ROUNDS + ROUNDS
    # B writes no page table: no write-protection exit, no exit at all but
    # its mark, and walks of the shadow tables (4 references) at native cost.
    assert b["mmu_pte_write"] == b["insn_emulation"] == 0
    assert b.exits == {"VMCALL": 1}
    assert b["tlb.misses"] >= ROUNDS * WS_SLICE
    assert b["tlb.walk_refs"] / b["tlb.misses"] == pytest.approx(4, abs=0.05)


def test_ept_walks_in_two_dimensions_where_it_misses():
    ept, shadow = run("ept"), run("shadow")
    for window in (A, B):
        e, s = ept.between(*window), shadow.between(*window)
        # Nearly every miss is a 4 KiB page under 4 KiB EPT: 24 references.
        assert e["tlb.walk_refs"] / e["tlb.misses"] > 23
        assert e["tlb.walk_refs"] / e["tlb.misses"] > 5 * (s["tlb.walk_refs"] / s["tlb.misses"])
    # The frames were all touched before mark 1: no EPT violation, and the
    # churn's PTE writes and INVLPGs are no exits.
    for window in (A, B, C):
        assert ept.between(*window).exits == {"VMCALL": 1}
