"""VM-exit reasons: the Intel SDM's basic exit reason numbers, Linux's names.

SDM Vol.3D Appendix C, Table C-1; names as in Linux
``arch/x86/include/uapi/asm/vmx.h`` (EXIT_REASON_*).
"""
from __future__ import annotations

from enum import IntEnum


class ExitReason(IntEnum):
    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INTERRUPT_WINDOW = 7
    CPUID = 10
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    VMCALL = 18
    CR_ACCESS = 28
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    TPR_BELOW_THRESHOLD = 43
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    INVPCID = 58


class Hypercall(IntEnum):
    """hv's hypercall numbers (``vmcall`` with the number in rax)."""
    MARK = 0


# Exit qualification for CR_ACCESS (SDM Vol.3C §28.2.1, Table 28-3):
# bits 3:0 the control register, bits 5:4 the access type (0 = MOV to CR).
def cr_access_qualification(cr: int, gpr: int, to_cr: bool = True) -> int:
    return cr | ((0 if to_cr else 1) << 4) | (gpr << 8)
