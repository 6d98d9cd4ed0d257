"""The page walker: the only code that reads paging structures for a
translation, and the one place that counts walk references.

One walk follows SDM Vol.3A §4.5 (4-level paging): at each level read the
entry, check P and the reserved bits, accumulate RW/US/NX, stop at a leaf.
Accessed and Dirty bits are set the way QEMU's MMU (the project's oracle)
sets them: A in each entry as the walk uses it, A and D in the leaf only when
the access is allowed (SDM Vol.3A §4.8 allows either order).
"""
from __future__ import annotations

from ..arch import ept
from ..arch.ept import EptQual
from ..arch.paging import (A, ADDR_MASK, D, G, NX, P, PS, RSVD_HIGH, RW, US, PFErr, Level,
                           level_shift, reserved_mask)
from ..errors import HvError

READ, WRITE, FETCH = 0, 1, 2        # access kinds, as Unicorn numbers them minus 16
_SHIFT = (0,) + tuple(level_shift(level) for level in (1, 2, 3, 4))
_PF_P, _PF_W, _PF_U, _PF_RSVD, _PF_I = (int(PFErr.P), int(PFErr.W), int(PFErr.U),
                                        int(PFErr.RSVD), int(PFErr.I))
# P and reserved_mask by level (index 0 unused), without the low address
# bits of a large leaf, which _LARGE_LOW adds when PS is set at levels 2
# and 3: an entry passes if `entry & check[level] == P`.
_CHECK_NXE = (0,) + tuple(P | reserved_mask(level, 0, True) for level in (1, 2, 3, 4))
_CHECK_NO_NXE = (0,) + tuple(P | reserved_mask(level, 0, False) for level in (1, 2, 3, 4))
_LARGE_LOW = tuple(reserved_mask(level, PS, True) & ~_CHECK_NXE[level] if level in (2, 3) else 0
                   for level in range(5))
_EPT_SUSPECT = RSVD_HIGH | ept.MT_MASK | ept.LARGE
_EPT_NEED = (ept.R, ept.W, ept.X)       # the right each access kind needs
# References by level (index 0 unused) of a walk from the PML4 to a leaf at level i.
_LEVELS_READ = [None] + [tuple(int(lv >= leaf) for lv in range(5)) for leaf in (1, 2, 3, 4)]
ACCESS_NAMES = ("read", "write", "fetch")


class Translation:
    """What a successful walk learned: what a TLB entry caches."""
    __slots__ = ("vbase", "pbase", "shift", "writable", "user", "nx", "global_", "dirty")

    def __init__(self, vbase, pbase, shift, writable, user, nx, global_, dirty):
        self.vbase, self.pbase, self.shift = vbase, pbase, shift
        self.writable, self.user, self.nx = writable, user, nx
        self.global_, self.dirty = global_, dirty

    def paddr(self, vaddr: int) -> int:
        return self.pbase | (vaddr & ((1 << self.shift) - 1))

    def __repr__(self):
        flags = "".join(c for c, on in (("W", self.writable), ("U", self.user), ("X", not self.nx),
                                        ("G", self.global_), ("D", self.dirty)) if on)
        return f"<{self.vbase:#x}->{self.pbase:#x} {1 << self.shift:#x} {flags}>"


class Fault(Exception):
    """A translation the architecture answers with an exception."""
    vector = 0

    def __init__(self, vaddr: int, error_code: int):
        super().__init__(f"vector {self.vector} at {vaddr:#x}, error code {error_code:#x}")
        self.vaddr, self.error_code = vaddr, error_code


class PageFault(Fault):
    """#PF, with the error code of SDM Vol.3A §4.7."""
    vector = 14


class GeneralProtection(Fault):
    """#GP(0): a non-canonical address, or an instruction the VMM refuses
    before it runs (a reserved bit in MOV to CR)."""
    vector = 13

    def __init__(self, vaddr: int = 0):
        super().__init__(vaddr, 0)


class NonCanonical(GeneralProtection):
    """A non-canonical address is #GP(0), before any walk (SDM Vol.3A §6.15,
    "Interrupt 13"); QEMU, the oracle, raises #GP for stack accesses too."""


class EmulateWrite(Exception):
    """The access is a guest write the VMM must emulate (a write to a
    write-protected guest page table under shadow paging)."""

    def __init__(self, vaddr: int, gfn: int):
        super().__init__(f"emulate the write to {vaddr:#x} (guest frame {gfn:#x})")
        self.vaddr, self.gfn = vaddr, gfn


class EptViolation(Exception):
    """An EPT walk found no entry, or one without the rights the access needs:
    an EPT_VIOLATION exit (SDM Vol.3C §29.3.3.2)."""

    def __init__(self, gpa: int, qualification: int):
        super().__init__(f"EPT violation at guest-physical {gpa:#x} (qualification {qualification:#x})")
        self.gpa, self.qualification = gpa, qualification


