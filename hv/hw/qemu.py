"""`qemu`: Unicorn's own MMU (QEMU's page walker and TLB): the oracle.

hv models nothing in this mode. The guest's translations are QEMU's; the
VMM still delivers exceptions through the guest IDT (Unicorn never does),
and walks the guest tables itself, uncounted, for the linear accesses that
delivery makes. Architectural results in every other mode must equal this
mode's.
"""
from __future__ import annotations

from ..arch.x86 import CR0, EFER, MSR_EFER
from ..stats import Stats
from .mmu import NativeMMU
from .walker import Walker


class QemuMMU:
    name = "qemu"
    intercepts = NativeMMU.intercepts
    exception_bitmap = NativeMMU.exception_bitmap
    tlb = None

    def __init__(self, engine, mem, ram: int):
        self.engine, self.mem, self.ram = engine, mem, ram
        self.walker = Walker(mem, Stats(), ram)
        self._peeker = NativeMMU.peek_walker(mem, ram)

    def translate(self, vaddr: int, access: int, user: bool = False) -> int:
        e = self.engine
        tr = self.walker.walk(e.reg("cr3"), vaddr, access, user, bool(e.reg("cr0") & CR0.WP),
                              bool(e.msr(MSR_EFER) & EFER.NXE))
        return tr.paddr(vaddr)

    def peek(self, vaddr: int, tlb: bool = True) -> int | None:
        e = self.engine
        return self._peeker.peek(e.reg("cr3"), vaddr, bool(e.msr(MSR_EFER) & EFER.NXE))
