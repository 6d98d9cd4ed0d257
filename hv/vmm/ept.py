"""`ept`: hardware-assisted MMU virtualization (EPT/NPT; after KVM's TDP MMU,
arch/x86/kvm/mmu/tdp_mmu.c).

The guest owns its page tables: CR3 loads, INVLPG and guest page faults are
no exits. The hardware translates guest-virtual to guest-physical with the
guest's tables and every guest-physical address (each guest table entry,
and the final page) to host-physical with the VMM's EPT: a two-dimensional
walk of up to (4+1)*(4+1)-1 = 24 references ((5+1)*(5+1)-1 = 35 with a
5-level guest on 5-level EPT, `--ept-levels 5`). The VMM fills EPT lazily: the
first touch of a guest frame is an EPT_VIOLATION exit.

Invariants:
- EPT maps only guest RAM, each guest frame to its host frame
  (GuestMemory.hpa); a guest-physical address outside RAM is never mapped
  (the VM stops: there are no devices in memory space).
- EPT tables live in the VMM area, which no EPT entry maps.
- A TLB entry caches a guest-virtual page at the smaller of the guest's and
  EPT's page sizes.
- Agile paging (hv.vmm.agile): a frame in `read_only` (a shadowed guest
  table) is mapped by a 4 KiB leaf without W once it is mapped at all.
"""
from __future__ import annotations

from typing import Container

from ..arch import ept
from ..arch.paging import ADDR_MASK, PAGE_SIZE, level_shift, table_index
from ..errors import GuestEscape, InvariantError
from ..memory import CHUNK, GiB, GuestMemory, VmmFrames
from ..stats import Stats
from .paging import Paging


