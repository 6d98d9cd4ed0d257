"""x86-64 control registers, MSRs, exception vectors and descriptors.

Pure definitions. Rules cite the Intel SDM as "SDM Vol.3A §x.y".
"""
from __future__ import annotations

from enum import IntEnum, IntFlag

from .paging import PHYS_MASK


class CR0(IntFlag):
    """SDM Vol.3A §2.5."""
    PE = 1 << 0
    MP = 1 << 1
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16    # supervisor writes honour read-only pages
    AM = 1 << 18
    NW = 1 << 29
    CD = 1 << 30
    PG = 1 << 31


class CR4(IntFlag):
    """SDM Vol.3A §2.5."""
    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2    # RDTSC at CPL 0 only
    DE = 1 << 3
    PSE = 1 << 4
    PAE = 1 << 5
    MCE = 1 << 6
    PGE = 1 << 7    # global pages
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    SMEP = 1 << 20
    SMAP = 1 << 21
    PKE = 1 << 22


def mov_to_cr_faults(cr: int, value: int, cr4: int, efer: int = 0,
                     cr4_reserved: int = 0, cr3: int = 0, code64: bool = True) -> bool:
    """Whether MOV to CRn with `value` is #GP(0) (SDM Vol.2B, "MOV-Move
    to/from Control Registers"; Vol.3A §2.5, §4.5.2): reserved bits 63:32
    of CR0 and CR4, the CR4 bits of features the CPU has not
    (`cr4_reserved`: hv.arch.cpuid), PG without PE or NW without CD in CR0, bits
    63:MAXPHYADDR of CR3 (bit 63 is no-flush with CR4.PCIDE); setting
    CR4.PCIDE outside IA-32e mode or while CR3 bits 11:0 are not 0;
    clearing CR0.PG in 64-bit mode (`code64`: IA-32e mode is left from
    compatibility mode, §9.8.5.4) or with CR4.PCIDE set; with IA-32e mode
    active (EFER.LMA), clearing CR4.PAE or changing CR4.LA57."""
    if cr == 3:
        return bool(value & (_CR3_RSVD_PCID if cr4 & _PCIDE else _CR3_RSVD))
    if value >> 32:
        return cr in (0, 4)
    if cr == 0:
        return bool(value & _PG and not value & _PE or value & _NW and not value & _CD
                    or not value & _PG and (efer & _LMA and code64 or cr4 & _PCIDE))
    return bool(cr == 4 and (efer & _LMA and (not value & _PAE or (value ^ cr4) & _LA57)
                             or value & cr4_reserved
                             or value & ~cr4 & _PCIDE and (cr3 & 0xFFF or not efer & _LMA)))


# Plain ints for the check above (IntFlag arithmetic costs a microsecond).
_PE, _NW, _CD, _PG = int(CR0.PE), int(CR0.NW), int(CR0.CD), int(CR0.PG)
_PAE, _PCIDE, _LA57 = int(CR4.PAE), int(CR4.PCIDE), int(CR4.LA57)
_CR3_RSVD = ~PHYS_MASK & (2**64 - 1)
_CR3_RSVD_PCID = _CR3_RSVD & ~(1 << 63)


class EFER(IntFlag):
    """IA32_EFER, SDM Vol.3A §2.2.1."""
    SCE = 1 << 0
    LME = 1 << 8
    LMA = 1 << 10
    NXE = 1 << 11


MSR_EFER = 0xC000_0080
_LMA = int(EFER.LMA)


class TlbFlush(IntEnum):
    """What a change of paging controls invalidates in the TLB and the
    paging-structure caches of the address space (its ASID)."""
    NONE = 0
    PCID = 1        # the current PCID's entries but the global ones
    NONGLOBAL = 2   # every PCID's entries but the global ones
    ALL = 3         # every entry, global ones too


# Plain ints: these run on exit paths (IntFlag arithmetic costs a microsecond).
WP, PG, PGE, NXE = int(CR0.WP), int(CR0.PG), int(CR4.PGE), int(EFER.NXE)
_CR0_FLUSH = int(CR0.PG | CR0.WP)
_CR4_FLUSH = int(CR4.PGE | CR4.PAE | CR4.PSE | CR4.SMEP)
NOFLUSH = 1 << 63       # MOV to CR3 with CR4.PCIDE: keep the PCID's entries
PCID_MASK = 0xFFF       # CR3 bits 11:0 with CR4.PCIDE: the current PCID
_NONE, _PCID, _ALL = TlbFlush.NONE, TlbFlush.PCID, TlbFlush.ALL


