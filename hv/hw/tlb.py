"""The TLB model: the source of truth for cached translations.

A set-associative TLB tagged by address-space id (ASID/VPID) and PCID,
holding 4 KiB, 2 MiB and 1 GiB translations, with FIFO replacement in each
set. A global translation (G with CR4.PGE) is kept under its ASID's GLOBAL
tag instead of a PCID: it serves every PCID (SDM Vol.3A §4.10.2.4).

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

Invariant: Unicorn's TLB never holds a translation the model does not. The
engines that fill from this TLB are attached to it by ASID (`attach`); when
an entry leaves, the engines of its ASID drop it at once: its page, for a
4 KiB entry (Unicorn's fills are 4 KiB), or everything, for a large page or
a flush of many entries.
"""
from __future__ import annotations

from .walker import Translation

SHIFTS = (12, 21, 30)
# A tag: the ASID (16 bits) above a PCID field of 13 bits: the PCID (12
# bits), or GLOBAL.
PCID_BITS = 13
GLOBAL = 1 << 12
TAG_BITS = 16 + PCID_BITS
TAG_MASK = (1 << TAG_BITS) - 1


def tag(asid: int, pcid: int = 0) -> int:
    return asid << PCID_BITS | pcid


def global_tag(tag: int) -> int:
    """The GLOBAL tag of `tag`'s ASID."""
    return tag >> PCID_BITS << PCID_BITS | GLOBAL


def _asid(key: int) -> int:
    return (key & TAG_MASK) >> PCID_BITS


