"""What the modelled hardware raises, and the exit record the VMM handles.

The hardware (hv.hw) raises; the vCPU (hv.vmm.vcpu) is the one place that
catches:

- `Fault`: an exception the guest takes through its IDT (#PF, #GP(0)).
- `VmExit`: an event the VM's controls intercept (SDM Vol.3C §26.1): it
  carries the `Exit` that the dispatch table (hv.vmm.exits) handles. A #PF
  in the exception bitmap is raised as VmExit(EXCEPTION_NMI); the EPT walk
  raises `EptViolation` and `EptMisconfig`.

`EmulateWrite` is not the hardware's: it is what shadow paging's #PF
handler asks of the vCPU (run the faulting write once with the page
writable), recorded on the vCPU like an injected fault.
"""
from __future__ import annotations

from typing import NamedTuple

from .arch.vmx import ExitReason
from .arch.x86 import Vector


class Exit(NamedTuple):
    """One exit: the reason and its qualification (SDM Vol.3C §28.2.1),
    plus the operand value hv's handlers need: the byte written (IO), the
    new register value (CR_ACCESS, MSR_WRITE), the vector (EXCEPTION_NMI),
    the guest-physical address (EPT_VIOLATION, EPT_MISCONFIG); `gla`, the
    guest-linear address whose walk met an EPT violation (its own VMCS
    field; the page's, as TLB fills come). (A named tuple: built on every exit, at half a frozen
    dataclass's cost.)"""
    reason: ExitReason
    qualification: int = 0
    rip: int = 0
    insn_len: int = 0
    value: int = 0
    error_code: int | None = None
    gla: int = 0


# The events below are raised on every fault and exit: their messages are
# made only when shown.
class VmExit(Exception):
    """The hardware leaves the guest: `exit` says why."""

    def __init__(self, exit: Exit):
        self.exit = exit

    def __str__(self) -> str:
        return f"VM exit {self.exit.reason.name}"


class EptViolation(VmExit):
    """An EPT walk found no entry, or one without the rights the access
    needs (SDM Vol.3C §29.3.3.2). The exit's `value` is the guest-physical
    address (its own VMCS field), the qualification says which access;
    `gla` the linear address whose walk it was, once the walk knows it."""

    def __init__(self, gpa: int, qualification: int, gla: int = 0):
        self.exit = Exit(ExitReason.EPT_VIOLATION, qualification, value=gpa, gla=gla)
        self.gpa, self.qualification = gpa, qualification


class EptMisconfig(VmExit):
    """An EPT entry the processor refuses (SDM Vol.3C §29.3.3.1)."""

    def __init__(self, gpa: int, level: int, entry: int):
        self.exit = Exit(ExitReason.EPT_MISCONFIG, value=gpa)
        self.gpa, self.level, self.entry = gpa, level, entry

    def __str__(self) -> str:
        return (f"EPT misconfiguration at guest-physical {self.gpa:#x}: level-{self.level} "
                f"entry {self.entry:#x}")


def page_fault_exit(vaddr: int, error_code: int) -> VmExit:
    """A #PF the exception bitmap intercepts: the qualification is the
    linear address (SDM Vol.3C §28.2.1)."""
    return VmExit(Exit(ExitReason.EXCEPTION_NMI, vaddr, value=Vector.PF, error_code=error_code))


class Fault(Exception):
    """A translation the architecture answers with an exception."""
    vector = 0

    def __init__(self, vaddr: int, error_code: int):
        self.vaddr, self.error_code = vaddr, error_code

    def __str__(self) -> str:
        return f"vector {self.vector} at {self.vaddr:#x}, error code {self.error_code:#x}"


class PageFault(Fault):
    """#PF, with the error code of SDM Vol.3A §4.7. `nested`: raised in the
    guest's own tables of a two-dimensional walk (under agile paging such a
    fault is the guest's, whatever the exception bitmap says)."""
    vector = Vector.PF

    def __init__(self, vaddr: int, error_code: int, nested: bool = False):
        self.vaddr, self.error_code, self.nested = vaddr, error_code, nested


class GeneralProtection(Fault):
    """#GP: a non-canonical address, or an instruction the hardware refuses
    before it runs (a reserved bit in MOV to CR); the error code is 0 or a
    selector."""
    vector = Vector.GP

    def __init__(self, vaddr: int = 0, error_code: int = 0):
        super().__init__(vaddr, error_code)


class NonCanonical(GeneralProtection):
    """A non-canonical address is #GP(0), before any walk (SDM Vol.3A §6.15,
    "Interrupt 13"); QEMU, the oracle, raises #GP for stack accesses too."""


class EmulateWrite(Exception):
    """A guest write the VMM emulates (to a write-protected guest page
    table under shadow paging): the guest frame `gfn` behind `vaddr`."""

    def __init__(self, vaddr: int, gfn: int):
        self.vaddr, self.gfn = vaddr, gfn

    def __str__(self) -> str:
        return f"emulate the write to {self.vaddr:#x} (guest frame {self.gfn:#x})"
