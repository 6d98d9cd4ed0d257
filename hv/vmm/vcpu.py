"""A virtual CPU: the engine's hooks turned into exits, exception delivery
through the guest's IDT, and the run loop of one time slice.

Invariant: after every slice in which QEMU raised an exception, its
in-flight exception state is cleared (unicorn#1883), so each guest fault is
seen as itself, never as #DF.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import asm
from ..arch.paging import PAGE_SIZE
from ..arch.vmx import ExitReason, cr_access_qualification
from ..arch.x86 import (CR4, GATE_INTERRUPT, GATE_TRAP, HAS_ERROR_CODE, IDT_GATE_SIZE, MSR_EFER,
                       RFLAGS, TSS_IST1, TSS_RSP0, Vector, causes_double_fault, decode_idt_gate,
                       mov_to_cr_faults)
from ..hw.engine import Engine
from .exits import Exit, dispatch, io_qualification, PORT_CONSOLE_LSR
from ..hw.intercept import MAX_INSN, candidate_starts, decode, ends_open
from ..hw.walker import FETCH, READ, WRITE, EmulateWrite, Fault, GeneralProtection, PageFault
from ..stats import Stats

VMCALL = b"\x0f\x01\xc1"
HLT = 0xF4


class _DeliveryFault(Exception):
    """Delivering an exception raised another one (SDM Vol.3A §6.15)."""

    def __init__(self, vector: int, error_code: int = 0, cr2: int = 0):
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


@dataclass
class _CodePage:
    """A virtual code page whose intercepted instructions are hooked."""
    frame: int
    data: bytes
    hooked: set[int] = field(default_factory=set)     # offsets with a code hook
    tail: bool = True       # an intercepted instruction may run into the next page


class VCpu:
    def __init__(self, vm, index: int):
        self.vm, self.index = vm, index
        self.stats = Stats()
        self.engine = Engine(vm.mem.host_addr, vm.mem.size, python_mmu=vm.mmu_mode != "qemu")
        self._hflags = self.engine.hflags     # CPL in bits 1:0, read on every fill
        self.mmu = vm.make_mmu(self)
        if self.mmu.tlb is not None:
            self.mmu.tlb.attach(self.mmu.asid, self.engine)
        self.halted = False
        self._pending: tuple[Fault, int] | None = None   # a fill's fault and its access
        self._stop = False                        # a handler asked the slice to end
        self._faulted = False                     # QEMU raised an exception this slice
        self._code: dict[int, _CodePage] = {}     # virtual page -> scan
        self._code_frames = vm.code_frames        # the VM's code frames
        self._written: dict[int, bool] = {}       # frame -> written since this vCPU scanned it
        self._decoded: dict[int, object] = {}
        self._tsc_after: tuple[int, int] | None = None   # (next RIP, TSC) of an RDTSC
        self._tsc_hooks: set[int] = set()
        e = self.engine
        if e.python_mmu:
            e.on_fill(self._fill)
        e.on_out(self._out)
        e.on_in(self._in)
        e.on_interrupt(self._interrupt)
        e.on_invalid(self._invalid)

    # -- hooks -------------------------------------------------------------
    def _fill(self, vaddr: int, access: int):
        try:
            paddr, perms = self.mmu.fill(vaddr, access, self._hflags.value & 3 == 3)
        except Fault as fault:
            # Unicorn stops at the faulting instruction, before it changed
            # anything, and keeps the access's address (run() reads it).
            self._pending = (fault, access)
            return None
        except EmulateWrite as em:
            self._pending = (em, access)
            return None
        if access == FETCH:
            self._scan(vaddr & ~(PAGE_SIZE - 1), paddr)
        elif paddr in self._code_frames:
            if access == WRITE:
                # Revoke X from every alias on every vCPU before the code changes.
                self.vm.code_written(paddr, by=self.engine)
            else:
                perms &= ~2
        return paddr, perms

    def _scan(self, vpage: int, frame: int) -> None:
        """Hook the intercepted instructions of a code page (see hv/hw/intercept.py).

        Invariant: while some alias may fetch from a code frame, none may
        write it; a write first flushes Unicorn's TLB, and the next fetch
        finds the page changed and scans it again.
        """
        page = self._code.get(vpage)
        written = self._written.get(frame)
        if written is not False:
            # New to this vCPU, or written since: no alias on any vCPU may
            # keep W on it now.
            for cpu in self.vm.vcpus:
                cpu.engine.flush_tlb()
        if written:
            # What this engine translated from it before the writes goes
            # (VM.code_written dropped the others'; QEMU missed such stores:
            # test_fuzz.py, test_regression_code_written_on_a_code_frame).
            self.engine.invalidate_code(frame, PAGE_SIZE, now=True)
        elif written is False and page is not None and page.frame == frame and not page.tail:
            return      # unwritten since its scan, and whole without the next page
        self._code_frames.add(frame)
        self._written[frame] = False
        nxt = self.mmu.peek(vpage + PAGE_SIZE)
        data = self.vm.mem.read(frame, PAGE_SIZE)
        if nxt is not None:
            data += self.vm.mem.read(nxt, MAX_INSN)
        if page is None:
            page = self._code[vpage] = _CodePage(frame, b"")
        elif page.frame == frame and page.data == data:
            return
        page.frame, page.data, page.tail = frame, data, ends_open(data, PAGE_SIZE)
        for off in page.hooked:
            self._decoded.pop(vpage + off, None)
        # Hooks are only ever added: deleting one invalidates translated
        # blocks, which re-enters the fill callback. A hook left on bytes
        # that changed decodes them afresh and finds nothing to intercept.
        for off in candidate_starts(data, PAGE_SIZE):
            if off not in page.hooked:
                page.hooked.add(off)
                self.engine.hook_code_at(vpage + off, self._intercept)

    def code_written(self, frame: int) -> None:
        """Code frame `frame` may have changed (VM.code_written): scan it again."""
        if frame in self._written:
            self._written[frame] = True

    def _intercept(self, rip: int) -> None:
        """Before a MOV to CR, INVLPG or WRMSR runs: tell the MMU. Before
        RDTSC or RDTSCP: arrange its result (_after_tsc)."""
        ins = self._decoded.get(rip)
        if ins is None:
            ins = self._decoded[rip] = decode(self.read_code(rip), rip) or False
        if not ins:
            return      # not one of ours
        e = self.engine
        if ins.kind in ("rdtsc", "rdtscp"):
            if e.cpl() == 0 or not self.mmu.cr4 & CR4.TSD:      # else it is about to #GP
                self._tsc_after = (rip + ins.size, self.stats.counters["insns"] + e.started() - 1)
                if rip + ins.size not in self._tsc_hooks:
                    self._tsc_hooks.add(rip + ins.size)
                    e.hook_code_at(rip + ins.size, self._after_tsc)
            return
        if e.cpl() != 0:
            return      # about to #GP
        if ins.kind == "mov_cr":
            value = e.reg(ins.reg)
            if mov_to_cr_faults(ins.cr, value, self.mmu.cr4):
                # Refused before it runs (Unicorn would load it): #GP(0) at it.
                self._pending = (GeneralProtection(), READ)
                self.request_stop()
                return
            ex = Exit(ExitReason.CR_ACCESS, cr_access_qualification(ins.cr, 0), rip, ins.size,
                      value=value)
        elif ins.kind == "invlpg":
            ex = Exit(ExitReason.INVLPG, self._effective_address(ins, rip), rip, ins.size)
        else:
            ecx = e.reg("rcx") & 0xFFFF_FFFF
            if ecx != MSR_EFER:
                return
            value = (e.reg("rdx") & 0xFFFF_FFFF) << 32 | (e.reg("rax") & 0xFFFF_FFFF)
            ex = Exit(ExitReason.MSR_WRITE, ecx, rip, ins.size, value=value)
        dispatch(self, ex)

    def _after_tsc(self, rip: int) -> None:
        """After RDTSC/RDTSCP: EDX:EAX is the vCPU's time stamp counter, the
        instructions it started before the RDTSC, the same on every run
        (QEMU's would read the host's clock)."""
        if self._tsc_after is not None and self._tsc_after[0] == rip:
            tsc = self._tsc_after[1]
            self.engine.set_reg("rax", tsc & 0xFFFF_FFFF)
            self.engine.set_reg("rdx", tsc >> 32 & 0xFFFF_FFFF)
        self._tsc_after = None

    def _effective_address(self, ins, rip: int) -> int:
        e = self.engine
        ea = ins.disp
        if ins.base == "rip":
            ea += rip + ins.size
        elif ins.base:
            ea += e.reg(ins.base)
        if ins.index:
            ea += e.reg(ins.index) * ins.scale
        if ins.segment in ("fs", "gs"):
            ea += e.reg(f"{ins.segment}_base")
        return ea & (2**64 - 1)

    def _out(self, port: int, size: int, value: int) -> None:
        rip = self.engine.reg("rip")
        dispatch(self, Exit(ExitReason.IO_INSTRUCTION, io_qualification(port, size, False), rip,
                            value=value))
        if self.vm.ended:
            self.request_stop()

    def _in(self, port: int, size: int) -> int:
        dispatch(self, Exit(ExitReason.IO_INSTRUCTION, io_qualification(port, size, True),
                            self.engine.reg("rip")))
        if port == PORT_CONSOLE_LSR:
            return 0x60     # transmitter holding register and shift register empty
        return (1 << (8 * size)) - 1    # no device: the bus floats high

    def _interrupt(self, vector: int) -> None:
        """QEMU raised an exception, or ran INT n; RIP is the return address.
        INT n pushes no error code, leaves CR2, and is no exception the
        VMCS exception bitmap sees (SDM Vol.3C §26.2): delivered directly."""
        self._faulted = True
        e = self.engine
        if e.software_interrupt():
            self.deliver(vector, None, e.reg("rip"), software=True)
        else:
            err = e.pending_error_code() if vector in HAS_ERROR_CODE else None
            cr2 = e.reg("cr2") if vector == Vector.PF else 0
            dispatch(self, Exit(ExitReason.EXCEPTION_NMI, cr2, e.reg("rip"), value=vector,
                                error_code=err))
        self.request_stop()

    def _invalid(self) -> bool:
        rip = self.engine.reg("rip")
        if self.read_code(rip, 3) == VMCALL:
            dispatch(self, Exit(ExitReason.VMCALL, 0, rip, 3))
            if self.vm.ended:
                self.request_stop()
        else:
            self._faulted = True
            dispatch(self, Exit(ExitReason.EXCEPTION_NMI, 0, rip, value=Vector.UD))
            self.request_stop()
        return True

    # -- state ---------------------------------------------------------------
    def flush_tlb(self) -> None:
        """Flush this physical CPU's whole TLB (a VM entry or exit without VPIDs)."""
        self.mmu.tlb.flush_all()
        self.stats.counters["tlb_flush"] += 1

    def request_stop(self) -> None:
        self._stop = True
        self.engine.stop()

    def halt(self) -> None:
        self.halted = True
        self.request_stop()

    def read_code(self, vaddr: int, length: int = MAX_INSN, tlb: bool = True) -> bytes:
        """Up to `length` bytes at `vaddr`, as far as they are mapped (no
        side effects; `tlb`: as MMU.peek)."""
        out = b""
        while len(out) < length:
            paddr = self.mmu.peek(vaddr + len(out), tlb)
            if paddr is None:
                break
            n = min(length - len(out), PAGE_SIZE - (paddr & (PAGE_SIZE - 1)))
            out += self.vm.mem.read(paddr, n)
        return out

    # -- one slice -----------------------------------------------------------
    def run(self, budget: int) -> int:
        """Run until an exit ends the slice or `budget` instructions started."""
        self._stop = self._faulted = False
        self._pending = None
        e = self.engine
        ran = e.run(e.reg("rip"), budget)
        self.stats.counters["insns"] += ran
        if self._pending is not None:
            (event, access), self._pending = self._pending, None
            if isinstance(event, EmulateWrite):
                ran += self.mmu.emulate_write(self, event)
            else:
                self._faulted = True
                rip = e.reg("rip")
                cr2 = 0
                if isinstance(event, PageFault):
                    # A fetch fault's address: the target itself, or the start
                    # of the next page for an instruction that runs into it.
                    cr2 = max(rip, event.vaddr) if access == FETCH else e.fault_address()
                # Delivered by the CPU (native) or injected by the VMM after
                # the exit it already counted (shadow): no exit of its own.
                self.deliver(event.vector, event.error_code, rip, cr2)
        elif not self._stop and ran < budget:
            # emu_start returned by itself: the guest ran HLT (Unicorn ends
            # emulation there silently).
            rip = e.reg("rip")
            if self.read_code(rip - 1, 1) != bytes([HLT]):
                raise RuntimeError(f"unicorn stopped at {rip:#x} for no known reason")
            dispatch(self, Exit(ExitReason.HLT, 0, rip - 1, 1))
        if self._faulted:
            e.clear_exception()
        return ran

    # -- exception delivery (SDM Vol.3A §6.14: 64-bit mode) -------------------
    def deliver(self, vector: int, error_code: int | None, rip: int, cr2: int = 0,
                software: bool = False) -> None:
        """Deliver an exception (or, `software`, an INT n) through the guest
        IDT, as the CPU would, resolving faults during delivery into #DF and
        #DF into a triple fault."""
        self._tsc_after = None      # an RDTSC's next instruction will not run now
        c = self.stats.counters
        while True:
            if vector == Vector.PF and not software:
                c["pf_guest"] += 1
                self.engine.set_reg("cr2", cr2)
            else:
                c["exceptions"] += 1
            try:
                self._push_frame(vector, error_code, rip)
                return
            except _DeliveryFault as second:
                if vector == Vector.DF:
                    dispatch(self, Exit(ExitReason.TRIPLE_FAULT, 0, rip))
                    self.request_stop()
                    return
                software = False
                if causes_double_fault(vector, second.vector):
                    vector, error_code, cr2 = Vector.DF, 0, 0
                else:
                    vector, error_code, cr2 = second.vector, second.error_code, second.cr2

    def _linear(self, vaddr: int, access: int) -> int:
        try:
            return self.mmu.translate(vaddr, access, False)
        except Fault as f:
            raise _DeliveryFault(f.vector, f.error_code, f.vaddr) from None

    def _write_linear(self, vaddr: int, data: bytes) -> None:
        """Write within one page, as the CPU does when it pushes a frame."""
        try:
            hpa = self._linear(vaddr, WRITE)
        except EmulateWrite as em:
            self.mmu.vmm_write(em, data)    # onto a shadowed guest page table
            return
        self.vm.mem.write(hpa, data)

    def _read_linear(self, vaddr: int, length: int) -> bytes:
        out = b""
        while len(out) < length:
            paddr = self._linear(vaddr + len(out), READ)
            n = min(length - len(out), PAGE_SIZE - (paddr & (PAGE_SIZE - 1)))
            out += self.vm.mem.read(paddr, n)
        return out

    def _push_frame(self, vector: int, error_code: int | None, rip: int) -> None:
        e = self.engine
        ext = 1     # error codes of delivery faults: EXT bit, IDT bit (SDM §6.13)
        idt_base, idt_limit = e.idtr()
        if vector * IDT_GATE_SIZE + IDT_GATE_SIZE - 1 > idt_limit:
            raise _DeliveryFault(Vector.GP, vector * 8 + 2 + ext)
        offset, selector, ist, gtype, present, _dpl = decode_idt_gate(
            self._read_linear(idt_base + vector * IDT_GATE_SIZE, IDT_GATE_SIZE))
        if gtype not in (GATE_INTERRUPT, GATE_TRAP) or selector & ~3 == 0:
            raise _DeliveryFault(Vector.GP, vector * 8 + 2 + ext)
        if not present:
            raise _DeliveryFault(Vector.NP, vector * 8 + 2 + ext)
        old_cpl = e.cpl()
        new_cpl = self._code_dpl(selector)
        rsp = e.reg("rsp")
        if ist:
            rsp = int.from_bytes(self._read_linear(e.tr_base() + TSS_IST1 + 8 * (ist - 1), 8), "little")
        elif new_cpl < old_cpl:
            rsp = int.from_bytes(self._read_linear(e.tr_base() + TSS_RSP0 + 8 * new_cpl, 8), "little")
        rsp &= ~0xF
        frame = [e.reg("ss"), e.reg("rsp"), e.reg("rflags"), e.reg("cs"), rip]
        if error_code is not None and vector in HAS_ERROR_CODE:
            frame.append(error_code)
        for value in frame:
            rsp = (rsp - 8) & (2**64 - 1)
            self._write_linear(rsp, (value & (2**64 - 1)).to_bytes(8, "little"))
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

    def _code_dpl(self, selector: int) -> int:
        gdt_base, gdt_limit = self.engine.gdtr()
        if (selector | 7) > gdt_limit:
            raise _DeliveryFault(Vector.GP, selector & ~3)
        desc = int.from_bytes(self._read_linear(gdt_base + (selector & ~7), 8), "little")
        if not desc >> 47 & 1:
            raise _DeliveryFault(Vector.NP, selector & ~3)
        return desc >> 45 & 3

    def describe_fault(self, ex: Exit) -> str:
        # Through the tables, as the oracle reads it: the guest may have
        # changed them since the TLB cached the page.
        code = self.read_code(ex.rip, tlb=False)
        return f"triple fault at rip={ex.rip:#x}: {asm.describe_insn(code, ex.rip)}"
