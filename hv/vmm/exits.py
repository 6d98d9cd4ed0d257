"""VM exits: the one dispatch table of handlers.

The vCPU (hv.vmm.vcpu) dispatches an event only when its mode intercepts
it: every call of `dispatch` is a VM exit, counted here and nowhere else.
Handlers call into the VMM (the vCPU's paging, the VM, its devices) and
return; what the guest must see next (an injected #PF, an emulated write)
they record on the vCPU (`VCpu.inject`). After every handler the vCPU
resumes the guest (`VCpu.resume`: the TLB flush of a CPU without VPIDs, the
MMU reload, the invariants with --check-invariants).

`dispatch` is also the trace point (hv run --trace, hv.run(trace=...)): a
record of each exit, in the spirit of KVM's `kvm_exit` tracepoint.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

from ..arch.vmx import ExitReason, Hypercall
from ..errors import HvError
from ..events import Exit

if TYPE_CHECKING:
    from .vcpu import VCpu

HYPERCALL_ENOSYS = -1000 & (2**64 - 1)   # KVM's -KVM_ENOSYS
HYPERCALL_E2BIG = -7 & (2**64 - 1)       # -E2BIG: no room for another mark id

Handler = Callable[["VCpu", Exit], None]
HANDLERS: dict[ExitReason, Handler] = {}


def handles(reason: ExitReason) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[reason] = fn
        return fn
    return register


def dispatch(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.stats.exits[ex.reason] += 1
    vcpu.stats.counters["exits"] += 1
    if vcpu.trace is not None:
        vcpu.trace.exit(vcpu, ex)
    HANDLERS[ex.reason](vcpu, ex)
    vcpu.resume()


class Trace:
    """Where exits are traced: each exit whose reason is in `reasons` (names;
    default all) becomes a record (a dict of plain data: `record`) handed
    to `to`, a callable, or written to `to`, a text file, one line each:
    text like `trace_line`, or JSON lines with `json_lines`."""

    def __init__(self, to, reasons=None, json_lines: bool = False):
        if hasattr(to, "write"):
            line = _json_line if json_lines else trace_line
            self.emit = lambda rec: to.write(line(rec) + "\n")
        elif callable(to):
            self.emit = to
        else:
            raise HvError(f"trace to a callable or a writable file, not {to!r}")
        self.reasons = frozenset(ExitReason) if reasons is None else parse_reasons(reasons)

    def exit(self, vcpu: "VCpu", ex: Exit) -> None:
        if ex.reason in self.reasons:
            self.emit(record(vcpu, ex))


def parse_reasons(names) -> frozenset[ExitReason]:
    """The exit reasons hv handles, by name (a comma-separated string, or
    names), in any case."""
    if isinstance(names, str):
        names = names.split(",")
    out = set()
    for name in names:
        if isinstance(name, ExitReason):
            out.add(name)
            continue
        reason = ExitReason.__members__.get(name.strip().upper())
        if reason not in HANDLERS:
            raise HvError(f"unknown exit reason {name.strip()!r} (choose from "
                          f"{', '.join(r.name for r in HANDLERS)})")
        out.add(reason)
    return frozenset(out)


def record(vcpu: "VCpu", ex: Exit) -> dict:
    """An exit as plain data: where (VM, vCPU, instructions started so far,
    RIP and its label), why, and the reason's qualification by name."""
    # An exit raised inside a TLB fill has no RIP of its own: the
    # instruction that made the access is the engine's.
    rip = ex.rip or vcpu.engine.reg("rip")
    rec = {"vm": vcpu.vm.index, "vcpu": vcpu.index, "insns": vcpu.insns(), "rip": rip,
           "where": vcpu.vm.symbols.name(rip), "reason": ex.reason.name}
    reason, q = ex.reason, ex.qualification
    if reason == ExitReason.EXCEPTION_NMI:
        rec.update(vector=ex.value, cr2=q, error_code=ex.error_code)
    elif reason == ExitReason.EPT_VIOLATION:
        rec.update(gpa=ex.value, qualification=q, gla=ex.gla)
    elif reason == ExitReason.EPT_MISCONFIG:
        rec.update(gpa=ex.value)
    elif reason == ExitReason.CR_ACCESS:
        rec.update(cr=q & 0xF, value=ex.value)
    elif reason == ExitReason.INVLPG:
        rec.update(address=q)
    elif reason == ExitReason.MSR_WRITE:
        rec.update(msr=q, value=ex.value)
    elif reason == ExitReason.MSR_READ:
        rec.update(msr=q)
    elif reason == ExitReason.CPUID:
        rec.update(leaf=ex.value, subleaf=q)
    elif reason == ExitReason.IO_INSTRUCTION:
        is_in = bool(q & 8)
        rec.update(port=q >> 16, size=(q & 7) + 1, direction="in" if is_in else "out")
        if not is_in:
            rec.update(value=ex.value)
    elif reason == ExitReason.VMCALL:
        rec.update(rax=vcpu.engine.reg("rax"), rbx=vcpu.engine.reg("rbx"))
    return rec


