"""CPUID and the MSRs hv models: definitions only.

The CPU hv presents is one coherent Intel CPU with only the features hv
implements (SDM Vol.2A "CPUID", Table 3-8; Vol.4 for MSR numbers). Unicorn
alone would advertise QEMU's (features hv's walker and TLB do not model),
so CPUID is hv's in every mode.
"""
from __future__ import annotations

from .x86 import CR4, MSR_EFER

VENDOR = b"GenuineIntel"
BRAND = b"hv virtual CPU (a toy hypervisor's model)"
MAXPHYADDR = 40         # what the walker enforces (hv.arch.paging.PHYS_MASK)
# Linear-address width, CPUID.80000008H:EAX[15:8]: 57 with la57. A CPU with
# 5-level paging checks the addresses WRMSR, LGDT, LIDT, LLDT, LTR and
# INVPCID load for 57-bit canonical form whatever CR4.LA57 says (Intel,
# "5-Level Paging and 5-Level EPT" white paper, §2.5; kvm-unit-tests la57).
LINEAR_BITS, LINEAR_BITS_LA57 = 48, 57
MAX_BASIC_LEAF = 0x7    # no leaf 0xA: no PMU, so kernels touch no PMU MSR
MAX_EXT_LEAF = 0x8000_0008
# Leaf 1 EAX: family 6, model 0x1A (Nehalem, the first CPU with EPT), stepping 5.
SIGNATURE = 0x0001_06A5

# Feature bits: name -> (leaf, register, bit), QEMU's names (--cpu spells them so).
FEATURES = {
    "fpu": (1, "edx", 0), "de": (1, "edx", 2), "pse": (1, "edx", 3), "tsc": (1, "edx", 4),
    "msr": (1, "edx", 5), "pae": (1, "edx", 6), "cx8": (1, "edx", 8), "apic": (1, "edx", 9),
    "sep": (1, "edx", 11), "pge": (1, "edx", 13), "cmov": (1, "edx", 15), "pat": (1, "edx", 16),
    "clflush": (1, "edx", 19), "mmx": (1, "edx", 23), "fxsr": (1, "edx", 24),
    "sse": (1, "edx", 25), "sse2": (1, "edx", 26),
    "sse3": (1, "ecx", 0), "ssse3": (1, "ecx", 9), "cx16": (1, "ecx", 13),
    "sse4.1": (1, "ecx", 19), "sse4.2": (1, "ecx", 20), "x2apic": (1, "ecx", 21),
    "popcnt": (1, "ecx", 23), "tsc-deadline": (1, "ecx", 24),
    "smep": (7, "ebx", 7), "invpcid": (7, "ebx", 10), "smap": (7, "ebx", 20),
    "pku": (7, "ecx", 3), "la57": (7, "ecx", 16), "pcid": (1, "ecx", 17),
    "lahf-lm": (0x8000_0001, "ecx", 0), "syscall": (0x8000_0001, "edx", 11),
    "nx": (0x8000_0001, "edx", 20), "pdpe1gb": (0x8000_0001, "edx", 26),
    "rdtscp": (0x8000_0001, "edx", 27), "lm": (0x8000_0001, "edx", 29),
}
# What hv implements, all on by default (--cpu may take some away).
IMPLEMENTED = frozenset(
    "fpu de pse tsc msr pae cx8 apic sep pge cmov pat clflush mmx fxsr sse sse2 sse3 ssse3 "
    "cx16 sse4.1 sse4.2 popcnt lahf-lm syscall nx pdpe1gb rdtscp lm smep smap pcid invpcid "
    "pku la57".split())
# CPUID.7.0:ECX.OSPKE: CR4.PKE as the vCPU has it, no feature of its own.
OSPKE = 1 << 4
# Features hv must not be without: its boot paths and walker assume them.
REQUIRED = frozenset("fpu tsc msr pae apic cx8 fxsr sse sse2 lm nx".split())

# MSR numbers (SDM Vol.4, Table 2-2).
MSR_TSC = 0x10
MSR_APIC_BASE = 0x1B
MSR_TSC_ADJUST = 0x3B
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_PAT = 0x277
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK = 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE = 0xC000_0100, 0xC000_0101, 0xC000_0102
MSR_TSC_AUX = 0xC000_0103
PAT_RESET = 0x0007_0406_0007_0406       # SDM Vol.3A §11.12.4
# MSRs whose value must be a canonical address (SDM Vol.2B "WRMSR": #GP).
CANONICAL_MSRS = frozenset({MSR_SYSENTER_ESP, MSR_SYSENTER_EIP, MSR_LSTAR, MSR_CSTAR,
                            MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE})
# MSRs QEMU keeps in its CPU state: hv checks the write and lets QEMU run it.
QEMU_MSRS = frozenset({MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP, MSR_EFER, MSR_STAR,
                       MSR_LSTAR, MSR_CSTAR, MSR_SFMASK, MSR_FS_BASE, MSR_GS_BASE,
                       MSR_KERNEL_GS_BASE, MSR_TSC_AUX})


# The CR4 bits a feature makes legal (SDM Vol.3A §2.5: setting a bit whose
# feature CPUID does not report is #GP); TSD and PCE have no CPUID bit.
CR4_BY_FEATURE = {name: int(bit) for name, bit in (
    ("de", CR4.DE), ("pse", CR4.PSE), ("pae", CR4.PAE), ("pge", CR4.PGE), ("fxsr", CR4.OSFXSR),
    ("sse", CR4.OSXMMEXCPT), ("pcid", CR4.PCIDE), ("smep", CR4.SMEP), ("smap", CR4.SMAP),
    ("pku", CR4.PKE), ("la57", CR4.LA57))}
CR4_ALWAYS = int(CR4.TSD | CR4.PCE)


def cr4_reserved(features) -> int:
    """The CR4 bits (31:0) a CPU with `features` refuses."""
    allowed = CR4_ALWAYS
    for name in features:
        allowed |= CR4_BY_FEATURE.get(name, 0)
    return 0xFFFF_FFFF & ~allowed

