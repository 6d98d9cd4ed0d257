"""Architecture definitions: the numbers the SDM fixes."""
import pytest

from hv.arch.paging import (PAGE_SIZES, PFErr, PTE, is_canonical, level_shift, reserved_mask,
                            table_index)
from hv.arch.vmx import ExitReason, cr_access_qualification
from hv.arch.x86 import (CR0, CR4, EFER, Vector, causes_double_fault, decode_idt_gate,
                         mov_to_cr_faults)
from hv.vmm.exits import io_qualification


def test_pte_and_error_code_bits():
    assert (PTE.P, PTE.RW, PTE.US, PTE.A, PTE.D, PTE.PS, PTE.G) == (1, 2, 4, 0x20, 0x40, 0x80, 0x100)
    assert PTE.NX == 1 << 63
    assert (PFErr.P, PFErr.W, PFErr.U, PFErr.RSVD, PFErr.I) == (1, 2, 4, 8, 16)


def test_control_register_bits():
    assert (CR0.PE, CR0.WP, CR0.PG) == (1, 1 << 16, 1 << 31)
    assert (CR4.PAE, CR4.PGE) == (1 << 5, 1 << 7)
    assert (EFER.LME, EFER.LMA, EFER.NXE) == (1 << 8, 1 << 10, 1 << 11)


def test_exit_reason_numbers_are_the_sdm_basic_exit_reasons():
    expect = {"EXCEPTION_NMI": 0, "TRIPLE_FAULT": 2, "CPUID": 10, "HLT": 12, "INVLPG": 14,
              "VMCALL": 18, "CR_ACCESS": 28, "IO_INSTRUCTION": 30, "MSR_READ": 31,
              "MSR_WRITE": 32, "EPT_VIOLATION": 48, "EPT_MISCONFIG": 49}
    assert {name: ExitReason[name].value for name in expect} == expect


def test_address_split_into_table_indexes():
    va = (0x1A3 << 39) | (0x0F2 << 30) | (0x111 << 21) | (0x0AB << 12) | 0x567
    assert [table_index(va, lv) for lv in (4, 3, 2, 1)] == [0x1A3, 0x0F2, 0x111, 0x0AB]
    assert [level_shift(lv) for lv in (1, 2, 3, 4)] == [12, 21, 30, 39]
    assert PAGE_SIZES == {1: 4096, 2: 2 << 20, 3: 1 << 30}


@pytest.mark.parametrize("va,ok", [(0, True), (0x7FFF_FFFF_FFFF, True),
                                   (0x8000_0000_0000, False), (0xFFFF_8000_0000_0000, True),
                                   (0x8000_0000_0000_0000, False)])
def test_canonical_addresses(va, ok):
    assert is_canonical(va) == ok


def test_reserved_bits_by_level():
    assert reserved_mask(4, 0, nxe=True) & PTE.PS
    assert not reserved_mask(3, 0, nxe=True) & PTE.PS          # PS is a 1 GiB page
    assert reserved_mask(2, PTE.PS, nxe=True) & (1 << 13)      # 2 MiB page: bits 20:13
    assert not reserved_mask(2, PTE.PS, nxe=True) & (1 << 12)  # PAT
    assert reserved_mask(1, 0, nxe=False) & PTE.NX
    assert not reserved_mask(1, 0, nxe=True) & PTE.NX


def test_idt_gate_decoding():
    offset = 0x1234_5678_9ABC_DEF0
    lo = (offset & 0xFFFF) | (0x08 << 16) | (2 << 32) | (0x8E << 40) | ((offset >> 16 & 0xFFFF) << 48)
    hi = offset >> 32
    raw = lo.to_bytes(8, "little") + hi.to_bytes(8, "little")
    assert decode_idt_gate(raw) == (offset, 0x08, 2, 0xE, True, 0)


def test_double_fault_rules():
    """SDM Vol.3A Table 6-5."""
    assert causes_double_fault(Vector.PF, Vector.PF)
    assert causes_double_fault(Vector.PF, Vector.GP)
    assert causes_double_fault(Vector.GP, Vector.NP)
    assert not causes_double_fault(Vector.GP, Vector.PF)
    assert not causes_double_fault(Vector.UD, Vector.GP)       # benign first: serial


def test_exit_qualifications():
    assert cr_access_qualification(3, 0) == 3
    assert io_qualification(0x3F8, 1, False) == 0x3F8 << 16
    assert io_qualification(0x3FD, 1, True) == (0x3FD << 16) | 8


