"""A virtual CPU: the one place that catches what the hardware raises.

The engine's hooks (the TLB fill, I/O, INT n and exceptions, invalid
opcodes, and the instructions code scanning reports) become events. An
event the mode intercepts is a VM exit: dispatched to its handler
(hv.vmm.exits). Any other the hardware carries out itself: a MOV to CR
runs on the hardware MMU, an exception is delivered through the guest's
IDT (hv.hw.delivery). An exit raised in the middle of an access (a TLB
fill, a linear access of exception delivery) is dispatched and the access
tried again, as after VM entry.

Invariants:
- The same exit never comes back right after its handler ran: a handler
  that fixed nothing is an hv bug (InvariantError), never the guest's fault.
  (A cold two-dimensional walk takes several EPT violations in a row, one
  per frame: the guard is not "one retry".)
- After every slice in which QEMU raised an exception, its in-flight
  exception state is cleared (unicorn#1883), so each guest fault is seen as
  itself, never as #DF.
"""
from __future__ import annotations

from .. import asm
from ..cost import CycleClock
from ..arch.paging import PAGE_SIZE, PFErr, is_canonical
from ..arch.vmx import ExitReason, cr_access_qualification
from ..arch.x86 import (CR0, CR4, HAS_ERROR_CODE, MSR_EFER, NOFLUSH, RFLAGS, Vector,
                        mov_to_cr_faults)
from ..errors import InvariantError
from ..events import EmulateWrite, Exit, Fault, GeneralProtection, PageFault, VmExit
from ..devices.lapic import APIC_DEFAULT_BASE, LocalApic
from ..hw.codescan import CodeScan
from ..hw.cpu import Msrs
from ..hw.delivery import Delivery
from ..hw.engine import Engine
from ..hw.intercept import MAX_INSN, Intercepted, insn_size, straight_run
from ..hw.mmu import PROT_R, PROT_W
from ..hw.after import After, edx_eax
from ..hw.tsc import Tsc
from ..hw.walker import FETCH, READ, WRITE
from ..stats import Stats
from .exits import dispatch, io_qualification

VMCALL = b"\x0f\x01\xc1"
# The #PF error code of an access to a device page under shadow paging: P
# and RSVD, as on KVM's reserved-bit MMIO sptes.
_MMIO_PF_READ = int(PFErr.P | PFErr.RSVD)
_MMIO_PF_WRITE = _MMIO_PF_READ | int(PFErr.W)
_IF = int(RFLAGS.IF)
_PCIDE, _PKE = int(CR4.PCIDE), int(CR4.PKE)
# LGDT, LIDT, LLDT, LTR; and the access byte (P and type) LLDT and LTR
# load: an LDT, an available 64-bit TSS (SDM Vol.3A Table 3-2).
_TABLE_LOADS = frozenset({"lgdt", "lidt", "lldt", "ltr"})
_SYSTEM_DESCRIPTOR = {"lldt": 0x82, "ltr": 0x89}
# While an interrupt waits for RFLAGS.IF, each slice runs to the next
# instruction that may set IF or branch (intercept.straight_run), so the
# interrupt comes exactly when the window opens; after _EXACT_WINDOW such
# slices they double (bounded slowdown for a guest that keeps IF clear).
_EXACT_WINDOW = 64
# Bytes of code straight_run decodes: a few instructions' worth.
_RUN_BYTES = 64
HLT = 0xF4
INT3 = 0xCC
# What a crash report shows, in this order (and EFER).
REGISTERS = ("rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 "
             "rip rflags cs ss cr0 cr2 cr3 cr4").split()


class _Ended(Exception):
    """The VM ended while an access was in flight (a handler finished it)."""