class EptTables:
    """The EPT of one VM, shared by its vCPUs."""

    def __init__(self, guest: GuestMemory, vmm_size: int, large_pages: bool, base: int = 0,
                 levels: int = 4):
        self.guest, self.host = guest, guest.host
        self.frames = VmmFrames(self.host, vmm_size, base)
        self.large_pages, self.levels = large_pages, levels
        self.root = self.frames.alloc()
        self.eptp = ept.eptp(self.root, levels=levels)
        # Guest frames EPT must not let the guest write (agile: its shadowed
        # tables); a frame that leaves it is made writable at its next
        # write's EPT violation (`allow_write`).
        self.read_only: Container[int] = frozenset()

    def map(self, c, gpa: int) -> None:
        """Map the guest frame of `gpa` (and with large pages its whole 2 MiB
        or 1 GiB run, if the host placement allows), as the EPT-violation
        handler does."""
        device = self.guest.devices.get(gpa & ~0xFFF)
        if device is not None:
            # Every access to it exits to the device (KVM: an MMIO spte).
            self._set_leaf(c, gpa, 1, device)
            return
        if self.guest.hpa(gpa) is None:
            raise GuestEscape(f"guest-physical {gpa:#x} is outside guest memory "
                              f"[0, {self.guest.ram:#x})")
        leaf_level = 1
        if self.large_pages:
            for level, size in ((3, GiB), (2, CHUNK)):
                base = gpa & ~(size - 1)
                if self.guest.contiguous(base, size) and not self._read_only_in(base, size):
                    leaf_level = level
                    break
        size = 1 << level_shift(leaf_level)
        rights = ept.RWX if leaf_level > 1 or gpa >> 12 not in self.read_only else ept.R | ept.X
        self._set_leaf(c, gpa, leaf_level, self.guest.hpa(gpa & ~(size - 1)), rights)

    def _read_only_in(self, base: int, size: int) -> bool:
        first, end = base >> 12, (base + size) >> 12
        return any(first <= gfn < end for gfn in self.read_only)

    def _set_leaf(self, c, gpa: int, leaf_level: int, hpa: int, rights: int = ept.RWX) -> None:
        table = self.root
        for level in range(self.levels, leaf_level, -1):
            addr = table + table_index(gpa, level) * 8
            entry = self.host.read_u64(addr)
            if not entry & ept.RWX:
                entry = self.frames.alloc() | ept.RWX
                self.host.write_u64(addr, entry)
                c["ept_tables"] += 1
            table = entry & ADDR_MASK
        addr = table + table_index(gpa, leaf_level) * 8
        self.host.write_u64(addr, hpa | rights | ept.MT_WB | int(ept.EPTE.IPAT)
                            | (ept.LARGE if leaf_level > 1 else 0))
        c[("pages_4k", "pages_2m", "pages_1g")[leaf_level - 1]] += 1

    def leaf(self, gpa: int) -> tuple[int, int, int] | None:
        """The EPT leaf that maps `gpa`: (its address, level, entry), or None."""
        table = self.root
        for level in range(self.levels, 0, -1):
            addr = table + table_index(gpa, level) * 8
            entry = self.host.read_u64(addr)
            if not entry & ept.RWX:
                return None
            if ept.is_leaf(level, entry):
                return addr, level, entry
            table = entry & ADDR_MASK
        raise AssertionError("unreachable: level 1 entries are leaves")

    def ensure(self, c, gpa: int) -> None:
        """Map the frame of `gpa` unless EPT maps it already (agile: a frame
        the VMM learnt of at a hidden fault)."""
        if self.leaf(gpa) is None:
            self.map(c, gpa)

    def protect(self, c, gfn: int) -> bool:
        """Take W from the EPT leaf of guest frame `gfn` (a large one is
        split down to 4 KiB first). True if EPT changed: the caller flushes
        what the vCPUs derived from it (INVEPT)."""
        found = self.leaf(gfn << 12)
        if found is None or not found[2] & ept.W:
            return False
        addr, level, entry = found
        while level > 1:
            addr, level, entry = self._split(c, gfn << 12, addr, level, entry)
        self.host.write_u64(addr, entry & ~ept.W)
        return True

    def _split(self, c, gpa: int, addr: int, level: int, entry: int) -> tuple[int, int, int]:
        """Replace the large leaf `entry` at `addr` by a table of the same
        mappings one level down; the new leaf that maps `gpa`."""
        table = self.frames.alloc()
        c["ept_tables"] += 1
        size = 1 << level_shift(level - 1)
        large = ept.LARGE if level - 1 > 1 else 0
        base = entry & ADDR_MASK
        keep = entry & ~ADDR_MASK & ~ept.LARGE
        for i in range(512):
            self.host.write_u64(table + i * 8, (base + i * size) | keep | large)
        self.host.write_u64(addr, table | ept.RWX)
        index = table_index(gpa, level - 1)
        return table + index * 8, level - 1, (base + index * size) | keep | large

    def allow_write(self, c, gpa: int) -> None:
        """Give the EPT leaf of `gpa` its W back (a frame no longer read-only)."""
        addr, _level, entry = self.leaf(gpa)
        self.host.write_u64(addr, entry | ept.W)

    def check(self) -> None:
        """Every EPT leaf maps a guest frame to its own host frame; every EPT
        table lies in the VMM area (below guest memory)."""
        vmm_end = min(self.guest.chunks)

        def visit(table: int, level: int, gpa: int) -> None:
            if not table + PAGE_SIZE <= vmm_end:
                raise InvariantError(f"EPT table {table:#x} outside the VMM area")
            for i in range(512):
                entry = self.host.read_u64(table + 8 * i)
                if not entry & ept.RWX:
                    continue
                here = gpa | (i << level_shift(level))
                if ept.is_leaf(level, entry) and here in self.guest.devices:
                    if level != 1 or entry & ADDR_MASK != self.guest.devices[here]:
                        raise InvariantError(f"EPT maps device page {here:#x} to "
                                             f"{entry & ADDR_MASK:#x}, not the device")
                elif ept.is_leaf(level, entry):
                    size = 1 << level_shift(level)
                    if (entry & ADDR_MASK & ~(size - 1)) != self.guest.hpa(here) or \
                            not self.guest.owns(self.guest.hpa(here), size):
                        raise InvariantError(f"EPT maps guest-physical {here:#x} to "
                                             f"{entry & ADDR_MASK:#x}, not its own frame")
                else:
                    visit(entry & ADDR_MASK, level - 1, here)
        visit(self.root, self.levels, 0)


class EptPaging(Paging):
    """One vCPU's paging under EPT: the guest's tables are the hardware's
    first dimension (Paging); EPT violations exit to the VMM, which maps
    the guest frame in the VM's EPT."""

    def __init__(self, hw, guest: GuestMemory, ept: EptTables, stats: Stats):
        super().__init__(hw, guest)
        self.ept, self.counters = ept, stats.counters

    def ept_violation(self, ex) -> None:
        self.ept.map(self.counters, ex.value)