def test_mov_to_cr_reserved_bits():
    """SDM Vol.2B "MOV-Move to/from Control Registers": #GP(0) cases."""
    assert not mov_to_cr_faults(3, 0x2000 | 0x18, 0)                # PWT, PCD
    assert mov_to_cr_faults(3, 1 << 40 | 0x2000, 0)                 # above MAXPHYADDR
    assert mov_to_cr_faults(3, 1 << 63 | 0x2000, 0)
    assert not mov_to_cr_faults(3, 1 << 63 | 0x2000, CR4.PCIDE)     # no-flush with PCIDE
    assert mov_to_cr_faults(0, CR0.PG, 0)                           # PG without PE
    assert mov_to_cr_faults(0, CR0.PE | CR0.NW, 0)                  # NW without CD
    assert mov_to_cr_faults(0, 1 << 32 | CR0.PE, 0) and mov_to_cr_faults(4, 1 << 40, 0)
    assert not mov_to_cr_faults(0, CR0.PE | CR0.PG | CR0.WP, 0)
    assert not mov_to_cr_faults(8, 1 << 40, 0)
    # Leaving IA-32e mode from 64-bit mode: clearing CR0.PG or CR4.PAE
    assert mov_to_cr_faults(0, CR0.PE, 0, EFER.LMA) and not mov_to_cr_faults(0, CR0.PE, 0)
    assert mov_to_cr_faults(4, CR4.PGE, 0, EFER.LMA) and not mov_to_cr_faults(4, CR4.PGE, 0)
    assert not mov_to_cr_faults(0, CR0.PE | CR0.PG, 0, EFER.LMA)
    assert not mov_to_cr_faults(4, CR4.PAE, 0, EFER.LMA)


def test_cr4_bits_of_features_the_cpu_has_not_are_gp():
    """SDM Vol.3A §2.5: a CR4 bit whose feature CPUID does not report is
    reserved (what kvm-unit-tests pcid checks of CR4.PCIDE)."""
    from hv.arch import cpuid
    reserved = cpuid.cr4_reserved(cpuid.IMPLEMENTED)
    for bit in (CR4.VME, CR4.MCE, CR4.FSGSBASE, CR4.OSXSAVE, CR4.UMIP, 1 << 13):   # 13: VMXE
        assert mov_to_cr_faults(4, CR4.PAE | bit, 0, 0, reserved), bit
    for bit in (CR4.TSD, CR4.DE, CR4.PSE, CR4.PGE, CR4.PCE, CR4.OSFXSR, CR4.OSXMMEXCPT,
                CR4.SMEP, CR4.SMAP, CR4.PKE, CR4.LA57):
        assert not mov_to_cr_faults(4, CR4.PAE | bit, 0, 0, reserved), bit
    for feature, bit in (("smep", CR4.SMEP), ("pku", CR4.PKE), ("la57", CR4.LA57)):
        assert mov_to_cr_faults(4, CR4.PAE | bit, 0, 0,
                                cpuid.cr4_reserved(cpuid.IMPLEMENTED - {feature}))
    assert mov_to_cr_faults(4, CR4.PAE | CR4.PCIDE, 0, EFER.LMA,
                            cpuid.cr4_reserved(cpuid.IMPLEMENTED - {"pcid"}))
    assert not mov_to_cr_faults(4, CR4.PAE | CR4.PCIDE, 0, EFER.LMA, reserved)


def test_cr4_pcide_is_set_only_in_ia32e_mode_with_pcid_0():
    """SDM Vol.2B "MOV-Move to/from Control Registers": setting CR4.PCIDE
    is #GP outside IA-32e mode or while CR3[11:0] is not 0; keeping it set
    is not."""
    lma, pae_pcide = EFER.LMA | EFER.LME, CR4.PAE | CR4.PCIDE
    assert not mov_to_cr_faults(4, pae_pcide, CR4.PAE, lma, 0, 0x2000)
    assert mov_to_cr_faults(4, pae_pcide, CR4.PAE, EFER.LME, 0, 0x2000)     # LMA clear
    assert mov_to_cr_faults(4, pae_pcide, CR4.PAE, lma, 0, 0x2001)          # PCID 1
    assert mov_to_cr_faults(4, pae_pcide, CR4.PAE, lma, 0, 0x2008)          # PWT
    assert not mov_to_cr_faults(4, pae_pcide, pae_pcide, lma, 0, 0x2001)    # already set
    assert mov_to_cr_faults(0, CR0.PE, CR4.PAE | CR4.PCIDE, lma)            # PG cleared


def test_5_level_paging_is_entered_from_outside_ia32e_mode():
    """SDM Vol.2B "MOV-Move to/from Control Registers": CR4.LA57 changes
    only while IA-32e mode is inactive; IA-32e mode is left by clearing
    CR0.PG in compatibility mode (#GP in 64-bit mode, or with CR4.PCIDE),
    Vol.3A §9.8.5.4: the way kvm-unit-tests la57 enters 5-level paging."""
    lma = EFER.LMA | EFER.LME
    pae = CR4.PAE
    assert mov_to_cr_faults(4, pae | CR4.LA57, pae, lma)              # set in IA-32e mode
    assert mov_to_cr_faults(4, pae, pae | CR4.LA57, lma)              # or cleared
    assert not mov_to_cr_faults(4, pae | CR4.LA57, pae | CR4.LA57, lma)
    assert not mov_to_cr_faults(4, pae | CR4.LA57, pae, EFER.LME)    # paging off
    assert mov_to_cr_faults(0, CR0.PE, pae, lma, code64=True)
    assert not mov_to_cr_faults(0, CR0.PE, pae, lma, code64=False)  # compatibility mode
    assert mov_to_cr_faults(0, CR0.PE, pae | CR4.PCIDE, lma, code64=False)
