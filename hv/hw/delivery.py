"""Exception and interrupt delivery through the guest's IDT in IA-32e mode
(SDM Vol.3A §6.12-§6.15), as the CPU does it: Unicorn never does.

A fault while delivering becomes the exception delivered instead, or #DF
(Table 6-5); a fault while delivering #DF is a triple fault, which the
caller turns into the TRIPLE_FAULT exit. Every linear access goes through
the two functions the vCPU hands over, like any access the CPU makes.
"""
from __future__ import annotations

from typing import Callable

from ..arch.x86 import (GATE_INTERRUPT, GATE_TRAP, HAS_ERROR_CODE, IDT_GATE_SIZE, RFLAGS,
                        TSS_IST1, TSS_RSP0, Vector, causes_double_fault, decode_idt_gate)
from ..events import Fault


class _Raised(Exception):
    """Delivering raised another exception (SDM Vol.3A §6.15)."""

    def __init__(self, vector: int, error_code: int = 0, cr2: int = 0):
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


def selector_error(index: int, idt: bool, ext: int) -> int:
    """An error code that names a descriptor (SDM Vol.3A §6.13, Figure 6-7):
    the index, IDT (bit 1: an IDT gate), EXT (bit 0: while delivering an
    event external to the program)."""
    return index | (2 if idt else 0) | ext


class Delivery:
    """Delivers events for one vCPU. `read(vaddr, n) -> bytes` and
    `write(vaddr, data)` are the CPU's linear accesses (supervisor, within
    one page for a write), each raising `Fault`."""

    def __init__(self, engine, read: Callable[[int, int], bytes],
                 write: Callable[[int, bytes], None], counters):
        self.engine, self.read, self.write, self.counters = engine, read, write, counters

    def deliver(self, vector: int, error_code: int | None, rip: int, cr2: int = 0,
                int_rip: int | None = None) -> bool:
        """Deliver `vector`, its frame returning to `rip`. `int_rip` makes it
        a software interrupt (INT n or INT3 at that address, returning to
        `rip`): the gate's DPL is checked, no error code is pushed, CR2 is
        left alone, and a fault while delivering it is the instruction's.
        False if delivery ended in a triple fault."""
        c = self.counters
        software = int_rip is not None
        while True:
            if vector == Vector.PF and not software:
                c["pf_guest"] += 1
                self.engine.set_reg("cr2", cr2)
            else:
                c["exceptions"] += 1
            try:
                self._push_frame(vector, error_code, rip, software)
                return True
            except _Raised as second:
                if vector == Vector.DF:
                    return False
                if not software and causes_double_fault(vector, second.vector):
                    vector, error_code, cr2 = Vector.DF, 0, 0
                else:
                    vector, error_code, cr2 = second.vector, second.error_code, second.cr2
                if software:
                    # The fault is the INT instruction's, which did not run.
                    rip, software = int_rip, False

    def _read(self, vaddr: int, length: int) -> bytes:
        try:
            return self.read(vaddr, length)
        except Fault as f:
            raise _Raised(f.vector, f.error_code, f.vaddr) from None

    def _push_frame(self, vector: int, error_code: int | None, rip: int, software: bool) -> None:
        """SDM Vol.2A "INT n/INTO/INT3/INT1" (IA-32e mode), in its order of checks."""
        e = self.engine
        ext = 0 if software else 1
        gate_error = selector_error(vector << 3, True, ext)
        idt_base, idt_limit = e.idtr()
        if vector * IDT_GATE_SIZE + IDT_GATE_SIZE - 1 > idt_limit:
            raise _Raised(Vector.GP, gate_error)
        offset, selector, ist, gtype, present, dpl = decode_idt_gate(
            self._read(idt_base + vector * IDT_GATE_SIZE, IDT_GATE_SIZE))
        if gtype not in (GATE_INTERRUPT, GATE_TRAP):
            raise _Raised(Vector.GP, gate_error)
        old_cpl = e.cpl()
        if software and dpl < old_cpl:
            raise _Raised(Vector.GP, selector_error(vector << 3, True, 0))
        if not present:
            raise _Raised(Vector.NP, gate_error)
        if selector & ~3 == 0:
            raise _Raised(Vector.GP, ext)
        new_cpl = self._handler_cpl(selector, ext, old_cpl)
        rsp = e.reg("rsp")
        if ist:
            rsp = int.from_bytes(self._read(e.tr_base() + TSS_IST1 + 8 * (ist - 1), 8), "little")
        elif new_cpl < old_cpl:
            rsp = int.from_bytes(self._read(e.tr_base() + TSS_RSP0 + 8 * new_cpl, 8), "little")
        rsp &= ~0xF
        frame = [e.reg("ss"), e.reg("rsp"), e.reg("rflags"), e.reg("cs"), rip]
        if error_code is not None and vector in HAS_ERROR_CODE:
            frame.append(error_code)
        for value in frame:
            rsp = (rsp - 8) & (2**64 - 1)
            try:
                self.write(rsp, (value & (2**64 - 1)).to_bytes(8, "little"))
            except Fault as f:
                raise _Raised(f.vector, f.error_code, f.vaddr) from None
        flags = e.reg("rflags") & ~(RFLAGS.TF | RFLAGS.NT | RFLAGS.RF | RFLAGS.VM)
        if gtype == GATE_INTERRUPT:
            flags &= ~RFLAGS.IF
        e.set_reg("rflags", flags)
        e.set_reg("cs", (selector & ~3) | new_cpl)
        if new_cpl != old_cpl:
            e.set_reg("ss", new_cpl)      # a NULL selector with RPL = CPL
            e.set_cpl(new_cpl)
        e.set_reg("rsp", rsp)
        e.set_reg("rip", offset)

    def _handler_cpl(self, selector: int, ext: int, cpl: int) -> int:
        """The privilege level the handler runs at: its code segment's DPL,
        from the GDT, which may not be less privileged than `cpl` (SDM
        Vol.3A §6.12.1.1)."""
        error = selector_error(selector & ~3, False, ext)
        gdt_base, gdt_limit = self.engine.gdtr()
        if (selector | 7) > gdt_limit:
            raise _Raised(Vector.GP, error)
        desc = int.from_bytes(self._read(gdt_base + (selector & ~7), 8), "little")
        dpl = desc >> 45 & 3
        if dpl > cpl:
            raise _Raised(Vector.GP, error)
        if not desc >> 47 & 1:
            raise _Raised(Vector.NP, error)
        return dpl
