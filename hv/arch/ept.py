"""EPT: extended page table entries, the EPTP and EPT-violation exit
qualifications (SDM Vol.3C §29.3 "The Extended Page Table Mechanism").

Pure definitions. Entries are plain ints tested with these masks.
"""
from __future__ import annotations

from enum import IntFlag

from .paging import ADDR_MASK, RSVD_HIGH


class EPTE(IntFlag):
    """Bits of an EPT paging-structure entry (SDM Vol.3C §29.3.2, Tables 29-1..29-6)."""
    R = 1 << 0          # read access
    W = 1 << 1          # write access
    X = 1 << 2          # execute access (supervisor-mode with MBEC)
    MT_WB = 6 << 3      # leaf memory type, bits 5:3: write-back
    IPAT = 1 << 6       # ignore PAT (leaf)
    LARGE = 1 << 7      # 1 GiB (PDPTE) or 2 MiB (PDE) page
    A = 1 << 8          # accessed (with EPTP bit 6)
    D = 1 << 9          # dirty (leaf, with EPTP bit 6)


R, W, X, LARGE, EA, ED = (int(EPTE.R), int(EPTE.W), int(EPTE.X), int(EPTE.LARGE),
                          int(EPTE.A), int(EPTE.D))
RWX = R | W | X
MT_MASK = 7 << 3
MT_WB = int(EPTE.MT_WB)
EPT_ADDR_MASK = ADDR_MASK
INVALID_MEMORY_TYPES = frozenset({2, 3, 7})     # SDM Vol.3C §29.3.3.1

# EPTP (SDM Vol.3C §25.6.11): memory type WB (bits 2:0), the page-walk
# length less one (bits 5:3: 4 or 5 levels), A/D enable (bit 6).
EPTP_WB = 6
EPTP_WALK_SHIFT = 3
EPTP_AD = 1 << 6


def eptp(root_hpa: int, ad: bool = True, levels: int = 4) -> int:
    return root_hpa | EPTP_WB | (levels - 1) << EPTP_WALK_SHIFT | (EPTP_AD if ad else 0)


def eptp_levels(eptp_value: int) -> int:
    """The levels of the EPT an EPTP points at: 4, or 5 (5-level EPT)."""
    return (eptp_value >> EPTP_WALK_SHIFT & 7) + 1


def is_leaf(level: int, entry: int) -> bool:
    """Whether a present EPT entry at `level` maps a page (SDM Vol.3C §29.3.2)."""
    return level == 1 or bool(entry & LARGE)


def misconfigured(level: int, entry: int) -> bool:
    """An entry the processor refuses: EPT_MISCONFIG (SDM Vol.3C §29.3.3.1).
    Write without read, reserved bits, or a reserved memory type in a leaf."""
    if entry & W and not entry & R:
        return True
    if entry & RSVD_HIGH:
        return True
    if level >= 4 and entry & LARGE:
        return True
    leaf = is_leaf(level, entry)
    if not leaf and entry & MT_MASK:
        return True     # bits 7:3 of a non-leaf entry are reserved
    if leaf and (entry & MT_MASK) >> 3 in INVALID_MEMORY_TYPES:
        return True
    if leaf and level > 1 and entry & ((1 << (12 + 9 * (level - 1))) - 1) & ~0xFFF:
        return True     # a large page's address bits below its size
    return False


class EptQual(IntFlag):
    """EPT-violation exit qualification (SDM Vol.3C §28.2.1, Table 28-7)."""
    READ = 1 << 0
    WRITE = 1 << 1
    FETCH = 1 << 2
    READABLE = 1 << 3           # the entry's R bit (all levels ANDed)
    WRITABLE = 1 << 4
    EXECUTABLE = 1 << 5
    GLA_VALID = 1 << 7          # a guest linear address caused it
    GLA_TRANSLATION = 1 << 8    # the access was to the final page, not a guest table
