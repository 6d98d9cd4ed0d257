"""Exception and interrupt delivery through the guest's IDT (SDM Vol.3A
§6.12-§6.15), as the CPU does it: Unicorn never does. In IA-32e mode
through 16-byte gates (§6.14), in protected mode through 8-byte gates
(§6.12), in real mode through the interrupt vector table (§20.1.4). Task
gates are not modelled (no task switch): delivering through one is #GP,
named in the chain. Outside IA-32e mode stack segments are taken as flat
(base 0), as every kernel hv boots has them.

A fault while delivering becomes the exception delivered instead, or #DF
(Table 6-5); a fault while delivering #DF is a triple fault, which the
caller turns into the TRIPLE_FAULT exit, with the chain of events that led
to it (each a `Step`: what was delivered, and why that failed). Every linear
access goes through the two functions the vCPU hands over, like any access
the CPU makes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from ..arch.x86 import (GATE_INTERRUPT, GATE_INTERRUPT16, GATE_TASK, GATE_TRAP, GATE_TRAP16,
                        HAS_ERROR_CODE, IDT_GATE_SIZE, IVT_ENTRY_SIZE, LEGACY_GATE_SIZE, RFLAGS,
                        TSS32_ESP0, TSS_IST1, TSS_RSP0, Vector, causes_double_fault,
                        decode_idt_gate, decode_legacy_gate)
from ..events import Fault


# RFLAGS bits a handler starts with clear (as ints: IntFlag arithmetic is
# slow on this path).
_ENTER_CLEARS = int(RFLAGS.TF | RFLAGS.NT | RFLAGS.RF | RFLAGS.VM)
_INTERRUPT_GATE_CLEARS = _ENTER_CLEARS | int(RFLAGS.IF)


class Step(NamedTuple):
    """One event of a chain that ended in a triple fault: the event whose
    delivery failed (its error code, None if it has none; CR2 for a #PF)
    and why it failed."""
    vector: int
    error_code: int | None
    cr2: int
    why: str

    @property
    def name(self) -> str:
        """`#UD`, `#GP(0x32)`, `#PF(0x2) at 0x7000`; `vector 0x80` (INT 0x80)."""
        try:
            name = f"#{Vector(self.vector).name}"
        except ValueError:
            name = f"vector {self.vector:#x}"
        if self.error_code is None:
            return name
        at = f" at {self.cr2:#x}" if self.vector == Vector.PF else ""
        return f"{name}({self.error_code:#x}){at}"

    def data(self) -> dict:
        """The step as plain data (CR2 only for a #PF)."""
        d = {"vector": self.vector, "name": self.name, "error_code": self.error_code,
             "why": self.why}
        if self.vector == Vector.PF:
            d["cr2"] = self.cr2
        return d


class _Raised(Exception):
    """Delivering raised another exception (SDM Vol.3A §6.15); `why` says
    what failed, for the chain of a triple fault."""

    def __init__(self, vector: int, error_code: int, why: str, cr2: int = 0):
        self.vector, self.error_code, self.why, self.cr2 = vector, error_code, why, cr2


def selector_error(index: int, idt: bool, ext: int) -> int:
    """An error code that names a descriptor (SDM Vol.3A §6.13, Figure 6-7):
    the index, IDT (bit 1: an IDT gate), EXT (bit 0: while delivering an
    event external to the program)."""
    return index | (2 if idt else 0) | ext


class Delivery:
    """Delivers events for one vCPU. `read(vaddr, n) -> bytes` and
    `write(vaddr, data, first)` are the CPU's linear accesses (supervisor;
    a write within the page of `first`, the address translated, which a
    fault names), each raising `Fault`."""

    def __init__(self, engine, read: Callable[[int, int], bytes],
                 write: Callable[[int, bytes, int], None], counters):
        self.engine, self.read, self.write, self.counters = engine, read, write, counters

    def deliver(self, vector: int, error_code: int | None, rip: int, cr2: int = 0,
                int_rip: int | None = None, external: bool = False) -> list[Step] | None:
        """Deliver `vector`, its frame returning to `rip`. `int_rip` makes it
        a software interrupt (INT n or INT3 at that address, returning to
        `rip`): the gate's DPL is checked, no error code is pushed, CR2 is
        left alone, and a fault while delivering it is the instruction's.
        `external`: an interrupt from the local APIC (counted apart).
        None when delivered; a triple fault returns the chain it went
        through, #DF last."""
        c = self.counters
        software = int_rip is not None
        chain: list[Step] = []
        while True:
            if vector == Vector.PF and not software:
                c["pf_guest"] += 1
                self.engine.set_reg("cr2", cr2)
            elif external:
                c["interrupts"] += 1
                external = False        # a fault delivering it is an exception
            else:
                c["exceptions"] += 1
            try:
                self._push_frame(vector, error_code, rip, software)
                return None
            except _Raised as second:
                chain.append(Step(vector, error_code if vector in HAS_ERROR_CODE else None,
                                  cr2 if vector == Vector.PF and not software else 0, second.why))
                if vector == Vector.DF:
                    return chain
                if not software and causes_double_fault(vector, second.vector):
                    vector, error_code, cr2 = Vector.DF, 0, 0
                else:
                    vector, error_code, cr2 = second.vector, second.error_code, second.cr2
                if software:
                    # The fault is the INT instruction's, which did not run.
                    rip, software = int_rip, False

    def _read(self, vaddr: int, length: int, what: str) -> bytes:
        try:
            return self.read(vaddr, length)
        except Fault as f:
            raise _Raised(f.vector, f.error_code, _faulted(f, f"reading {what}"), f.vaddr) from None

    def _gate_bytes(self, vector: int, size: int, ext: int) -> bytes:
        """The IDT's entry for `vector`, `size` bytes each, within its limit."""
        idt_base, idt_limit = self.engine.idtr()
        # The reasons (`why`) name no vector: the chain's step does.
        if vector * size + size - 1 > idt_limit:
            raise _Raised(Vector.GP, selector_error(vector << 3, True, ext),
                          "no IDT loaded" if idt_base == idt_limit == 0
                          else f"the gate is beyond the IDT's limit {idt_limit:#x}")
        return self._read(idt_base + vector * size, size, "the IDT gate")

    def _check_gate(self, vector: int, software: bool, ext: int, selector: int, gtype: int,
                    present: bool, dpl: int, types: tuple[int, ...]) -> tuple[int, int]:
        """The checks of SDM Vol.2A "INT n/INTO/INT3/INT1", in its order:
        (the CPL now, the handler's)."""
        gate_error = selector_error(vector << 3, True, ext)
        if gtype not in types:
            why = ("a task gate (hv models no task switch)" if gtype == GATE_TASK
                   else f"the gate's type {gtype:#x} is no interrupt or trap gate")
            raise _Raised(Vector.GP, gate_error, why)
        old_cpl = self.engine.cpl()
        if software and dpl < old_cpl:
            raise _Raised(Vector.GP, selector_error(vector << 3, True, 0),
                          f"the gate's DPL {dpl} is below CPL {old_cpl}")
        if not present:
            raise _Raised(Vector.NP, gate_error, "the gate is not present")
        if selector & ~3 == 0:
            raise _Raised(Vector.GP, ext, "the gate's code selector is NULL")
        return old_cpl, self._handler_cpl(selector, ext, old_cpl)

    def _push(self, addr: int, data: bytes, first: int) -> None:
        try:
            self.write(addr, data, first)
        except Fault as f:
            raise _Raised(f.vector, f.error_code, _faulted(f, "pushing the exception frame"),
                          f.vaddr) from None

    def _push_all(self, sp: int, values: list[int], size: int, mask: int) -> int:
        """Push `values`, first to last, below `sp`; the new SP. Where they
        share the first push's page, one write (a fault names the first
        push's address, as pushing one by one would); else one by one."""
        first, low = (sp - size) & mask, (sp - size * len(values)) & mask
        if low <= first and low >> 12 == first >> 12:
            data = b"".join((v & ((1 << 8 * size) - 1)).to_bytes(size, "little")
                            for v in reversed(values))
            self._push(low, data, first)
            return low
        for value in values:
            sp = (sp - size) & mask
            self._push(sp, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"), sp)
        return sp

    def _push_frame(self, vector: int, error_code: int | None, rip: int, software: bool) -> None:
        mode = self.engine.cpu_mode()
        if mode == "long":
            self._deliver_long(vector, error_code, rip, software)
        elif mode == "protected":
            self._deliver_protected(vector, error_code, rip, software)
        else:
            self._deliver_real(vector, rip)

    def _deliver_long(self, vector: int, error_code: int | None, rip: int,
                      software: bool) -> None:
        """IA-32e mode (SDM Vol.3A §6.14)."""
        e = self.engine
        ext = 0 if software else 1
        offset, selector, ist, gtype, present, dpl = decode_idt_gate(
            self._gate_bytes(vector, IDT_GATE_SIZE, ext))
        old_cpl, new_cpl = self._check_gate(vector, software, ext, selector, gtype, present, dpl,
                                            (GATE_INTERRUPT, GATE_TRAP))
        rsp = e.reg("rsp")
        if ist:
            rsp = int.from_bytes(self._read(e.tr_base() + TSS_IST1 + 8 * (ist - 1), 8,
                                            "the TSS's IST pointer"), "little")
        elif new_cpl < old_cpl:
            rsp = int.from_bytes(self._read(e.tr_base() + TSS_RSP0 + 8 * new_cpl, 8,
                                            "the TSS's RSP0"), "little")
        rsp &= ~0xF
        frame = [e.reg("ss"), e.reg("rsp"), e.reg("rflags"), e.reg("cs"), rip]
        if error_code is not None and vector in HAS_ERROR_CODE:
            frame.append(error_code)
        rsp = self._push_all(rsp, frame, 8, 2**64 - 1)
        # SS: a NULL selector with RPL = CPL.
        self._enter(selector, new_cpl, new_cpl if new_cpl != old_cpl else None, rsp, offset,
                    gtype == GATE_INTERRUPT)

    def _deliver_protected(self, vector: int, error_code: int | None, rip: int,
                           software: bool) -> None:
        """Protected mode (SDM Vol.3A §6.12.1): 32-bit gates push 4-byte
        values, 16-bit ones 2-byte; to a more privileged handler on the
        stack the 32-bit TSS names, the old SS and ESP first."""
        e = self.engine
        ext = 0 if software else 1
        offset, selector, gtype, present, dpl = decode_legacy_gate(
            self._gate_bytes(vector, LEGACY_GATE_SIZE, ext))
        old_cpl, new_cpl = self._check_gate(vector, software, ext, selector, gtype, present, dpl,
                                            (GATE_INTERRUPT, GATE_TRAP, GATE_INTERRUPT16,
                                             GATE_TRAP16))
        size = 4 if gtype in (GATE_INTERRUPT, GATE_TRAP) else 2
        esp, new_ss = e.reg("rsp") & 0xFFFF_FFFF, None
        frame = [e.reg("rflags"), e.reg("cs"), rip]
        if new_cpl < old_cpl:
            raw = self._read(e.tr_base() + TSS32_ESP0 + 8 * new_cpl, 6, "the TSS's ESP0 and SS0")
            esp, new_ss = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")
            ss_desc = int.from_bytes(self._read(e.gdtr()[0] + (new_ss & ~7), 8,
                                                "the stack segment descriptor"), "little")
            frame = [e.reg("ss"), e.reg("rsp"), *frame]
        if error_code is not None and vector in HAS_ERROR_CODE:
            frame.append(error_code)
        esp = self._push_all(esp, frame, size, 0xFFFF_FFFF)
        self._enter(selector, new_cpl, new_ss, esp, offset if size == 4 else offset & 0xFFFF,
                    gtype in (GATE_INTERRUPT, GATE_INTERRUPT16))
        if new_ss is not None:
            e.stack_flag(ss_desc)

    def _deliver_real(self, vector: int, rip: int) -> None:
        """Real mode (SDM Vol.3A §20.1.4): FLAGS, CS and IP on SS:SP, then
        the vector's segment:offset, IF, TF and AC clear."""
        e = self.engine
        raw = self._gate_bytes(vector, IVT_ENTRY_SIZE, 1)
        sp, ss_base = e.reg("rsp") & 0xFFFF, e.reg("ss") << 4
        for value in (e.reg("rflags"), e.reg("cs"), rip):
            sp = (sp - 2) & 0xFFFF
            self._push(ss_base + sp, (value & 0xFFFF).to_bytes(2, "little"), ss_base + sp)
        flags = e.reg("rflags") & ~(RFLAGS.IF | RFLAGS.TF | RFLAGS.AC)
        e.set_reg("rflags", flags)
        e.set_reg("cs", int.from_bytes(raw[2:], "little"))
        e.set_reg("rsp", e.reg("rsp") & ~0xFFFF | sp)
        e.set_reg("rip", int.from_bytes(raw[:2], "little"))

    def _enter(self, selector: int, cpl: int, ss: int | None, sp: int, ip: int,
               interrupt_gate: bool) -> None:
        """Run the handler: RFLAGS (an interrupt gate clears IF), CS at
        `cpl`, the stack (SS only if the privilege changed), RIP."""
        e = self.engine
        flags = e.reg("rflags") & ~(_INTERRUPT_GATE_CLEARS if interrupt_gate else _ENTER_CLEARS)
        e.set_reg("rflags", flags)
        e.set_reg("cs", (selector & ~3) | cpl)
        if ss is not None:
            e.set_reg("ss", ss)
            e.set_cpl(cpl)
        e.set_reg("rsp", sp)
        e.set_reg("rip", ip)

    def _handler_cpl(self, selector: int, ext: int, cpl: int) -> int:
        """The privilege level the handler runs at: its code segment's DPL,
        from the GDT, which may not be less privileged than `cpl` (SDM
        Vol.3A §6.12.1.1)."""
        error = selector_error(selector & ~3, False, ext)
        gdt_base, gdt_limit = self.engine.gdtr()
        if (selector | 7) > gdt_limit:
            raise _Raised(Vector.GP, error, f"code selector {selector:#x} is beyond the GDT's "
                          f"limit {gdt_limit:#x}")
        desc = int.from_bytes(self._read(gdt_base + (selector & ~7), 8,
                                         "the handler's code segment descriptor"), "little")
        dpl = desc >> 45 & 3
        if dpl > cpl:
            raise _Raised(Vector.GP, error, f"code segment {selector:#x} has DPL {dpl}, "
                          f"less privileged than CPL {cpl}")
        if not desc >> 47 & 1:
            raise _Raised(Vector.NP, error, f"code segment {selector:#x} is not present")
        return dpl


def _faulted(f: Fault, doing: str) -> str:
    return f"#{Vector(f.vector).name}({f.error_code:#x}) at {f.vaddr:#x} {doing}"