def _key(tag: int, shift: int, vpn: int) -> int:
    """An entry's key as one int (hashing a tuple costs three times more):
    the page number, its size (0, 1, 2: 4 KiB, 2 MiB, 1 GiB), the tag."""
    return (vpn << 2 | (shift - 12) // 9) << TAG_BITS | tag


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
        self._globals = 0               # entries held under a GLOBAL tag
        # ASID -> engines that fill Unicorn's TLB from this one (Engine:
        # flush_page, flush_tlb). With VPIDs one engine per ASID; without,
        # vCPU j of every VM shares ASID 0.
        self._engines: dict[int, list] = {}
        self.walk_cache = None      # a pwc.WalkCache, invalidated with the TLB

    def __len__(self):
        return len(self._map)

    def attach(self, asid: int, engine) -> None:
        """Keep `engine`'s TLB within this one for the entries of `asid`."""
        self._engines.setdefault(asid, []).append(engine)

    def rights_changed(self, asid: int) -> None:
        """What the entries of `asid` allow changed though none changed
        (PKRU, CR4.PKE): its engines forget the rights they cached."""
        for engine in self._engines.get(asid, ()):
            engine.flush_tlb()

    def held(self, asid: int) -> list[Translation]:
        """The translations held for `asid` (any PCID)."""
        return [tr for k, tr in self._map.items() if _asid(k) == asid]

    def lookup(self, tag: int, vaddr: int) -> Translation | None:
        """The translation of `vaddr` under `tag`, or a global one of its ASID."""
        tr = self._lookup(tag, vaddr)
        if tr is None and self._globals:
            tr = self._lookup(global_tag(tag), vaddr)
        return tr

    def _lookup(self, tag: int, vaddr: int) -> Translation | None:
        m, by_size = self._map, self._by_size
        if by_size[0]:
            tr = m.get((vaddr >> 12 << 2) << TAG_BITS | tag)
            if tr is not None:
                return tr
        if by_size[1]:
            tr = m.get((vaddr >> 21 << 2 | 1) << TAG_BITS | tag)
            if tr is not None:
                return tr
        if by_size[2]:
            return m.get((vaddr >> 30 << 2 | 2) << TAG_BITS | tag)
        return None

    def insert(self, tag: int, tr: Translation) -> bool:
        """Cache `tr` under `tag` (a GLOBAL one for a global translation);
        True if that evicted another entry."""
        shift = tr.shift
        vpn = tr.vbase >> shift
        size = (shift - 12) // 9
        key = (vpn << 2 | size) << TAG_BITS | tag
        m = self._map
        old = m.get(key)
        if old is not None:
            # A re-walk of a cached page (e.g. its first write, to set D).
            # Unicorn may keep the old entry's other 4 KiB pieces: that is
            # harmless only if the new translation maps the same frame with
            # no fewer rights.
            if (old.pbase == tr.pbase and old.nx == tr.nx and old.user == tr.user
                    and old.writable <= tr.writable and old.pkey == tr.pkey):
                m[key] = tr         # keeps its place in the FIFO
                return False
            self._forget(key, self._drop(key))
        s = self._sets[(vpn ^ (shift << 4)) % self.nsets]
        s.append(key)
        m[key] = tr
        self._by_size[size] += 1
        if tag & GLOBAL:
            self._globals += 1
        if len(s) > self.ways:
            oldest = s[0]
            self._forget(oldest, self._drop(oldest))
            return True
        return False

    def _drop(self, key: int) -> Translation:
        """Take entry `key` out of the model (its engines still hold it)."""
        tr = self._map.pop(key)
        self._sets[((key >> (TAG_BITS + 2)) ^ (tr.shift << 4)) % self.nsets].remove(key)
        self._by_size[key >> TAG_BITS & 3] -= 1
        if key & GLOBAL:
            self._globals -= 1
        return tr

    def _forget(self, key: int, tr: Translation) -> None:
        """Entry `key` left the model: the engines of its ASID drop it."""
        for engine in self._engines.get(_asid(key), ()):
            if tr.shift == 12:
                engine.flush_page(tr.vbase)
            else:
                engine.flush_tlb()

    def _drop_where(self, pred) -> int:
        """Drop the entries `pred(key, tr)` picks; their ASIDs' engines
        forget everything (one full flush beats many page flushes)."""
        doomed = [k for k, tr in self._map.items() if pred(k, tr)]
        for k in doomed:
            self._drop(k)
        for asid in {_asid(k) for k in doomed}:
            for engine in self._engines.get(asid, ()):
                engine.flush_tlb()
        return len(doomed)

    # Invalidation, named after the architecture (SDM Vol.3A §4.10.4).
    def flush_all(self) -> int:
        """Every entry of every ASID, global ones too (INVEPT all-context)."""
        if self.walk_cache is not None:
            self.walk_cache.flush_all()
        return self._drop_where(lambda k, tr: True)

    def flush_asid(self, asid: int) -> int:
        """Every entry of one ASID, every PCID's and global ones too
        (INVVPID single-context, CR4.PGE toggle, INVPCID all-context)."""
        self._flush_walk_cache(lambda t: t >> PCID_BITS == asid)
        return self._drop_where(lambda k, tr: _asid(k) == asid)

    def flush_nonglobal(self, asid: int) -> int:
        """Non-global entries of one ASID, every PCID's (INVVPID
        single-context retaining globals, INVPCID all-non-global)."""
        self._flush_walk_cache(lambda t: t >> PCID_BITS == asid)
        return self._drop_where(lambda k, tr: _asid(k) == asid
                                and not k & GLOBAL)

    def flush_tag(self, tag: int) -> int:
        """Non-global entries of one ASID and PCID (MOV to CR3, INVPCID
        single-context)."""
        self._flush_walk_cache(lambda t: t == tag)
        return self._drop_where(lambda k, tr: k & TAG_MASK == tag)

    def _flush_walk_cache(self, which) -> None:
        if self.walk_cache is not None:
            self.walk_cache.flush_tags(which)

    def invlpg(self, tag: int, vaddr: int, globals_: bool = True) -> int:
        """The entries of one ASID and PCID that translate `vaddr`, and the
        ASID's global ones unless not `globals_` (INVLPG; INVPCID
        individual-address)."""
        self._flush_walk_cache(lambda t: t == tag)
        tags = (tag, global_tag(tag)) if globals_ else (tag,)
        return self._invalidate(vaddr, tags)

    def invvpid_address(self, asid: int, vaddr: int) -> int:
        """The entries of one ASID that translate `vaddr`, every PCID's and
        global ones (INVVPID individual-address)."""
        self._flush_walk_cache(lambda t: t >> PCID_BITS == asid)
        tags = {k & TAG_MASK for k in self._map if _asid(k) == asid}
        return self._invalidate(vaddr, tags)

    def _invalidate(self, vaddr: int, tags) -> int:
        n = 0
        for t in tags:
            for shift in SHIFTS:
                key = _key(t, shift, vaddr >> shift)
                if key in self._map:
                    self._forget(key, self._drop(key))
                    n += 1
        return n