class VCpu:
    def __init__(self, vm, index: int):
        self.vm, self.index = vm, index
        self.mode = vm.mode
        self.stats = Stats()
        self.engine = e = Engine(vm.mem.host_addr, vm.mem.size, python_mmu=self.mode.tlb_model)
        vm.engines.append(e)
        self.mmu = self.mode.vcpu_mmu(vm, self)     # this vCPU's paging, as the VMM keeps it
        self.hw = self.mmu.hw                       # the CPU's MMU
        self._hflags = e.hflags                     # CPL in bits 1:0, read on every fill
        self.halted = False
        self.waiting_for_sipi = False
        self._pending: tuple[object, int] | None = None   # an access's event for the guest, and the access
        self._event: Fault | EmulateWrite | None = None   # what a handler recorded (inject)
        self._stop = False                        # a handler asked the slice to end
        self._faulted = False                     # QEMU raised an exception this slice
        self._running = False                     # inside the engine's run (hooks)
        self.trace = vm.config.trace              # hv.vmm.exits.Trace, or None
        self._chain = None                        # the last delivery's triple-fault chain
        self.crash: dict | None = None            # the triple fault's report, as data
        # Pages the instruction being emulated may write: virtual page ->
        # host frame. More than one when it writes across a page boundary
        # onto two write-protected guest tables (_emulate_write nests).
        self._emulating: dict[int, int] = {}
        self._exit_flush = not vm.config.asid and self.mode.tlb_model
        self._reload = self.mmu.reload          # None: nothing to reload
        self._check = vm.config.check_invariants
        self._code_frames = vm.code.frames
        self.idle = 0                             # cycles spent halted (the clock runs on)
        self._cycles = CycleClock(vm.profile, vm.config.mmu, self.stats)
        self.after = After(e)                     # results once an instruction ran
        self.tsc = Tsc(e, self.clock, self.after)
        self.apic = LocalApic(index, self.clock, self._send_ipi, bsp=index == 0)
        self._sent_ipi = False                    # this APIC write sent an IPI
        self.msrs = Msrs(e, self.tsc.now, self.apic, vm.cpu.linear_bits)
        self._blocked = 0                         # slices an interrupt waited for IF
        self.io_value = 0                         # what an IN's handler read
        self._mmio: list | None = None            # the device access in flight
        if vm.apic_hpa is not None:
            e.map_mmio(vm.apic_hpa, PAGE_SIZE, self._apic_read, self._apic_write)
            if self.mode.tlb_model:
                self.hw.devices = frozenset(vm.guest.devices.values())
        self.delivery = Delivery(e, self._read_linear, self._write_linear, self.stats.counters)
        if self.mode.tlb_model:
            self.hw.tlb.attach(self.hw.asid, e)
            self.code = CodeScan(e, vm.code, vm.mem.read, self.mmu.peek, self.read_code,
                                 self._insn, self.stats.counters)
            e.on_fill(self._fill)
        e.on_out(self._out)
        e.on_in(self._in)
        e.on_interrupt(self._interrupt)
        e.on_invalid(self._invalid)
        e.on_cpuid(self._cpuid)

    # -- the TLB fill: the hardware MMU, and what it raises -------------------
    def _fill(self, vaddr: int, access: int):
        if access == WRITE and self._emulating:
            hpa = self._emulating.get(vaddr & ~(PAGE_SIZE - 1))
            if hpa is not None:
                return hpa, PROT_R | PROT_W     # the one write being emulated
        user = self._hflags.value & 3 == 3
        if self.hw.smap:
            self.hw.ac = self.engine.alignment_check()
        try:
            paddr, perms = self.hw.fill(vaddr, access, user)
        except (VmExit, Fault) as raised:
            got = self._complete(raised, self.hw.fill, vaddr, access, user, True)
            if got is None:
                # Unicorn stops at the instruction, before it changed
                # anything, and keeps the access's address (run() reads it).
                self._pending = (self._take_event(), access)
                return None
            paddr, perms = got
        if access == FETCH:
            self.code.fetched(vaddr & ~(PAGE_SIZE - 1), paddr)
        elif paddr in self._code_frames:
            if access == WRITE:
                # Revoke X from every alias on every vCPU before the code changes.
                self.vm.code.written(paddr, paddr, PAGE_SIZE, by=self.engine,
                                     vpage=vaddr & ~(PAGE_SIZE - 1))
            else:
                perms &= ~PROT_W
        return paddr, perms

    def _complete(self, raised, access_fn, *retry_args):
        """Finish an access of the hardware's that raised `raised`: an exit
        is dispatched, and the access tried again (`access_fn(*retry_args)`)
        until it succeeds (its result) or the guest is to see an event
        first (None: `_take_event`). A fault the hardware raised is such an
        event: the guest's own."""
        last = None
        while True:
            if isinstance(raised, Fault):
                self._event = raised
                return None
            ex = raised.exit
            if ex == last:
                raise InvariantError(f"{ex.reason.name} came back right after its handler ran "
                                     f"(qualification {ex.qualification:#x}, value {ex.value:#x})")
            dispatch(self, ex)
            if self.vm.ended:
                raise _Ended
            if self._event is not None:
                return None
            last = ex
            try:
                return access_fn(*retry_args)
            except (VmExit, Fault) as again:
                raised = again

    def inject(self, event: Fault | EmulateWrite) -> None:
        """A handler's word on what the guest sees at the access in flight:
        a fault to deliver, or a write to emulate."""
        self._event = event

    def _take_event(self):
        event, self._event = self._event, None
        return event

    # -- events from the engine's hooks ---------------------------------------
    def event(self, ex: Exit) -> None:
        """An event the mode may intercept: an exit if it does, else the
        hardware's to carry out (an exception is delivered by `deliver`)."""
        if ex.reason in self.mmu.intercepts and not (
                ex.reason == ExitReason.INVLPG and self.hw.below_switch(ex.qualification)):
            dispatch(self, ex)
        elif ex.reason == ExitReason.CR_ACCESS:
            self.hw.mov_to_cr(ex.qualification & 0xF, ex.value)
        elif ex.reason == ExitReason.INVLPG:
            self.hw.invlpg(ex.qualification)
        elif ex.reason == ExitReason.MSR_WRITE:
            self.run_wrmsr(ex.qualification, ex.value)
        elif ex.reason == ExitReason.MSR_READ:
            self.run_rdmsr(ex.qualification, ex.rip, ex.insn_len)
        elif ex.reason == ExitReason.CPUID:
            self.run_cpuid()
        elif ex.reason == ExitReason.INVPCID:
            self.run_invpcid(ex, self.hw)
        else:
            raise InvariantError(f"no mode may leave {ex.reason.name} to the hardware")

    def _insn(self, rip: int, ins: Intercepted) -> None:
        """Before an intercepted instruction runs (hv.hw.codescan)."""
        e = self.engine
        if ins.kind in ("rdtsc", "rdtscp"):
            self.tsc.before(rip, ins.size, self.hw.cr4)
            return
        if ins.kind == "invpcid":
            self._invpcid(rip, ins)
            return
        if ins.kind in ("rdpkru", "wrpkru"):
            self._pkru(rip, ins)
            return
        if e.cpl() != 0:
            return      # about to #GP
        if ins.cr == 8:
            self._cr8(rip, ins)
            return
        if ins.kind in _TABLE_LOADS:
            self._table_load(rip, ins)
            return
        if ins.kind == "mov_cr":
            if ins.cr not in (0, 3, 4):
                return      # CR2 is no paging control, and loads without an exit
            value = e.reg(ins.reg)
            # QEMU's EFER has LMA, which the CPU sets itself (SDM Vol.3A §9.8.5).
            if mov_to_cr_faults(ins.cr, value, self.hw.cr4, e.msr(MSR_EFER),
                                self.vm.cpu.cr4_reserved, e.reg("cr3"), e.code_bits() == 64):
                # Refused before it runs (Unicorn would load it): #GP(0) at it.
                self._pending = (GeneralProtection(), READ)
                self.request_stop()
                return
            if ins.cr == 3 and value & NOFLUSH:
                # CR3 never holds bit 63; QEMU 5 would load it: it gets the
                # value without, and the register is the guest's again after.
                e.set_reg(ins.reg, value & ~NOFLUSH)
                self.after.set(rip, ins.size, {ins.reg: value})
            ex = Exit(ExitReason.CR_ACCESS, cr_access_qualification(ins.cr, 0), rip, ins.size,
                      value=value)
        elif ins.kind == "invlpg":
            ex = Exit(ExitReason.INVLPG, self._effective_address(ins, rip), rip, ins.size)
        elif ins.kind == "rdmsr":
            ex = Exit(ExitReason.MSR_READ, e.reg("rcx") & 0xFFFF_FFFF, rip, ins.size)
        elif ins.kind == "invd":
            if ExitReason.INVD in self.mmu.intercepts:
                dispatch(self, Exit(ExitReason.INVD, 0, rip, ins.size))
            return      # natively the CPU runs it: QEMU does nothing
        else:
            value = (e.reg("rdx") & 0xFFFF_FFFF) << 32 | (e.reg("rax") & 0xFFFF_FFFF)
            ex = Exit(ExitReason.MSR_WRITE, e.reg("rcx") & 0xFFFF_FFFF, rip, ins.size,
                      value=value)
        self.event(ex)

    def _invpcid(self, rip: int, ins: Intercepted) -> None:
        """INVPCID, which QEMU 5 does not decode: #UD without the feature
        (QEMU's), #GP above CPL 0, else an exit where the mode intercepts it
        (the VMM's then, as the CPU's otherwise: `run_invpcid`)."""
        e = self.engine
        if "invpcid" not in self.vm.cpu.features:
            return
        if e.cpl() != 0:
            self._raise_now(Vector.GP, 0, rip)
            return
        self.event(Exit(ExitReason.INVPCID, self._effective_address(ins, rip), rip, ins.size,
                        value=e.reg(ins.reg)))

    def run_invpcid(self, ex: Exit, tlb) -> None:
        """INVPCID of type `ex.value` with the descriptor at
        `ex.qualification` (SDM Vol.2A "INVPCID"): its #PF and #GPs, or
        `tlb.invpcid` (the CPU's, or the VMM's), and on past it."""
        try:
            desc = self._read_linear(ex.qualification, 16)
        except Fault as fault:
            self._raise_now(fault.vector, fault.error_code, ex.rip,
                            fault.vaddr if isinstance(fault, PageFault) else 0)
            return
        kind = ex.value
        pcid, vaddr = int.from_bytes(desc[:8], "little"), int.from_bytes(desc[8:], "little")
        if (kind > 3 or pcid >> 12
                or kind == 0 and not is_canonical(vaddr, self.vm.cpu.linear_bits)
                or kind < 2 and pcid and not self.engine.reg("cr4") & _PCIDE):
            self._raise_now(Vector.GP, 0, ex.rip)
            return
        tlb.invpcid(kind, pcid, vaddr)
        self.engine.set_reg("rip", ex.rip + ex.insn_len)

    def _pkru(self, rip: int, ins: Intercepted) -> None:
        """RDPKRU and WRPKRU, at any CPL (SDM Vol.2B): #UD without the
        feature (QEMU's model has it: hv's CPUID decides); else QEMU runs
        them, with its own #UD (CR4.PKE clear) and #GP (ECX, EDX), and the
        MMU learns what WRPKRU loads (no VMX control makes it exit)."""
        e = self.engine
        if "pku" not in self.vm.cpu.features:
            self._raise_now(Vector.UD, None, rip)
        elif (ins.kind == "wrpkru" and e.reg("cr4") & _PKE
              and not (e.reg("rcx") | e.reg("rdx")) & 0xFFFF_FFFF):
            self.hw.set_pkru(e.reg("rax") & 0xFFFF_FFFF)

    def _raise_now(self, vector: int, error_code: int | None, rip: int, cr2: int = 0) -> None:
        """The instruction at `rip`, which QEMU does not run, faults."""
        self._faulted = True
        self.deliver(vector, error_code, rip, cr2)
        self.request_stop()

    def _cr8(self, rip: int, ins: Intercepted) -> None:
        """MOV to or from CR8, the local APIC's TPR (SDM Vol.3A §11.8.6),
        carried out here: QEMU under Unicorn keeps no TPR."""
        e, apic = self.engine, self.apic
        if ins.kind == "mov_from_cr8":
            e.set_reg(ins.reg, apic.cr8)
            e.set_reg("rip", rip + ins.size)
            return
        value = e.reg(ins.reg)
        if value >> 4:
            self.fault_insn(GeneralProtection())    # reserved bits (SDM Vol.3A §2.5)
            return
        held = apic.pending() is None
        apic.cr8 = value
        e.set_reg("rip", rip + ins.size)
        if held and apic.pending() is not None:
            # An interrupt the TPR held back may come now, after the MOV.
            if ExitReason.TPR_BELOW_THRESHOLD in self.mmu.intercepts:
                dispatch(self, Exit(ExitReason.TPR_BELOW_THRESHOLD, 0, rip, ins.size))
            else:
                self.request_stop()

    def _table_load(self, rip: int, ins: Intercepted) -> None:
        """LGDT, LIDT, LLDT, LTR in 64-bit mode: a base that is not canonical
        is #GP(0), or #GP(selector) from a descriptor (SDM Vol.2A "LGDT/LIDT",
        "LLDT", Vol.2B "LTR"). QEMU loads it; its own checks come first."""
        e = self.engine
        if e.code_bits() != 64:
            return
        try:
            if ins.kind in ("lgdt", "lidt"):
                operand = self._read_linear(self._effective_address(ins, rip), 10)
                base, error = int.from_bytes(operand[2:], "little"), 0
            else:
                sel = (e.reg(ins.reg) if ins.reg else int.from_bytes(
                    self._read_linear(self._effective_address(ins, rip), 2), "little")) & 0xFFFF
                gdt_base, gdt_limit = e.gdtr()
                if sel & 4 or sel < 4 or (sel & ~7) + 15 > gdt_limit:
                    return      # null, LDT-relative or past the GDT: QEMU faults it
                d = self._read_linear(gdt_base + (sel & ~7), 16)
                if d[5] & 0x9F != _SYSTEM_DESCRIPTOR[ins.kind]:
                    return      # not present, or not an LDT or available TSS
                base = (int.from_bytes(d[2:5], "little") | d[7] << 24
                        | int.from_bytes(d[8:12], "little") << 32)
                error = sel & 0xFFFC
        except (VmExit, Fault, EmulateWrite):
            return              # the operand faults: QEMU's to raise
        if not is_canonical(base, self.vm.cpu.linear_bits):
            self.fault_insn(GeneralProtection(error_code=error))

    # -- the CPU model: CPUID, RDMSR, WRMSR (the hardware's, or the VMM's) ----
    def _cpuid(self) -> None:
        """CPUID, in QEMU's place (hv.hw.engine.Engine.on_cpuid)."""
        e = self.engine
        self.event(Exit(ExitReason.CPUID, e.reg("rcx") & 0xFFFF_FFFF, e.reg("rip"), 2,
                        value=e.reg("rax") & 0xFFFF_FFFF))

    def run_cpuid(self) -> None:
        e = self.engine
        regs = self.vm.cpu.cpuid(e.reg("rax"), e.reg("rcx") & 0xFFFF_FFFF, self.apic.apic_id,
                                 e.reg("cr4"))
        for name, value in zip(("rax", "rbx", "rcx", "rdx"), regs):
            e.set_reg(name, value)

    def run_rdmsr(self, index: int, rip: int, size: int) -> None:
        """RDMSR: the model's value in EDX:EAX once QEMU ran it, or #GP."""
        value = self.msrs.read(index)
        if value is None:
            self.fault_insn(GeneralProtection())
        else:
            self.after.set(rip, size, edx_eax(value))

    def run_wrmsr(self, index: int, value: int) -> None:
        """WRMSR: #GP before it runs, or the model's (EFER: the MMU's) and
        then QEMU's."""
        if not self.msrs.write(index, value):
            self.fault_insn(GeneralProtection())
        elif index == MSR_EFER:
            self.mmu.wrmsr(index, value)

    def fault_insn(self, fault: Fault) -> None:
        """The intercepted instruction about to run faults instead."""
        self._pending = (fault, READ)
        self.request_stop()

    # -- device memory (the local APIC's page) ---------------------------------
    def _apic_read(self, offset: int, size: int) -> int:
        self._mmio = [offset, size, 0, False]
        self._device_access()
        value, self._mmio = self._mmio[2], None
        return value

    def _apic_write(self, offset: int, size: int, value: int) -> None:
        self._mmio = [offset, size, value, True]
        self._sent_ipi = False
        self._device_access()
        self._mmio = None
        if self.apic.pending() is not None or self._sent_ipi:
            # An interrupt may be deliverable once the write is done, or its
            # IPI's destinations are to run (the sender spins on them): the
            # slice ends after the store, which is done (APIC registers take
            # plain MOVs). A stop alone would make QEMU redo it (Engine.stop).
            e = self.engine
            rip = e.reg("rip")
            e.set_reg("rip", rip + insn_size(self.read_code(rip), e.code_bits()))
            self.request_stop()

    def _device_access(self) -> None:
        """A decoded access to a device page: an MMIO exit in the modes
        that virtualize memory (the mode's `mmio_exit`), else the device's
        own (the chipset decodes it)."""
        reason = self.mmu.mmio_exit
        gpa, rip = APIC_DEFAULT_BASE + self._mmio[0], self.engine.reg("rip")
        if reason is None:
            self.complete_mmio()
        elif reason == ExitReason.EPT_MISCONFIG:
            dispatch(self, Exit(reason, 0, rip, value=gpa))
        else:
            # A #PF: the address is the device page's (hv does not keep the
            # linear address of an access QEMU routed to the device).
            error = _MMIO_PF_WRITE if self._mmio[3] else _MMIO_PF_READ
            dispatch(self, Exit(reason, gpa, rip, value=Vector.PF, error_code=error))

    def mmio_pending(self) -> bool:
        return self._mmio is not None

    def complete_mmio(self) -> None:
        """Carry out the device access in flight (an MMIO exit's handler)."""
        offset, size, value, write = self._mmio
        reg, shift = offset & ~0xF, (offset & 3) * 8
        mask = (1 << 8 * size) - 1
        if write:
            if offset & 0xF == 0 and size >= 4:
                self.apic.write(reg, value & 0xFFFF_FFFF)
        else:
            self._mmio[2] = self.apic.read(reg) >> shift & mask if offset & 0xF < 4 else 0

    def _effective_address(self, ins: Intercepted, rip: int) -> int:
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
        self.event(Exit(ExitReason.IO_INSTRUCTION, io_qualification(port, size, False), rip,
                        value=value))
        if self.vm.ended:
            self.request_stop()

    def _in(self, port: int, size: int) -> int:
        self.event(Exit(ExitReason.IO_INSTRUCTION, io_qualification(port, size, True),
                        self.engine.reg("rip")))
        return self.io_value

    def _interrupt(self, vector: int) -> None:
        """QEMU raised an exception, or ran INT n (RIP is then the return
        address). INT n pushes no error code, leaves CR2, and is no exception
        the VMCS exception bitmap sees (SDM Vol.3C §26.2)."""
        self._faulted = True
        e = self.engine
        rip = e.reg("rip")
        if e.software_interrupt():
            # INT3 is CC, INT n is CD n (a prefix before them is not found).
            int3 = vector == Vector.BP and self.read_code(rip - 1, 1) == bytes([INT3])
            self.deliver(vector, None, rip, int_rip=rip - (1 if int3 else 2))
        else:
            err = e.pending_error_code() if vector in HAS_ERROR_CODE else None
            cr2 = e.reg("cr2") if vector == Vector.PF else 0
            if vector in self.mode.exception_bitmap:
                # Only #PF is ever intercepted, and QEMU raises none while
                # hv's MMU translates (a refused access fails its fill).
                raise InvariantError(f"QEMU raised intercepted vector {vector}")
            self.deliver(vector, err, rip, cr2)
        self.request_stop()

    def _invalid(self) -> bool:
        rip = self.engine.reg("rip")
        if self.read_code(rip, 3) == VMCALL:
            self.event(Exit(ExitReason.VMCALL, 0, rip, 3))
            if self.vm.ended:
                self.request_stop()
        else:
            self._raise_now(Vector.UD, None, rip)
        return True

    # -- state ---------------------------------------------------------------
    def enter(self) -> None:
        """VM entry at the start of a slice: without VPIDs the TLB is flushed;
        the MMU reloads what the VMM dropped since."""
        if self._exit_flush:
            self.hw.flush_physical()
        if self._reload is not None:
            self._reload()

    def resume(self) -> None:
        """Back to the guest after an exit's handler (hv.vmm.exits.dispatch):
        without VPIDs the TLB is flushed (first-generation VT-x: exits flush);
        the MMU reloads what the handler dropped; --check-invariants checks
        the invariants."""
        if self._exit_flush:
            self.hw.flush_physical()
        if self._reload is not None:
            self._reload()
        if self._check:
            self.vm.check_invariants()

    def request_stop(self) -> None:
        self._stop = True
        self.engine.stop()

    def _send_ipi(self, ipi) -> None:
        self._sent_ipi = True
        self.vm.send_ipi(ipi)

    def interrupt(self, frame) -> None:
        """Ctrl-C (Machine's signal handler, `frame` the one it interrupted):
        end the slice now where the engine can stop."""
        if self.engine.interrupt(frame):
            self._stop = True

    def halt(self) -> None:
        self.halted = True
        self.request_stop()

    def wait_for_sipi(self) -> None:
        """An application processor at power-on, or after INIT: it runs
        nothing until a start-up IPI (SDM Vol.3A §9.4.4)."""
        self.halted = self.waiting_for_sipi = True

    def start_up(self, page: int) -> None:
        """A start-up IPI: real mode at page:0 (CS = page << 8), as after
        INIT (SDM Vol.3A §9.4.4.1)."""
        if not self.waiting_for_sipi:
            return          # a second SIPI is ignored
        self.waiting_for_sipi = self.halted = False
        self.engine.enter_real_mode(page << 8)
        self.mmu.boot(int(CR0.ET), 0, 0, 0)

    # -- interrupts from the local APIC ------------------------------------------
    def clock(self) -> int:
        """The vCPU's time in TSC cycles, which its APIC timer counts too:
        the modelled cycles of what it ran (hv.cost.CycleClock: its
        instructions, walks and exits, priced by the VM's profile), and
        the time it spent halted."""
        return self._cycles.now(self.insns()) + self.idle

    def take_interrupt(self, budget: int) -> int:
        """At VM entry, an instruction boundary: deliver the APIC's highest
        pending interrupt if the guest takes interrupts now (RFLAGS.IF, no
        STI or MOV SS shadow: SDM Vol.3A §6.8.1). Returns the slice's
        budget, cut at the APIC timer's deadline, or where RFLAGS.IF or a
        shadow holds a pending interrupt back, to the instructions that
        run before the window can open (see _EXACT_WINDOW)."""
        apic, e = self.apic, self.engine
        apic.tick()
        if apic.pending() is None:
            self._blocked = 0       # none waits (the TPR may hold one back: no window)
        else:
            if e.interrupt_shadow():
                self._blocked += 1
                return min(budget, 1)   # the window opens after one instruction
            if not e.reg("rflags") & _IF:
                self._blocked += 1
                run = straight_run(self.read_code(e.reg("rip"), _RUN_BYTES), e.code_bits())
                return min(budget, max(run, 1 << max(0, self._blocked - _EXACT_WINDOW)))
            if self._blocked and ExitReason.INTERRUPT_WINDOW in self.mmu.intercepts:
                dispatch(self, Exit(ExitReason.INTERRUPT_WINDOW, 0, e.reg("rip")))
            self._blocked = 0
            self.deliver(apic.ack(), None, e.reg("rip"), external=True)
        deadline = apic.deadline()
        if deadline is not None:
            budget = min(budget, self._cycles.instructions(deadline - self.clock()))
        return budget

    def can_wake(self) -> bool:
        """Whether a halted vCPU takes an interrupt now (HLT waits for one
        that RFLAGS.IF lets in)."""
        if self.waiting_for_sipi:
            return False
        self.apic.tick()
        return self.apic.pending() is not None and bool(self.engine.reg("rflags") & _IF)

    def timer_deadline(self) -> int | None:
        """When a halted vCPU's APIC timer would wake it, on its clock."""
        if self.waiting_for_sipi or not self.engine.reg("rflags") & _IF:
            return None
        return self.apic.deadline()

    def read_code(self, vaddr: int, length: int = MAX_INSN, tlb: bool = True) -> bytes:
        """Up to `length` bytes at `vaddr`, as far as they are mapped (no
        side effects; `tlb`: as Paging.peek)."""
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
        try:
            return self._run(budget)
        except _Ended:
            return 0        # the VM ended mid-access: nothing more of it counts

    def _run(self, budget: int) -> int:
        self._stop = self._faulted = False
        self._pending = None
        e = self.engine
        self._running = True
        try:
            ran = e.run(e.reg("rip"), budget)
        finally:
            self._running = False
        self.stats.counters["insns"] += ran
        if self._pending is not None:
            (event, access), self._pending = self._pending, None
            if isinstance(event, EmulateWrite):
                ran += self._emulate_write(event)
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
        elif not self._stop and not e.ran_out:
            # emu_start returned by itself: the guest ran HLT (Unicorn ends
            # emulation there silently), maybe as the budget's last instruction.
            rip = e.reg("rip")
            if self.read_code(rip - 1, 1) != bytes([HLT]):
                raise RuntimeError(f"unicorn stopped at {rip:#x} for no known reason")
            self.event(Exit(ExitReason.HLT, 0, rip - 1, 1))
        if self._faulted:
            e.clear_exception()
        return ran

    def _emulate_write(self, em: EmulateWrite) -> int:
        """Run the faulting instruction once with its page writable, then
        tell the MMU what it wrote (any writing instruction works: KVM's
        emulator, by running it). Returns the instructions that ran."""
        hpa = self.vm.guest.hpa(em.gfn << 12)
        before = self.vm.mem.read(hpa, PAGE_SIZE)
        # A write that crosses into a second write-protected table faults
        # there inside run(1) and comes back here for that page: both pages
        # stay writable for the one instruction (replacing the first
        # recursed forever, each page's run faulting on the other).
        page = em.vaddr & ~(PAGE_SIZE - 1)
        self._emulating[page] = hpa
        try:
            ran = self.run(1)
        finally:
            del self._emulating[page]
            self.engine.flush_page(page)    # its one writable mapping
        self.mmu.table_written(em.gfn, before)
        return ran

    # -- exception delivery (hv.hw.delivery) ----------------------------------
    def deliver(self, vector: int, error_code: int | None, rip: int, cr2: int = 0,
                int_rip: int | None = None, external: bool = False) -> None:
        """Deliver an exception (with `int_rip`, INT n; `external`, an
        interrupt) through the guest IDT, as the CPU would; a triple fault
        is an exit."""
        self.after.cancel()
        self._chain = self.delivery.deliver(vector, error_code, rip, cr2, int_rip, external)
        if self._chain is not None:
            self.event(Exit(ExitReason.TRIPLE_FAULT, 0, rip if int_rip is None else int_rip))
            self.request_stop()

    def _linear(self, vaddr: int, access: int) -> int:
        """A linear access the CPU makes itself: the host address, or the
        guest's Fault, or EmulateWrite for a write the VMM must make."""
        try:
            return self.hw.translate(vaddr, access)
        except (VmExit, Fault) as raised:
            hpa = self._complete(raised, self.hw.translate, vaddr, access, False, True)
            if hpa is None:
                raise self._take_event()
            return hpa

    def _read_linear(self, vaddr: int, length: int) -> bytes:
        out = b""
        while len(out) < length:
            paddr = self._linear(vaddr + len(out), READ)
            n = min(length - len(out), PAGE_SIZE - (paddr & (PAGE_SIZE - 1)))
            out += self.vm.mem.read(paddr, n)
        return out

    def _write_linear(self, vaddr: int, data: bytes, first: int) -> None:
        """Write within the page of `first`, as the CPU pushes a frame:
        `first` is translated (the address a fault names), `data` written
        at `vaddr`."""
        try:
            hpa = self._linear(first, WRITE)
        except EmulateWrite as em:
            # Onto a shadowed guest page table.
            self.mmu.vmm_write(EmulateWrite(vaddr, em.gfn), data)
            return
        self.vm.mem.write(hpa - first + vaddr, data)

    # -- reports -------------------------------------------------------------
    def insns(self) -> int:
        """Instructions this vCPU started so far (at an exit from a hook,
        the exiting one included, as a mark counts it)."""
        n = self.stats.counters["insns"]
        return n + self.engine.started() if self._running else n

    def registers(self) -> dict[str, int]:
        """The guest's registers (the engine's are the guest's in every mode:
        the VMM's paging registers are the MMU's, never the engine's)."""
        e = self.engine
        regs = {name: e.reg(name) for name in REGISTERS}
        regs["efer"] = e.msr(MSR_EFER)
        return regs

    def describe_fault(self, ex: Exit) -> str:
        """The triple fault's one-line report; its data (registers, the
        chain of events) goes in `crash`."""
        # Through the tables, as the oracle reads it: the guest may have
        # changed them since the TLB cached the page.
        insn = asm.describe_insn(self.read_code(ex.rip, tlb=False), ex.rip)
        chain = self._chain or []
        self.crash = {"vm": self.vm.index, "vcpu": self.index, "rip": ex.rip,
                      "where": self.vm.symbols.name(ex.rip), "insn": insn,
                      "chain": [step.data() for step in chain], "registers": self.registers()}
        whys = {step.why for step in chain}
        if len(whys) == 1:      # one cause all along (no IDT): said once
            events = " → ".join(step.name for step in chain) + f" → shutdown: {whys.pop()}"
        else:
            events = " → ".join(f"{step.name} ({step.why})" for step in chain) + " → shutdown"
        return f"triple fault at rip={self.vm.symbols.at(ex.rip)}: {insn}; {events}"
