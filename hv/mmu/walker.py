"""The page walker: the only code that reads paging structures for a
translation, and the one place that counts walk references.

One walk follows SDM Vol.3A §4.5 (4-level paging): at each level read the
entry, check P and the reserved bits, accumulate RW/US/NX, stop at a leaf.
Accessed and Dirty bits are set the way QEMU's MMU (the project's oracle)
sets them: A in each entry as the walk uses it, A and D in the leaf only when
the access is allowed (SDM Vol.3A §4.8 allows either order).
"""
from __future__ import annotations

from ..arch.paging import (A, ADDR_MASK, D, G, NX, P, PS, RW, US, PFErr, Level, is_canonical,
                           level_shift, reserved_mask)
from ..errors import HvError

READ, WRITE, FETCH = 0, 1, 2        # access kinds, as Unicorn numbers them minus 16
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


class NonCanonical(Fault):
    """A non-canonical address is #GP(0), before any walk (SDM Vol.3A §6.15,
    "Interrupt 13"); QEMU, the oracle, raises #GP for stack accesses too."""
    vector = 13

    def __init__(self, vaddr: int):
        super().__init__(vaddr, 0)


class GuestEscape(HvError):
    """A guest paging structure points outside the guest's memory."""


class Walker:
    """Walks x86-64 4-level tables in guest memory `mem` (guest-physical
    addresses below `limit`) and counts every reference in `stats`."""

    def __init__(self, mem, stats, limit: int):
        self.mem, self.stats, self.limit = mem, stats, limit
        self._counters = stats.counters
        self._tags = stats.refs_by_tag

    def read_entry(self, table_addr: int, level: int) -> int:
        """Read one paging-structure entry: the single counting point."""
        if table_addr + 8 > self.limit:
            raise GuestEscape(f"level-{level} paging structure at {table_addr:#x} is outside "
                              f"guest memory [0, {self.limit:#x})")
        self._tags[("guest", level)] += 1
        return self.mem.read_u64(table_addr)

    def _set_bits(self, entry_addr: int, entry: int, bits: int) -> int:
        if entry & bits != bits:
            entry |= bits
            self.mem.write_u64(entry_addr, entry)
            self._counters["tlb.ad_writes"] += 1
        return entry

    def walk(self, cr3: int, vaddr: int, access: int, user: bool, wp: bool, nxe: bool) -> Translation:
        """Translate `vaddr` for `access` at CPL 3 (`user`) or CPL 0..2.

        Raises PageFault with the architectural error code (SDM Vol.3A §4.7),
        or NonCanonical.
        """
        if not is_canonical(vaddr):
            raise NonCanonical(vaddr)
        counters = self._counters
        counters["tlb.walks"] += 1
        refs_before = sum_refs = counters["tlb.walk_refs"]
        try:
            err = (PFErr.W if access == WRITE else 0) | (PFErr.U if user else 0)
            if access == FETCH and nxe:
                err |= PFErr.I
            table = cr3 & ADDR_MASK
            writable = usable = True
            nx = False
            level = 4
            while True:
                entry_addr = table + ((vaddr >> level_shift(level)) & 0x1FF) * 8
                entry = self.read_entry(entry_addr, level)
                sum_refs += 1
                if not entry & P:
                    raise PageFault(vaddr, err)
                if entry & reserved_mask(level, entry, nxe):
                    raise PageFault(vaddr, err | PFErr.P | PFErr.RSVD)
                writable &= bool(entry & RW)
                usable &= bool(entry & US)
                nx |= bool(entry & NX) and nxe
                if level == 1 or entry & PS:
                    break
                self._set_bits(entry_addr, entry, A)
                table = entry & ADDR_MASK
                level -= 1
            # SDM Vol.3A §4.6: access rights of the whole walk.
            denied = (user and not usable) or (access == FETCH and nx) or (
                access == WRITE and not writable and (user or wp))
            if denied:
                raise PageFault(vaddr, err | PFErr.P)
            shift = level_shift(level)
            entry = self._set_bits(entry_addr, entry, A | (D if access == WRITE else 0))
            # A large page may reach past the end of RAM; the MMU checks each
            # frame it hands out (see NativeMMU.fill).
            pbase = entry & ADDR_MASK & ~((1 << shift) - 1)
            return Translation(vaddr & ~((1 << shift) - 1), pbase, shift, writable, usable, nx,
                               bool(entry & G), bool(entry & D))
        finally:
            refs = sum_refs - refs_before
            counters["tlb.walk_refs"] = sum_refs
            self.stats.walk_hist[refs] += 1


    def peek(self, cr3: int, vaddr: int, nxe: bool) -> int | None:
        """The guest-physical address `vaddr` reads from now, or None."""
        try:
            paddr = self.walk(cr3, vaddr, READ, False, False, nxe).paddr(vaddr)
        except (Fault, GuestEscape):
            return None
        return paddr if paddr < self.limit else None


LEVEL_NAMES = {lv.value: lv.name for lv in Level}