class EptMisconfig(Exception):
    """An EPT entry the processor refuses: an EPT_MISCONFIG exit."""

    def __init__(self, gpa: int, level: int, entry: int):
        super().__init__(f"EPT misconfiguration at guest-physical {gpa:#x}: level-{level} "
                         f"entry {entry:#x}")
        self.gpa, self.level, self.entry = gpa, level, entry


class GuestEscape(HvError):
    """A guest paging structure points outside the guest's memory."""


class WalkMemo:
    """The results of one VM's recent walks, each served again (counted as
    the same walk) until an entry it read may have changed.

    A walk costs microseconds of Python; a TLB-bound guest walks the same
    tables over and over. A replayed walk reads nothing, so it must be the
    walk the tables would give now: same references, same result, and no
    A/D bit left to set (an entry the walk would change is one it changed
    already, unless it was written since).

    Invariant: a result is kept only while no entry its walk read (guest
    tables, shadow tables, EPT) was written since. The VMM's writes reach
    `written` through PhysMem.on_write, entry by entry; the guest's are
    caught by frame: the fill path grants no write right to a frame in
    `frames` (the first write fills again and drops the whole frame), and a
    frame newly watched makes every engine of the VM drop its
    translations, so none keeps one with W. Walks with page-walk caches are
    never replayed: their references depend on the caches' state.
    """
    LIMIT = 1 << 16         # results kept; all are dropped beyond (speed only)

    def __init__(self, engines: list):
        self.engines = engines      # the VM's engines (Engine.flush_tlb)
        self.results: dict[int, tuple] = {}
        self.readers: dict[int, list[int]] = {}     # entry address -> keys of walks that read it
        self.frames: dict[int, list[int]] = {}      # frame number -> entry addresses watched in it
        self.recording: list[int] | None = None     # entries read by the walk being recorded

    def put(self, key: int, result: tuple, entries: list[int]) -> None:
        if len(self.results) >= self.LIMIT or len(self.readers) >= 4 * self.LIMIT:
            self.clear()
        self.results[key] = result
        readers, frames = self.readers, self.frames
        new_frame = False
        for addr in entries:
            keys = readers.get(addr)
            if keys is not None:
                keys.append(key)
                continue
            readers[addr] = [key]
            watched = frames.get(addr >> 12)
            if watched is None:
                frames[addr >> 12] = [addr]
                new_frame = True
            else:
                watched.append(addr)
        if new_frame:
            for engine in self.engines:
                engine.flush_tlb()      # no alias may keep W on a watched frame

    def written(self, addr: int, length: int = 8) -> None:
        """The VMM wrote [addr, addr+length): forget the walks that read it."""
        if length == 8:
            self._forget(addr & ~7)
        else:
            for frame in range(addr >> 12, ((addr + length - 1) >> 12) + 1):
                for entry in self.frames.get(frame, ()):
                    if addr <= entry < addr + length:
                        self._forget(entry)

    def guest_writes(self, frame: int) -> None:
        """The guest may now write frame `frame`: forget every walk that read it."""
        for entry in self.frames.pop(frame, ()):
            self._forget(entry)

    def _forget(self, addr: int) -> None:
        keys = self.readers.pop(addr, None)
        if keys is not None:
            results = self.results
            for key in keys:
                results.pop(key, None)

    def clear(self) -> None:
        self.results.clear()
        self.readers.clear()
        self.frames.clear()


