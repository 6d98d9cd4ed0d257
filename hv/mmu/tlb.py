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

from collections import OrderedDict

from .walker import Translation

SHIFTS = (12, 21, 30)
LOG = 64            # dropped entries remembered for per-page flushes
FLUSH_PAGES = 16    # beyond this many dropped pages one full flush is cheaper


class TLB:
    def __init__(self, entries: int = 1536, ways: int = 12):
        if entries <= 0 or ways <= 0 or entries % ways:
            raise ValueError(f"TLB of {entries} entries cannot have {ways} ways")
        self.entries, self.ways = entries, ways
        self.nsets = entries // ways
        # One insertion-ordered (FIFO) dict per set: (asid, shift, vpn) -> Translation.
        self._sets = [OrderedDict() for _ in range(self.nsets)]
        self._where: dict[tuple[int, int, int], OrderedDict] = {}
        self._by_shift = {s: 0 for s in SHIFTS}   # entries held per page size
        self.generation = 0
        self._log: list[tuple[int, int, int]] = []    # keys dropped, the last LOG
        self._log_start = 0                            # the generation of _log[0]
        self.walk_cache = None      # a pwc.WalkCache, invalidated with the TLB

    def __len__(self):
        return len(self._where)

    def held(self, asid: int):
        """The translations held for `asid`."""
        return [s[k] for k, s in self._where.items() if k[0] == asid]

    def _set_of(self, shift: int, vpn: int) -> OrderedDict:
        return self._sets[(vpn ^ (shift << 4)) % self.nsets]

    def lookup(self, asid: int, vaddr: int) -> Translation | None:
        for shift in SHIFTS:
            if self._by_shift[shift]:
                key = (asid, shift, vaddr >> shift)
                s = self._where.get(key)
                if s is not None:
                    return s[key]
        return None

    def insert(self, asid: int, tr: Translation) -> bool:
        """Cache `tr`; True if that evicted another entry."""
        key = (asid, tr.shift, tr.vbase >> tr.shift)
        s = self._set_of(tr.shift, key[2])
        evicted = False
        old = s.get(key)
        if old is not None:
            # A re-walk of a cached page (e.g. its first write, to set D).
            # Unicorn may keep the old entry's other 4 KiB pieces: that is
            # harmless only if the new translation maps the same frame with
            # no fewer rights.
            same = (old.pbase == tr.pbase and old.nx == tr.nx and old.user == tr.user
                    and old.writable <= tr.writable)
            if same:
                s[key] = tr         # keeps its place in the FIFO
                return False
            self._drop(key)
        elif len(s) >= self.ways:
            self._drop(next(iter(s)))
            evicted = True
        s[key] = tr
        self._where[key] = s
        self._by_shift[tr.shift] += 1
        return evicted

    def _drop(self, key) -> None:
        del self._where.pop(key)[key]
        self._by_shift[key[1]] -= 1
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
        for a, shift, vpn in self._log[generation - self._log_start:]:
            if a == asid:
                if shift != 12 or len(pages) == FLUSH_PAGES:
                    return None
                pages.append(vpn << 12)
        return pages

    def _drop_where(self, pred) -> int:
        doomed = [k for k, s in self._where.items() if pred(k, s[k])]
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
        return self._drop_where(lambda k, tr: k[0] == asid)

    def flush_nonglobal(self, asid: int) -> int:
        """Non-global entries of one ASID (MOV to CR3)."""
        self._flush_walk_cache(asid)
        return self._drop_where(lambda k, tr: k[0] == asid and not tr.global_)

    def _flush_walk_cache(self, asid: int) -> None:
        if self.walk_cache is not None:
            self.walk_cache.flush_asid(asid)

    def invlpg(self, asid: int, vaddr: int) -> int:
        """The entries of one ASID that translate `vaddr`, global or not
        (INVLPG, INVVPID individual-address)."""
        self._flush_walk_cache(asid)
        n = 0
        for shift in SHIFTS:
            key = (asid, shift, vaddr >> shift)
            if key in self._where:
                self._drop(key)
                n += 1
        return n
