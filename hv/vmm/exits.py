"""VM exits: one record type and one dispatch table of handlers.

Every event that leaves the guest (or would, on real hardware, in some
mode) becomes an `Exit` and goes through `dispatch`. Statistics are composed
around the handlers there, once: an event counts as a VM exit only if the
vCPU's MMU mode intercepts that reason (on bare metal a MOV to CR3 is no
exit; under shadow paging it is).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..arch.vmx import ExitReason, Hypercall
from ..arch.x86 import MSR_EFER

if TYPE_CHECKING:
    from .vcpu import VCpu

# Guest-visible platform (the boot ABI in README.md).
PORT_CONSOLE = 0x3F8
PORT_CONSOLE_LSR = 0x3FD    # 16550 line status: transmitter empty
PORT_EXIT = 0xF4            # isa-debug-exit style: the value is the exit code
HYPERCALL_ENOSYS = -1000 & (2**64 - 1)   # KVM's -KVM_ENOSYS
HYPERCALL_E2BIG = -7 & (2**64 - 1)       # -E2BIG: no room for another mark id


@dataclass(frozen=True, slots=True)
class Exit:
    """One exit: the reason and its qualification (SDM Vol.3C §28.2.1),
    plus the operand value hv's handlers need: the byte written (IO), the
    new register value (CR_ACCESS, MSR_WRITE), the vector (EXCEPTION_NMI)."""
    reason: ExitReason
    qualification: int = 0
    rip: int = 0
    insn_len: int = 0
    value: int = 0
    error_code: int | None = None


Handler = Callable[["VCpu", Exit], None]
HANDLERS: dict[ExitReason, Handler] = {}


def handles(reason: ExitReason) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[reason] = fn
        return fn
    return register


def dispatch(vcpu: "VCpu", ex: Exit) -> None:
    mmu = vcpu.mmu
    is_exit = ex.reason in mmu.intercepts or (
        ex.reason == ExitReason.EXCEPTION_NMI and ex.value in mmu.exception_bitmap)
    if is_exit:
        vcpu.stats.exits[ex.reason] += 1
        vcpu.stats.counters["exits"] += 1
    HANDLERS[ex.reason](vcpu, ex)
    if is_exit and not vcpu.vm.config.asid and mmu.tlb is not None:
        vcpu.flush_tlb()        # first-generation VT-x: no VPID, exits flush
    if vcpu.vm.config.check_invariants:
        vcpu.vm.check_invariants()


# Qualification of IO_INSTRUCTION (SDM Vol.3C Table 28-5): size-1 in bits
# 2:0, direction in bit 3 (1 = IN), port in bits 31:16.
def io_qualification(port: int, size: int, is_in: bool) -> int:
    return (size - 1) | (int(is_in) << 3) | (port << 16)


@handles(ExitReason.IO_INSTRUCTION)
def _io(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.stats.counters["io_exits"] += 1
    port, is_in = ex.qualification >> 16, bool(ex.qualification & 8)
    if is_in:
        return
    if port == PORT_CONSOLE:
        vcpu.vm.console_write(ex.value & 0xFF)
    elif port == PORT_EXIT:
        vcpu.vm.finish("exit", f"the guest wrote {ex.value} to port {PORT_EXIT:#x}",
                       exit_code=ex.value)


@handles(ExitReason.HLT)
def _hlt(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.stats.counters["halt_exits"] += 1
    vcpu.halt()


@handles(ExitReason.VMCALL)
def _vmcall(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.stats.counters["hypercalls"] += 1
    nr = vcpu.engine.reg("rax")
    if nr == Hypercall.MARK:
        result = 0 if vcpu.vm.mark(vcpu.engine.reg("rbx"), vcpu) else HYPERCALL_E2BIG
    else:
        result = HYPERCALL_ENOSYS
    vcpu.engine.set_reg("rax", result)
    vcpu.engine.set_reg("rip", ex.rip + ex.insn_len)


@handles(ExitReason.CR_ACCESS)
def _cr_access(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.mmu.write_cr(ex.qualification & 0xF, ex.value)


@handles(ExitReason.INVLPG)
def _invlpg(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.mmu.invlpg(ex.qualification)


@handles(ExitReason.MSR_WRITE)
def _wrmsr(vcpu: "VCpu", ex: Exit) -> None:
    if ex.qualification == MSR_EFER:
        vcpu.mmu.write_efer(ex.value)


@handles(ExitReason.EXCEPTION_NMI)
def _exception(vcpu: "VCpu", ex: Exit) -> None:
    # `value` is the vector; for #PF the qualification is the faulting
    # linear address (SDM Vol.3C §28.2.1). An intercepted vector is the
    # MMU mode's to handle (shadow paging's hidden faults); any other is
    # delivered to the guest as the CPU would.
    if ex.value in vcpu.mmu.exception_bitmap:
        vcpu.mmu.intercepted_exception(ex)
    else:
        vcpu.deliver(ex.value, ex.error_code, ex.rip, cr2=ex.qualification)


@handles(ExitReason.EPT_VIOLATION)
def _ept_violation(vcpu: "VCpu", ex: Exit) -> None:
    # `value` is the guest-physical address (its own VMCS field, SDM
    # Vol.3C §28.2.1); the qualification says which access and why.
    vcpu.mmu.ept_violation(ex.value)


@handles(ExitReason.EPT_MISCONFIG)
def _ept_misconfig(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.vm.finish("ept_misconfig", f"EPT misconfiguration for guest-physical {ex.value:#x}")


@handles(ExitReason.TRIPLE_FAULT)
def _triple_fault(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.vm.finish("triple_fault", vcpu.describe_fault(ex))
