"""x86-64 4- and 5-level paging: entry bits, levels and the #PF error code.

Pure definitions, no behaviour. Entries are plain ints tested with these
masks (the walker is a hot path); the IntFlag classes name the same bits for
tests and reports. Rules cite the Intel SDM as "SDM Vol.3A §x.y".
"""
from __future__ import annotations

from enum import IntEnum, IntFlag

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ENTRIES_PER_TABLE = 512

# The guest CPU's physical-address width: Unicorn's CPU model reports 40
# in CPUID.80000008H:EAX[7:0], and QEMU's walker (the oracle) treats bits
# 51:40 of an entry as reserved (SDM Vol.3A §4.5.4, Table 4-20).
MAXPHYADDR = 40
PHYS_MASK = (1 << MAXPHYADDR) - 1
ADDR_MASK = PHYS_MASK & ~(PAGE_SIZE - 1)      # bits MAXPHYADDR-1:12
RSVD_HIGH = ((1 << 52) - 1) & ~PHYS_MASK      # bits 51:MAXPHYADDR


class PTE(IntFlag):
    """Bits of a paging-structure entry (SDM Vol.3A §4.5.4, Tables 4-15..4-20)."""
    P = 1 << 0      # present
    RW = 1 << 1     # writable
    US = 1 << 2     # user accessible
    PWT = 1 << 3
    PCD = 1 << 4
    A = 1 << 5      # accessed
    D = 1 << 6      # dirty (leaf only)
    PS = 1 << 7     # page size: 1 GiB in a PDPTE, 2 MiB in a PDE
    G = 1 << 8      # global (leaf only, with CR4.PGE)
    NX = 1 << 63    # execute disable (with EFER.NXE)


P, RW, US, A, D, PS, G, NX = (int(PTE.P), int(PTE.RW), int(PTE.US), int(PTE.A),
                              int(PTE.D), int(PTE.PS), int(PTE.G), int(PTE.NX))

# Agile paging's switch bit in a non-leaf shadow entry (hardware no CPU
# ships; hv.vmm.agile): one of the bits 62:52 that 4-level paging ignores
# (SDM Vol.3A §4.5.4, Tables 4-15..4-19).
SWITCH = 1 << 52


class Level(IntEnum):
    """Paging-structure levels, named as in the SDM; the value is the level number."""
    PT = 1
    PD = 2
    PDPT = 3
    PML4 = 4
    PML5 = 5        # with CR4.LA57 (SDM Vol.3A §4.5.1)


def level_shift(level: int) -> int:
    """Bits of linear address translated below `level`: 12, 21, 30, 39, 48."""
    return PAGE_SHIFT + 9 * (level - 1)


def table_index(vaddr: int, level: int) -> int:
    """Index of `vaddr`'s entry in a table at `level` (SDM Vol.3A §4.5.4):
    bits level_shift(level)+8 : level_shift(level) of the address."""
    return (vaddr >> (3 + 9 * level)) & 0x1FF


def is_leaf(level: int, entry: int) -> bool:
    """Whether a present entry at `level` maps a page: every PTE, and a PDE
    or PDPTE with PS (SDM Vol.3A §4.5.4)."""
    return level == 1 or bool(entry & PS)


def large_frame(entry: int, level: int) -> int:
    """The physical base of the page a leaf at `level` maps: its address
    bits above the page size (bit 12 of a large leaf is PAT, not an address
    bit: SDM Vol.3A §4.5.4, Tables 4-17 and 4-19)."""
    return entry & ADDR_MASK & ~((1 << level_shift(level)) - 1)


# Leaf page sizes by the level that maps them.
PAGE_SIZES = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}


def is_canonical(vaddr: int, bits: int = 48) -> bool:
    """Canonical form for `bits`-bit linear addresses: bits 63:bits-1 all
    equal (SDM Vol.1 §3.3.7.1)."""
    top = vaddr >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def reserved_mask(level: int, entry: int, nxe: bool) -> int:
    """Bits of `entry` that must be zero at `level` (SDM Vol.3A §4.5.4, Table 4-20).

    Bit 7 is reserved in a PML5E and a PML4E; in a 1 GiB or 2 MiB leaf the address bits
    below the page size (except PAT, bit 12) are reserved.
    """
    mask = RSVD_HIGH
    if not nxe:
        mask |= NX
    if level >= 4:
        mask |= PS
    elif level in (2, 3) and entry & PS:
        mask |= ((1 << level_shift(level)) - 1) & ~((1 << 13) - 1)
    return mask


class PFErr(IntFlag):
    """The page-fault error code (SDM Vol.3A §4.7, Figure 4-12)."""
    P = 1 << 0      # 0: not present; 1: protection violation
    W = 1 << 1      # the access was a write
    U = 1 << 2      # the access was in user mode (CPL 3)
    RSVD = 1 << 3   # a reserved bit was set in some entry
    I = 1 << 4      # the access was an instruction fetch (with NXE)
    PK = 1 << 5     # protection keys refused the data access (CR4.PKE)
