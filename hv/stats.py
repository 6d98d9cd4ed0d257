"""Counters, with KVM's names where KVM has one.

One Stats per vCPU. Everything is a plain integer counter keyed by name, so
snapshots (marks) and differences between them are dict operations, and the
JSON output is the same dicts sorted.
"""
from __future__ import annotations

from collections import Counter

from .arch.vmx import ExitReason

# Counters every report shows, even when zero, in this order.
COUNTER_NAMES = (
    "insns", "exits", "io_exits", "halt_exits", "hypercalls",
    "pf_guest", "exceptions", "tlb_flush", "invlpg", "cr3_loads",
)
# Only what is the same on every host: how often Unicorn's own TLB refills
# depends on wall-clock time (see hv/mmu/tlb.py), so refills are not counted.
TLB_NAMES = ("misses", "walks", "walk_refs", "ad_writes", "evictions")


class Stats:
    """Counters of one vCPU.

    `counters`: name -> count; TLB model counters are prefixed "tlb.".
    `exits`: exit reason -> count. `walk_hist`: references per walk -> walks.
    `refs_by_tag`: (dimension, level) of a walk reference -> count.
    """

    def __init__(self):
        self.counters: Counter[str] = Counter()
        self.exits: Counter[ExitReason] = Counter()
        self.walk_hist: Counter[int] = Counter()
        self.refs_by_tag: Counter[tuple[str, int]] = Counter()

    def add(self, other: "Stats") -> None:
        self.counters.update(other.counters)
        self.exits.update(other.exits)
        self.walk_hist.update(other.walk_hist)
        self.refs_by_tag.update(other.refs_by_tag)

    def snapshot(self) -> dict[str, int]:
        """Every counter as one flat dict: the form marks record."""
        snap = {name: self.counters.get(name, 0) for name in COUNTER_NAMES}
        snap.update({f"tlb.{name}": self.counters.get(f"tlb.{name}", 0) for name in TLB_NAMES})
        snap.update((k, v) for k, v in self.counters.items() if k not in snap)
        snap.update((f"exit.{r.name}", n) for r, n in self.exits.items())
        return dict(sorted(snap.items()))