def mov_to_cr_flush(cr: int, old: int, new: int, cr4: int) -> TlbFlush:
    """What MOV to CRn invalidates (SDM Vol.3A §4.10.4.1): MOV to CR3 the
    non-global entries of the PCID it loads (none with CR4.PCIDE and bit 63
    set), or all of them while CR4.PGE and PCIDE are clear (G counts only
    with PGE, §4.10.2.4); MOV to CR0 or CR4 all of them when it changes
    CR0.PG or WP, or CR4.PGE, PAE, PSE or SMEP, or clears CR4.PCIDE."""
    if cr == 3:
        if cr4 & _PCIDE:
            return _NONE if new & NOFLUSH else _PCID
        return _PCID if cr4 & PGE else _ALL
    if cr == 0:
        return _ALL if (old ^ new) & _CR0_FLUSH else _NONE
    return _ALL if (old ^ new) & _CR4_FLUSH or old & ~new & _PCIDE else _NONE


def efer_write_flush(old: int, new: int) -> TlbFlush:
    """A WRMSR to IA32_EFER that changes NXE changes what every entry
    means: all of them go."""
    return _ALL if (old ^ new) & NXE else _NONE


class Vector(IntEnum):
    """Exception vectors, SDM Vol.3A §6.3.1, Table 6-1."""
    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19


# Exceptions that push an error code (SDM Vol.3A §6.13).
HAS_ERROR_CODE = frozenset({Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP,
                            Vector.PF, Vector.AC})

# Classes for double-fault detection (SDM Vol.3A §6.15, Table 6-4/6-5).
CONTRIBUTORY = frozenset({Vector.DE, Vector.TS, Vector.NP, Vector.SS, Vector.GP})


def causes_double_fault(first: int, second: int) -> bool:
    """Whether `second`, raised while delivering `first`, becomes #DF (Table 6-5)."""
    if first == Vector.PF:
        return second == Vector.PF or second in CONTRIBUTORY
    if first in CONTRIBUTORY:
        return second in CONTRIBUTORY
    return False


class RFLAGS(IntFlag):
    """SDM Vol.1 §3.4.3."""
    CF = 1 << 0
    FIXED = 1 << 1  # always 1
    TF = 1 << 8
    IF = 1 << 9
    NT = 1 << 14
    RF = 1 << 16
    VM = 1 << 17
    AC = 1 << 18


# 64-bit IDT gate (SDM Vol.3A §6.14.1, Figure 6-8): 16 bytes.
IDT_GATE_SIZE = 16
GATE_INTERRUPT = 0xE
GATE_TRAP = 0xF


def decode_idt_gate(raw: bytes) -> tuple[int, int, int, int, bool, int]:
    """(offset, selector, ist, type, present, dpl) of a 16-byte IDT gate."""
    lo = int.from_bytes(raw[0:8], "little")
    hi = int.from_bytes(raw[8:16], "little")
    offset = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000) | ((hi & 0xFFFF_FFFF) << 32)
    selector = (lo >> 16) & 0xFFFF
    ist = (lo >> 32) & 0x7
    gate_type = (lo >> 40) & 0xF
    dpl = (lo >> 45) & 0x3
    present = bool((lo >> 47) & 1)
    return offset, selector, ist, gate_type, present, dpl


# Outside IA-32e mode: 8-byte gates in protected mode (SDM Vol.3A §6.11,
# Figure 6-2), 4-byte vectors (offset, segment) in real mode (§20.1.4).
LEGACY_GATE_SIZE = 8
IVT_ENTRY_SIZE = 4
GATE_TASK, GATE_INTERRUPT16, GATE_TRAP16 = 0x5, 0x6, 0x7
TSS32_ESP0 = 0x04           # a 32-bit TSS's ESPn at 4 + 8n, SSn at 8 + 8n (§7.2.1)


def decode_legacy_gate(raw: bytes) -> tuple[int, int, int, bool, int]:
    """(offset, selector, type, present, dpl) of an 8-byte protected-mode gate."""
    lo = int.from_bytes(raw[0:8], "little")
    offset = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000)
    return offset, (lo >> 16) & 0xFFFF, (lo >> 40) & 0xF, bool((lo >> 47) & 1), (lo >> 45) & 0x3


# Flat 64-bit GDT descriptors (SDM Vol.3A §3.4.5): code L=1 P=1 S=1 type=execute/read.
GDT_CODE64 = 0x00AF_9A00_0000_FFFF
GDT_DATA = 0x00CF_9200_0000_FFFF

# 64-bit TSS fields (SDM Vol.3A §8.7, Figure 8-11).
TSS_RSP0 = 0x04
TSS_IST1 = 0x24
