"""Page-walk caches (`--pwc`): paging-structure caches and a nested TLB,
after Intel's paging-structure caches (SDM Vol.3A §4.10.3) and Bhargava et
al., "Accelerating two-dimensional page walks for virtualized systems",
ASPLOS 2008.

- Paging-structure caches hold non-leaf entries of the tables the hardware
  walks (the guest's, or shadow tables), keyed by the address bits that
  select them: a hit lets a walk start below the cached level, skipping
  those references (and, in a two-dimensional walk, their EPT walks).
- The nested TLB caches guest-physical -> host-physical translations of a
  two-dimensional walk's EPT steps: a hit skips an EPT walk.

Each structure is fully associative and FIFO. The paging-structure caches
are tagged like the TLB (ASID and PCID) and invalidated with it: a TLB
operation that drops a tag's entries drops that tag's paging-structure
caches (MOV to CR3, INVLPG, INVPCID and INVVPID do so, SDM Vol.3A
§4.10.4.1). The nested TLB is tagged by ASID; dropping everything drops it
too.
"""
from __future__ import annotations

from collections import OrderedDict

from ..arch.paging import level_shift

PSC_ENTRIES = 32        # per level: PML5E, PML4E, PDPTE and PDE caches
NTLB_ENTRIES = 32


class WalkCache:
    def __init__(self, psc_entries: int = PSC_ENTRIES, ntlb_entries: int = NTLB_ENTRIES):
        self.psc_entries, self.ntlb_entries = psc_entries, ntlb_entries
        # level -> (tag, vaddr bits) -> (next table, AND and OR of the entries above, switched)
        self.psc = {level: OrderedDict() for level in (5, 4, 3, 2)}
        self.ntlb: OrderedDict = OrderedDict()      # (asid, gfn) -> (hpa page, shift, EPT's W)

    def lookup(self, tag: int, vaddr: int):
        """The deepest cached non-leaf entry for `vaddr`: (its level, next
        table, AND and OR of the entries down to it, whether the walk had
        switched to the guest's tables by then: agile paging), or None."""
        for level in (2, 3, 4, 5):
            hit = self.psc[level].get((tag, vaddr >> level_shift(level)))
            if hit is not None:
                return (level, *hit)
        return None

    def insert(self, tag: int, level: int, vaddr: int, value: tuple) -> None:
        cache = self.psc[level]
        cache[(tag, vaddr >> level_shift(level))] = value
        if len(cache) > self.psc_entries:
            cache.popitem(last=False)

    def nested_lookup(self, asid: int, gpa: int):
        return self.ntlb.get((asid, gpa >> 12))

    def nested_insert(self, asid: int, gpa: int, hpa: int, shift: int, writable: bool) -> None:
        self.ntlb[(asid, gpa >> 12)] = (hpa & ~0xFFF, shift, writable)
        if len(self.ntlb) > self.ntlb_entries:
            self.ntlb.popitem(last=False)

    def flush_tags(self, which) -> None:
        """The paging-structure caches' entries of the tags `which` picks."""
        for cache in self.psc.values():
            for key in [k for k in cache if which(k[0])]:
                del cache[key]

    def flush_nested(self, asid: int) -> None:
        for key in [k for k in self.ntlb if k[0] == asid]:
            del self.ntlb[key]

    def flush_all(self) -> None:
        for cache in self.psc.values():
            cache.clear()
        self.ntlb.clear()