_TRACE_HEAD = ("vm", "vcpu", "insns", "rip", "where", "reason")
_DECIMAL = ("vector", "cr", "size")


def trace_line(rec: dict) -> str:
    """A record as one line of text: `insns vmN/vcpuN REASON rip=... <label> key=value ...`."""
    where = f" <{rec['where']}>" if rec["where"] else ""
    rest = " ".join(f"{k}={v if k in _DECIMAL or not isinstance(v, int) else hex(v)}"
                    for k, v in rec.items() if k not in _TRACE_HEAD)
    return (f"{rec['insns']:>12} vm{rec['vm']}/vcpu{rec['vcpu']} {rec['reason']:<14} "
            f"rip={rec['rip']:#x}{where} {rest}").rstrip()


def _json_line(rec: dict) -> str:
    return json.dumps(rec, separators=(",", ":"))


# Qualification of IO_INSTRUCTION (SDM Vol.3C Table 28-5): size-1 in bits
# 2:0, direction in bit 3 (1 = IN), port in bits 31:16.
def io_qualification(port: int, size: int, is_in: bool) -> int:
    return (size - 1) | (int(is_in) << 3) | (port << 16)


@handles(ExitReason.IO_INSTRUCTION)
def _io(vcpu: "VCpu", ex: Exit) -> None:
    # The platform's port table (hv.devices); an IN's value goes back to
    # the instruction through the vCPU.
    vcpu.stats.counters["io_exits"] += 1
    q = ex.qualification
    port, size = q >> 16, (q & 7) + 1
    if q & 8:
        vcpu.io_value = vcpu.vm.ports.read(port, size)
    else:
        vcpu.vm.ports.write(port, size, ex.value)


@handles(ExitReason.CPUID)
def _cpuid(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.run_cpuid()


@handles(ExitReason.MSR_READ)
def _rdmsr(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.run_rdmsr(ex.qualification, ex.rip, ex.insn_len)


@handles(ExitReason.TPR_BELOW_THRESHOLD)
def _tpr_below_threshold(vcpu: "VCpu", ex: Exit) -> None:
    """MOV to CR8 let an interrupt through: inject it at the next entry
    (KVM's KVM_REQ_EVENT)."""
    vcpu.request_stop()


@handles(ExitReason.INVD)
def _invd(vcpu: "VCpu", ex: Exit) -> None:
    """Caches are the host's: nothing to drop (KVM skips it too)."""
    vcpu.engine.set_reg("rip", ex.rip + ex.insn_len)


@handles(ExitReason.INTERRUPT_WINDOW)
def _interrupt_window(vcpu: "VCpu", ex: Exit) -> None:
    """The guest takes interrupts again: the entry this exit returns
    through injects the waiting one (VCpu.take_interrupt)."""


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


@handles(ExitReason.INVPCID)
def _invpcid(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.run_invpcid(ex, vcpu.mmu)


@handles(ExitReason.MSR_WRITE)
def _wrmsr(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.run_wrmsr(ex.qualification, ex.value)


@handles(ExitReason.EXCEPTION_NMI)
def _exception(vcpu: "VCpu", ex: Exit) -> None:
    if vcpu.mmio_pending():
        _mmio(vcpu)             # a #PF on a device page's reserved-bit spte
        return
    # An intercepted #PF (shadow paging's): the qualification is the
    # faulting linear address (SDM Vol.3C §28.2.1). The MMU fixes a hidden
    # fault, or names what the guest gets instead.
    event = vcpu.mmu.page_fault(ex.qualification, ex.error_code)
    if event is not None:
        vcpu.inject(event)


@handles(ExitReason.EPT_VIOLATION)
def _ept_violation(vcpu: "VCpu", ex: Exit) -> None:
    # `value` is the guest-physical address (its own VMCS field, SDM
    # Vol.3C §28.2.1); the qualification says which access and why. Under
    # agile paging the write may be one to emulate.
    event = vcpu.mmu.ept_violation(ex)
    if event is not None:
        vcpu.inject(event)


def _mmio(vcpu: "VCpu") -> None:
    vcpu.stats.counters["mmio_exits"] += 1
    vcpu.complete_mmio()


@handles(ExitReason.EPT_MISCONFIG)
def _ept_misconfig(vcpu: "VCpu", ex: Exit) -> None:
    if vcpu.mmio_pending():
        _mmio(vcpu)             # a device page (KVM's MMIO sptes are misconfigured)
        return
    vcpu.vm.finish("ept_misconfig", f"EPT misconfiguration for guest-physical {ex.value:#x}")


@handles(ExitReason.TRIPLE_FAULT)
def _triple_fault(vcpu: "VCpu", ex: Exit) -> None:
    vcpu.vm.finish("triple_fault", vcpu.describe_fault(ex))