class Walker:
    """Walks 4-level tables in `mem` (addresses below `limit`) and counts
    every reference in `stats`: x86-64 paging structures with `walk`, EPT
    with `walk_ept`.

    `dim` names the tables walked in reference tags: "guest" for the guest's
    own tables, "shadow" for shadow tables, "ept" for EPT. A `hardware`
    walker is the CPU's page walker (tlb.* counters); otherwise it is the
    VMM's software walk of guest tables (vmm.* counters). `nested`, for a
    two-dimensional walk, translates each guest-physical address the walk
    uses (every table entry and the final page) through EPT:
    nested(gpa, access, final) -> (host-physical address, page shift).

    Counting: each loop reads an entry with `word` and counts it in
    `by_level` (this walker's references by level) on the next line, then
    adds the walk's references to the `refs` counter once: two loops, one
    rule, and no call per reference (this is the hottest code in hv). A
    walk replayed from the `memo` (WalkMemo) adds what it added then.
    """

    def __init__(self, mem, stats, limit: int, dim: str = "guest", hardware: bool = True,
                 nested=None):
        self.mem, self.stats, self.limit, self.dim = mem, stats, limit, dim
        self.nested = nested
        # Paging-structure caches (pwc.WalkCache) of the CPU, and the ASID
        # its entries are tagged with; set by the MMU with --pwc.
        self.pwc, self.asid = None, 0
        self._counters = stats.counters
        self.by_level = stats.level_refs(dim) if hardware else [0] * 5
        self._hist = stats.walk_hist if hardware else None
        prefix = "tlb." if hardware else f"vmm.{dim}_"
        self._walks, self._refs, self._ad = (f"{prefix}walks", f"{prefix}walk_refs",
                                             f"{prefix}ad_writes")
        self._word = mem.word           # word(addr >> 3): the 8-byte entry at addr
        self.memo: WalkMemo | None = None   # hardware walkers of a VM, set by the MMU
        self.nested_by_level: list[int] | None = None   # the EPT walker's, with `nested`

    def _escape(self, table_addr: int, level: int) -> GuestEscape:
        return GuestEscape(f"level-{level} paging structure at {table_addr:#x} is outside "
                           f"{self.dim} memory [0, {self.limit:#x})")

    def _set_bits(self, entry_addr: int, entry: int, bits: int) -> int:
        if entry & bits != bits:
            entry |= bits
            self.mem.write_u64(entry_addr, entry)
            self._counters[self._ad] += 1
        return entry

    def walk(self, cr3: int, vaddr: int, access: int, user: bool, wp: bool, nxe: bool,
             path: list | None = None) -> Translation:
        """Translate `vaddr` for `access` at CPL 3 (`user`) or CPL 0..2.

        Raises PageFault with the architectural error code (SDM Vol.3A §4.7),
        or NonCanonical. `path`, if given, receives (level, entry address,
        entry) for every entry read, the leaf last. A nested walk returns the
        host-physical translation, at the smaller of the two page sizes.
        """
        top = vaddr >> 47
        if top and top != 0x1FFFF:
            raise NonCanonical(vaddr)
        counters = self._counters
        memo = self.memo
        if memo is not None and path is None and self.pwc is None:
            key = ((vaddr >> 12) << 64 | (cr3 & ADDR_MASK) | access | user << 2 | wp << 3
                   | nxe << 4)
            hit = memo.results.get(key)
            if hit is not None:
                # Count the walk again, as it counted itself.
                tr, refs, own, ept = hit
                counters[self._walks] += 1
                counters[self._refs] += refs
                self._hist[refs] += 1
                b = self.by_level
                b[1] += own[1]
                b[2] += own[2]
                b[3] += own[3]
                b[4] += own[4]
                if ept is not None:
                    b = self.nested_by_level
                    b[1] += ept[1]
                    b[2] += ept[2]
                    b[3] += ept[3]
                    b[4] += ept[4]
                return tr
            ept_before = None if self.nested is None else list(self.nested_by_level)
        else:
            memo = None
        refs_before = counters[self._refs]
        # Plain ints in the hot path (IntFlag arithmetic costs microseconds).
        err = (_PF_W if access == WRITE else 0) | (_PF_U if user else 0)
        if access == FETCH and nxe:
            err |= _PF_I
        check = _CHECK_NXE if nxe else _CHECK_NO_NXE
        word, by_level, nested, limit = self._word, self.by_level, self.nested, self.limit
        refs = 0
        table = cr3 & ADDR_MASK
        level = 4
        # RW and US must be set at every level, NX at none: AND and OR of
        # the entries read (SDM Vol.3A §4.6).
        all_and, any_or = -1, 0
        pwc = self.pwc
        if pwc is not None:
            hit = pwc.lookup(self.asid, vaddr)
            if hit is not None:
                counters["pwc.hits"] += 1
                level, table, all_and, any_or = hit
                level -= 1
        try:
            if memo is not None:
                memo.recording = []
            while True:
                entry_addr = table + ((vaddr >> _SHIFT[level]) & 0x1FF) * 8
                if nested is not None:
                    entry_addr = nested(entry_addr, READ, False)[0]
                elif entry_addr >= limit:
                    raise self._escape(entry_addr, level)
                entry = word(entry_addr >> 3)
                by_level[level] += 1
                refs += 1
                if memo is not None:
                    memo.recording.append(entry_addr)
                if entry & check[level] != P:
                    # Not present, or a reserved bit set (reserved_mask).
                    raise PageFault(vaddr, err if not entry & P else err | _PF_P | _PF_RSVD)
                all_and &= entry
                any_or |= entry
                if level == 1 or entry & PS:
                    break
                if not entry & A:
                    entry = self._set_bits(entry_addr, entry, A)
                if path is not None:
                    path.append((level, entry_addr, entry))
                table = entry & ADDR_MASK
                if pwc is not None:
                    pwc.insert(self.asid, level, vaddr, (table, all_and, any_or))
                level -= 1
            if level == 3:
                # QEMU sets A in a PDPTE before it looks at PS, so a 1 GiB
                # leaf is accessed even if the access then faults, for its
                # rights or for the reserved low bits of its address.
                entry = self._set_bits(entry_addr, entry, A)
            if level > 1 and entry & _LARGE_LOW[level]:
                raise PageFault(vaddr, err | _PF_P | _PF_RSVD)
            writable, usable = bool(all_and & RW), bool(all_and & US)
            nx = bool(nxe and any_or & NX)
            # SDM Vol.3A §4.6: access rights of the whole walk.
            if (user and not usable) or (access == FETCH and nx) or (
                    access == WRITE and not writable and (user or wp)):
                raise PageFault(vaddr, err | _PF_P)
            bits = A | D if access == WRITE else A
            if entry & bits != bits:
                entry = self._set_bits(entry_addr, entry, bits)
            if path is not None:
                path.append((level, entry_addr, entry))
            # A large page may reach past the end of RAM; the MMU checks each
            # frame it caches (see NativeMMU._miss).
            shift = _SHIFT[level]
            low = (1 << shift) - 1
            paddr = (entry & ADDR_MASK & ~low) | (vaddr & low)
            if nested is not None:
                paddr, ept_shift = nested(paddr, access, True)
                if ept_shift < shift:
                    shift = ept_shift
                    low = (1 << shift) - 1
            tr = Translation(vaddr & ~low, paddr & ~low, shift,
                             writable, usable, nx, bool(entry & G), bool(entry & D))
            if memo is not None:
                ept = None if nested is None else tuple(
                    a - b for a, b in zip(self.nested_by_level, ept_before))
                total = counters[self._refs] + refs - refs_before
                memo.put(key, (tr, total, _LEVELS_READ[level], ept), memo.recording)
            return tr
        finally:
            if memo is not None:
                memo.recording = None
            counters[self._walks] += 1
            counters[self._refs] += refs
            if self._hist is not None:
                # A nested walk's EPT steps added theirs to the same counter.
                self._hist[counters[self._refs] - refs_before] += 1

    def walk_ept(self, eptp: int, gpa: int, access: int, final: bool) -> tuple[int, int]:
        """Translate guest-physical `gpa` through EPT: (host-physical address,
        page shift). One step of a two-dimensional walk: its references are
        counted, it is no walk of its own. Raises EptViolation, EptMisconfig.
        """
        table = eptp & ADDR_MASK
        rights = ept.RWX
        level = 4
        word, by_level, limit = self._word, self.by_level, self.limit
        recording = None if self.memo is None else self.memo.recording
        refs = 0
        try:
            while True:
                entry_addr = table + ((gpa >> _SHIFT[level]) & 0x1FF) * 8
                if entry_addr + 8 > limit:
                    raise GuestEscape(f"EPT table at {entry_addr:#x} is outside host memory")
                entry = word(entry_addr >> 3)
                by_level[level] += 1
                refs += 1
                if recording is not None:
                    recording.append(entry_addr)
                if not entry & ept.RWX:
                    rights = 0
                    break
                # Only entries with one of these bits, or W without R, can be
                # misconfigured (ept.misconfigured has the rules).
                if (entry & _EPT_SUSPECT or entry & 3 == 2) and ept.misconfigured(level, entry):
                    raise EptMisconfig(gpa, level, entry)
                rights &= entry
                if level == 1 or entry & ept.LARGE:
                    break
                if not entry & ept.EA:
                    self._set_bits(entry_addr, entry, ept.EA)
                table = entry & ADDR_MASK
                level -= 1
        finally:
            self._counters[self._refs] += refs
        if not rights & _EPT_NEED[access]:
            qual = ((EptQual.READ, EptQual.WRITE, EptQual.FETCH)[access]
                    | (rights & ept.RWX) << 3 | EptQual.GLA_VALID
                    | (EptQual.GLA_TRANSLATION if final else 0))
            raise EptViolation(gpa, qual)
        bits = ept.EA | ept.ED if access == WRITE else ept.EA
        if entry & bits != bits:
            self._set_bits(entry_addr, entry, bits)
        low = (1 << _SHIFT[level]) - 1
        return (entry & ADDR_MASK & ~low) | (gpa & low), _SHIFT[level]

    def peek(self, cr3: int, vaddr: int, nxe: bool) -> int | None:
        """The guest-physical address `vaddr` reads from now, or None."""
        try:
            paddr = self.walk(cr3, vaddr, READ, False, False, nxe).paddr(vaddr)
        except (Fault, GuestEscape):
            return None
        return paddr if paddr < self.limit else None


LEVEL_NAMES = {lv.value: lv.name for lv in Level}
