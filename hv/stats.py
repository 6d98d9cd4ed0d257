"""Counters, with KVM's names where KVM has one.

One Stats per vCPU. Everything is a plain integer counter keyed by name, so
snapshots (marks) and differences between them are dict operations, and the
JSON output is the same dicts sorted.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from .arch.vmx import ExitReason

# Counters every report shows, even when zero, in this order.
COUNTER_NAMES = (
    "insns", "exits", "io_exits", "halt_exits", "hypercalls",
    "pf_guest", "exceptions", "tlb_flush", "invlpg", "cr3_loads",
)
# Every other counter hv keeps, by who counts it: a Result reads 0 for any
# of these that never counted (hv.api.Counts). A new counter goes here.
OTHER_COUNTERS = (
    "console_dropped", "insn_emulation", "code_rescans",            # the VM, the vCPU
    "mmio_exits", "interrupts",                                     # devices
    "invpcid",                                                      # the CPU
    "pf_fixed", "mmu_pte_write", "mmu_flooded", "mmu_cache_miss",   # shadow paging
    "mmu_shadow_zapped", "mmu_pde_zapped", "mmu_recycled", "remote_tlb_flush",
    *(f"mmu_shadow_pages.L{level}" for level in range(1, 6)),
    "vmm.guest_walks", "vmm.guest_walk_refs", "vmm.guest_ad_writes",
    "ept_tables", "pages_4k", "pages_2m", "pages_1g",               # EPT
    "pwc.hits", "pwc.ntlb_hits",                                    # --pwc
    "agile.to_nested", "agile.to_shadow", "agile.prefilled",        # agile paging
)
# Only what is the same on every host: how often Unicorn's own TLB refills
# depends on wall-clock time (see hv/hw/tlb.py), so refills are not counted.
TLB_NAMES = ("misses", "walks", "walk_refs", "ad_writes", "evictions")


class Stats:
    """Counters of one vCPU.

    `counters`: name -> count; TLB model counters are prefixed "tlb.".
    `exits`: exit reason -> count. `walk_hist`: references per walk -> walks.
    `refs`: dimension of the hardware's walk references -> counts by level
    (a list indexed by level, which the walker increments in place).
    """

    def __init__(self):
        # defaultdict(int), not Counter: `+=` on a Counter costs three times more.
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.exits: defaultdict[ExitReason, int] = defaultdict(int)
        self.walk_hist: defaultdict[int, int] = defaultdict(int)
        self.refs: dict[str, list[int]] = {}

    def level_refs(self, dim: str) -> list[int]:
        """The counts by level of `dim`'s references, for the walker to increment."""
        return self.refs.setdefault(dim, [0] * 6)

    @property
    def refs_by_tag(self) -> Counter[tuple[str, int]]:
        """(dimension, level) of a walk reference -> count."""
        return Counter({(dim, level): n for dim, counts in self.refs.items()
                        for level, n in enumerate(counts) if n})

    def add(self, other: "Stats") -> None:
        for mine, theirs in ((self.counters, other.counters), (self.exits, other.exits),
                             (self.walk_hist, other.walk_hist)):
            for k, n in theirs.items():
                mine[k] += n
        for dim, counts in other.refs.items():
            mine = self.level_refs(dim)
            for level, n in enumerate(counts):
                mine[level] += n

    def snapshot(self) -> dict[str, int]:
        """Every counter as one flat dict: the form marks record."""
        snap = {name: self.counters.get(name, 0) for name in COUNTER_NAMES}
        snap.update({f"tlb.{name}": self.counters.get(f"tlb.{name}", 0) for name in TLB_NAMES})
        snap.update((k, v) for k, v in self.counters.items() if k not in snap)
        snap.update((f"exit.{r.name}", n) for r, n in self.exits.items())
        return dict(sorted(snap.items()))
