"""`ept`: hardware-assisted MMU virtualization (EPT/NPT; after KVM's TDP MMU,
arch/x86/kvm/mmu/tdp_mmu.c).

The guest owns its page tables: CR3 loads, INVLPG and guest page faults are
no exits. The hardware translates guest-virtual to guest-physical with the
guest's tables and every guest-physical address (each guest table entry,
and the final page) to host-physical with the VMM's EPT: a two-dimensional
walk of up to (4+1)*(4+1)-1 = 24 references. The VMM fills EPT lazily: the
first touch of a guest frame is an EPT_VIOLATION exit.

Invariants:
- EPT maps only guest RAM, each guest frame to its host frame
  (GuestMemory.hpa); a guest-physical address outside RAM is never mapped
  (the VM stops: there are no devices in memory space).
- EPT tables live in the VMM area, which no EPT entry maps.
- A TLB entry caches a guest-virtual page at the smaller of the guest's and
  EPT's page sizes.
"""
from __future__ import annotations

from ..arch import ept
from ..arch.paging import ADDR_MASK, PAGE_SIZE, level_shift
from ..errors import InvariantError
from .exits import Exit, dispatch
from ..arch.vmx import ExitReason
from ..memory import CHUNK, GuestMemory, VmmFrames
from ..stats import Stats
from ..hw.mmu import NativeMMU
from ..hw.tlb import TLB
from ..hw.walker import EptMisconfig, EptViolation, GuestEscape, Translation, Walker

GiB = 1 << 30


class EptTables:
    """The EPT of one VM, shared by its vCPUs."""

    def __init__(self, guest: GuestMemory, vmm_size: int, large_pages: bool):
        self.guest, self.host = guest, guest.host
        self.frames = VmmFrames(self.host, vmm_size)
        self.large_pages = large_pages
        self.root = self.frames.alloc()
        self.eptp = ept.eptp(self.root)

    def map(self, c, gpa: int) -> None:
        """Map the guest frame of `gpa` (and with large pages its whole 2 MiB
        or 1 GiB run, if the host placement allows), as the EPT-violation
        handler does."""
        if self.guest.hpa(gpa) is None:
            raise GuestEscape(f"guest-physical {gpa:#x} is outside guest memory "
                              f"[0, {self.guest.ram:#x})")
        leaf_level = 1
        if self.large_pages:
            for level, size in ((3, GiB), (2, CHUNK)):
                if self.guest.contiguous(gpa & ~(size - 1), size):
                    leaf_level = level
                    break
        table = self.root
        for level in range(4, leaf_level, -1):
            addr = table + ((gpa >> level_shift(level)) & 0x1FF) * 8
            entry = self.host.read_u64(addr)
            if not entry & ept.RWX:
                entry = self.frames.alloc() | ept.RWX
                self.host.write_u64(addr, entry)
                c["ept_tables"] += 1
            table = entry & ADDR_MASK
        size = 1 << level_shift(leaf_level)
        hpa = self.guest.hpa(gpa & ~(size - 1))
        addr = table + ((gpa >> level_shift(leaf_level)) & 0x1FF) * 8
        self.host.write_u64(addr, hpa | ept.RWX | ept.MT_WB | int(ept.EPTE.IPAT)
                            | (ept.LARGE if leaf_level > 1 else 0))
        c[("pages_4k", "pages_2m", "pages_1g")[leaf_level - 1]] += 1


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
                if level == 1 or entry & ept.LARGE:
                    size = 1 << level_shift(level)
                    if (entry & ADDR_MASK & ~(size - 1)) != self.guest.hpa(here) or \
                            not self.guest.owns(self.guest.hpa(here), size):
                        raise InvariantError(f"EPT maps guest-physical {here:#x} to "
                                             f"{entry & ADDR_MASK:#x}, not its own frame")
                else:
                    visit(entry & ADDR_MASK, level - 1, here)
        visit(self.root, 4, 0)


class EptMMU(NativeMMU):
    name = "ept"
    intercepts = NativeMMU.intercepts | {ExitReason.EPT_VIOLATION, ExitReason.EPT_MISCONFIG}

    def __init__(self, vcpu, tables: EptTables, stats: Stats, tlb: TLB, asid: int = 0):
        super().__init__(tables.guest, stats, tlb, asid)
        self.frame_limit = self.mem.size    # host-physical: EPT maps only guest frames
        self.vcpu, self.ept = vcpu, tables
        self.ept_walker = Walker(self.mem, stats, self.mem.size, dim="ept")
        self.walker = Walker(self.mem, stats, self.mem.size, dim="guest", nested=self._nested)
        self.walker.nested_by_level = self.ept_walker.by_level
        self.use_walk_cache(self.walker)

    def hardware_walkers(self) -> list[Walker]:
        return [self.walker, self.ept_walker]

    def _nested(self, gpa: int, access: int, final: bool) -> tuple[int, int]:
        """One EPT step of the two-dimensional walk, through the nested TLB
        if there is one."""
        ntlb = self.tlb.walk_cache
        if ntlb is not None:
            hit = ntlb.nested_lookup(self.asid, gpa)
            if hit is not None:
                self.counters["pwc.ntlb_hits"] += 1
                return hit[0] | (gpa & 0xFFF), hit[1]
        hpa, shift = self.ept_walker.walk_ept(self.ept.eptp, gpa, access, final)
        if ntlb is not None:
            ntlb.nested_insert(self.asid, gpa, hpa, shift)
        return hpa, shift

    def hw_walk(self, vaddr: int, access: int, user: bool) -> Translation:
        """The two-dimensional walk; an EPT violation exits, the VMM maps the
        frame, and the walk starts again from the top, as after VM entry."""
        while True:
            try:
                return self.walker.walk(self.cr3, vaddr, access, user, self._wp, self._nxe)
            except EptViolation as v:
                dispatch(self.vcpu, Exit(ExitReason.EPT_VIOLATION, v.qualification, 0,
                                         value=v.gpa))
            except EptMisconfig as m:
                dispatch(self.vcpu, Exit(ExitReason.EPT_MISCONFIG, 0, 0, value=m.gpa))
                raise GuestEscape(str(m)) from None

    def ept_violation(self, gpa: int) -> None:
        self.ept.map(self.counters, gpa)
