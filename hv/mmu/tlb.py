"""The TLB model: the source of truth for cached translations.

A set-associative TLB tagged by address-space id (ASID/VPID), holding 4 KiB,
2 MiB and 1 GiB translations, with FIFO replacement in each set.

Why one level and not an L1/L2 pair: Unicorn's own TLB sits in front of the
model and absorbs every hit it can, invisibly; the model only sees accesses
that miss there. What it can count exactly is what costs a page walk: a
translation that is in no level of the TLB. So it models the last level
(default 1536 entries, 12 ways: Skylake's STLB) and counts misses and
walks there.

Why FIFO and not LRU: a policy that learns from hits would learn from the
hits Unicorn's TLB lets through, and how many those are depends on the host:
QEMU shrinks its TLB when a 100 ms wall-clock window passes with little use
(cputlb.c, tlb_mmu_resize_locked). FIFO changes state only on misses, and
every miss reaches the model (Unicorn never holds what the model does not),
so misses, walks and evictions are the same on every host and every run.

Invariant: Unicorn's TLB never holds a translation the model does not. Every
operation that drops entries bumps `generation` and logs the entry; an
engine whose last-seen generation differs drops from Unicorn's TLB the 4 KiB
pages of its ASID logged since (`dropped_since`), or everything if those
are too many, include a large page, or are no longer in the log.
"""
from __future__ import annotations

from .walker import Translation

SHIFTS = (12, 21, 30)
LOG = 64            # dropped entries remembered for per-page flushes
FLUSH_PAGES = 16    # beyond this many dropped pages one full flush is cheaper
ASID_BITS = 16


def _key(asid: int, shift: int, vpn: int) -> int:
    """An entry's tag as one int (hashing a tuple costs three times more):
    the page number, its size, the ASID."""
    return (vpn << 2 | SHIFTS.index(shift)) << ASID_BITS | asid


class TLB:
    def __init__(self, entries: int = 1536, ways: int = 12):
        if entries <= 0 or ways <= 0 or entries % ways:
            raise ValueError(f"TLB of {entries} entries cannot have {ways} ways")
        self.entries, self.ways = entries, ways
        self.nsets = entries // ways
        # Each set is a list of keys, oldest first (FIFO); _map holds the entries.
        self._sets: list[list[int]] = [[] for _ in range(self.nsets)]
        self._map: dict[int, Translation] = {}
        self._by_size = [0, 0, 0]       # entries held per page size (SHIFTS order)
        self.generation = 0
        self._log: list[int] = []       # keys dropped, the last LOG or more
        self._log_start = 0             # the generation of _log[0]
        self.walk_cache = None      # a pwc.WalkCache, invalidated with the TLB

    def __len__(self):
        return len(self._map)

    def held(self, asid: int) -> list[Translation]:
        """The translations held for `asid`."""
        mask = (1 << ASID_BITS) - 1
        return [tr for k, tr in self._map.items() if k & mask == asid]

    def lookup(self, asid: int, vaddr: int) -> Translation | None:
        m, by_size = self._map, self._by_size
        if by_size[0]:
            tr = m.get((vaddr >> 12 << 2) << ASID_BITS | asid)
            if tr is not None:
                return tr
        if by_size[1]:
            tr = m.get((vaddr >> 21 << 2 | 1) << ASID_BITS | asid)
            if tr is not None:
                return tr
        if by_size[2]:
            return m.get((vaddr >> 30 << 2 | 2) << ASID_BITS | asid)
        return None

    def insert(self, asid: int, tr: Translation) -> bool:
        """Cache `tr`; True if that evicted another entry."""
        shift = tr.shift
        vpn = tr.vbase >> shift
        key = _key(asid, shift, vpn)
        old = self._map.get(key)
        if old is not None:
            # A re-walk of a cached page (e.g. its first write, to set D).
            # Unicorn may keep the old entry's other 4 KiB pieces: that is
            # harmless only if the new translation maps the same frame with
            # no fewer rights.
            if (old.pbase == tr.pbase and old.nx == tr.nx and old.user == tr.user
                    and old.writable <= tr.writable):
                self._map[key] = tr         # keeps its place in the FIFO
                return False
            self._drop(key)
            evicted = False
        else:
            s = self._sets[(vpn ^ (shift << 4)) % self.nsets]
            evicted = len(s) >= self.ways
            if evicted:
                self._drop(s[0])
        self._sets[(vpn ^ (shift << 4)) % self.nsets].append(key)
        self._map[key] = tr
        self._by_size[key >> ASID_BITS & 3] += 1
        return evicted

    def _drop(self, key: int) -> None:
        tr = self._map.pop(key)
        self._sets[((key >> (ASID_BITS + 2)) ^ (tr.shift << 4)) % self.nsets].remove(key)
        self._by_size[key >> ASID_BITS & 3] -= 1
        self.generation += 1
        log = self._log
        log.append(key)
        if len(log) > 2 * LOG:
            del log[:LOG]
            self._log_start += LOG

    def dropped_since(self, generation: int, asid: int) -> list[int] | None:
        """The 4 KiB pages of `asid` dropped since `generation`, or None
        when only a full flush is safe (or cheaper)."""
        if generation < self._log_start or self.generation - generation > 4 * FLUSH_PAGES:
            return None
        pages = []
        mask = (1 << ASID_BITS) - 1
        for key in self._log[generation - self._log_start:]:
            if key & mask == asid:
                if key >> ASID_BITS & 3 or len(pages) == FLUSH_PAGES:
                    return None
                pages.append(key >> (ASID_BITS + 2) << 12)
        return pages

    def _drop_where(self, pred) -> int:
        doomed = [k for k, tr in self._map.items() if pred(k, tr)]
        for k in doomed:
            self._drop(k)
        return len(doomed)

    # Invalidation, named after the architecture (SDM Vol.3A §4.10.4).
    def flush_all(self) -> int:
        """Every entry of every ASID, global ones too (INVEPT all-context)."""
        if self.walk_cache is not None:
            self.walk_cache.flush_all()
        return self._drop_where(lambda k, tr: True)

    def flush_asid(self, asid: int) -> int:
        """Every entry of one ASID, global ones too (INVVPID single-context, CR4.PGE toggle)."""
        self._flush_walk_cache(asid)
        mask = (1 << ASID_BITS) - 1
        return self._drop_where(lambda k, tr: k & mask == asid)

    def flush_nonglobal(self, asid: int) -> int:
        """Non-global entries of one ASID (MOV to CR3)."""
        self._flush_walk_cache(asid)
        mask = (1 << ASID_BITS) - 1
        return self._drop_where(lambda k, tr: k & mask == asid and not tr.global_)

    def _flush_walk_cache(self, asid: int) -> None:
        if self.walk_cache is not None:
            self.walk_cache.flush_asid(asid)

    def invlpg(self, asid: int, vaddr: int) -> int:
        """The entries of one ASID that translate `vaddr`, global or not
        (INVLPG, INVVPID individual-address)."""
        self._flush_walk_cache(asid)
        n = 0
        for shift in SHIFTS:
            key = _key(asid, shift, vaddr >> shift)
            if key in self._map:
                self._drop(key)
                n += 1
        return n
