"""A vCPU's paging as the VMM sees it (KVM's per-vCPU `struct kvm_mmu`).

`Paging` serves the modes whose hardware walks the guest's own tables
(native, and the first dimension of ept): the guest's paging registers are
the hardware's, and its MOV to CR, INVLPG and WRMSR run on the hardware
(hv.hw.mmu) without exits. Shadow paging (hv.vmm.shadow) and EPT
(hv.vmm.ept) extend it; `QemuPaging` serves mode qemu.
"""
from __future__ import annotations

from ..arch.x86 import MSR_EFER, NXE, PG
from ..hw.walker import Walker, root


class Paging:
    intercepts: frozenset = frozenset()     # the exits the VMM asks for (the mode's)

    def __init__(self, hw, guest):
        self.hw, self.guest = hw, guest
        self._peeker = Walker.peeker(guest, guest.ram)

    def boot(self, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        """The paging registers the boot ABI starts the vCPU with."""
        self.hw.load(cr0, cr3, cr4, efer)

    # Before the guest runs again (KVM's kvm_mmu_reload): give the hardware
    # a root again if the VMM dropped it. None: the root is the guest's CR3,
    # never dropped (ShadowPaging has one).
    reload = None

    def guest_tables(self) -> tuple[int, bool]:
        """The root of the guest's tables (its CR3, as hv.hw.walker.root
        tags it) and EFER.NXE: what its own tables say."""
        return root(self.hw.cr3, self.hw.cr4), self.hw.nxe

    def guest_paging(self) -> bool:
        """Whether the guest has paging on (CR0.PG)."""
        return self.hw.paging

    def wrmsr(self, msr: int, value: int) -> None:
        """WRMSR to EFER: the guest's EFER is the hardware's."""
        self.hw.wrmsr(msr, value)

    def peek(self, vaddr: int, tlb: bool = True) -> int | None:
        """The host address `vaddr` points at now, or None; no side effect,
        nothing counted (the VMM's own inspection: code scanning, crash
        reports). With `tlb`, the TLB's translation if it holds one (what the
        CPU fetches through), else the guest's tables' (what QEMU's MMU, the
        oracle, would say)."""
        tr = self.hw.lookup(vaddr) if tlb else None
        if tr is not None:
            return tr.paddr(vaddr)
        if self.guest_paging():
            cr3, nxe = self.guest_tables()
            gpa = self._peeker.peek(cr3, vaddr, nxe)
        else:
            gpa = vaddr
        return None if gpa is None else self.guest.hpa(gpa)


class QemuPaging:
    """Mode qemu: QEMU's MMU translates, and the registers are the engine's."""
    intercepts: frozenset = frozenset()

    def __init__(self, hw):
        self.hw = hw
        self._peeker = Walker.peeker(hw.walker.mem, hw.walker.limit)

    reload = None

    def boot(self, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        pass            # the engine holds them (VM._boot sets them there)

    def wrmsr(self, msr: int, value: int) -> None:
        pass            # QEMU runs it

    def peek(self, vaddr: int, tlb: bool = True) -> int | None:
        e = self.hw.engine
        if not e.reg("cr0") & PG:
            return vaddr if vaddr < self._peeker.limit else None
        return self._peeker.peek(root(e.reg("cr3"), e.reg("cr4")), vaddr,
                                 bool(e.msr(MSR_EFER) & NXE))
