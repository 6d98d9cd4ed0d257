"""The page walker: references, A/D bits and every fault with its error code
(SDM Vol.3A §4.5-§4.8), on tables built by hand in a PhysMem."""
import pytest

from hv.arch.paging import A, D, NX, P, PS, RW, US, G, PFErr
from hv.memory import PhysMem
from hv.errors import GuestEscape
from hv.events import PageFault
from hv.events import NonCanonical
from hv.hw.memo import WalkMemo
from hv.hw.walker import FETCH, FIVE_LEVEL, READ, WRITE, Walker
from hv.stats import Stats

RAM = 4 << 20
CR3 = 0x1000
VA = 0x0000_7F12_3456_7000


class Tables:
    """A tiny allocator that builds 4-level tables in a PhysMem."""

    def __init__(self):
        self.mem = PhysMem(RAM)
        self.next = 0x2000

    def alloc(self) -> int:
        page, self.next = self.next, self.next + 0x1000
        return page

    def map(self, va, pa, leaf_flags=P | RW, level=1, upper=P | RW | US):
        table = CR3
        for lv in range(4, level, -1):
            addr = table + ((va >> (12 + 9 * (lv - 1))) & 0x1FF) * 8
            entry = self.mem.read_u64(addr)
            if not entry & P:
                entry = self.alloc() | upper
                self.mem.write_u64(addr, entry)
            table = entry & ~0xFFF & ((1 << 52) - 1)
        leaf = table + ((va >> (12 + 9 * (level - 1))) & 0x1FF) * 8
        self.mem.write_u64(leaf, pa | leaf_flags | (PS if level > 1 else 0))
        return leaf

    def entries(self, va):
        """Addresses of the entries a walk of `va` reads, PML4 first."""
        out, table = [], CR3
        for lv in range(4, 0, -1):
            addr = table + ((va >> (12 + 9 * (lv - 1))) & 0x1FF) * 8
            out.append(addr)
            entry = self.mem.read_u64(addr)
            if entry & PS or lv == 1:
                break
            table = entry & ~0xFFF & ((1 << 52) - 1)
        return out


def walk(t, va=VA, access=READ, user=False, wp=True, nxe=True, stats=None):
    stats = stats or Stats()
    return Walker(t.mem, stats, RAM).walk(CR3, va, access, user, wp, nxe), stats


def fault(t, **kw) -> int:
    with pytest.raises(PageFault) as info:
        walk(t, **kw)
    return info.value.error_code


def test_4k_walk_reads_four_entries_and_sets_accessed():
    t = Tables()
    t.map(VA, 0x30_0000)
    tr, stats = walk(t, va=VA + 0x123)
    assert tr.paddr(VA + 0x123) == 0x30_0123 and tr.shift == 12
    assert stats.counters["tlb.walk_refs"] == 4 and stats.walk_hist == {4: 1}
    assert dict(stats.refs_by_tag) == {("guest", 4): 1, ("guest", 3): 1, ("guest", 2): 1, ("guest", 1): 1}
    for addr in t.entries(VA):
        assert t.mem.read_u64(addr) & A
    assert not t.mem.read_u64(t.entries(VA)[-1]) & D


def test_write_sets_dirty_in_the_leaf_only():
    t = Tables()
    t.map(VA, 0x30_0000)
    tr, _ = walk(t, access=WRITE)
    assert tr.dirty
    *upper, leaf = t.entries(VA)
    assert t.mem.read_u64(leaf) & D
    assert not any(t.mem.read_u64(a) & D for a in upper)


@pytest.mark.parametrize("level,refs,size", [(2, 3, 1 << 21), (3, 2, 1 << 30)])
def test_large_pages_need_fewer_references(level, refs, size):
    t = Tables()
    va = 0x4000_0000 * 3
    t.map(va, 0, level=level)
    tr, stats = walk(t, va=va + 0x1234)
    assert stats.counters["tlb.walk_refs"] == refs
    assert tr.shift == {2: 21, 3: 30}[level] and tr.vbase == va and 1 << tr.shift == size


@pytest.mark.parametrize("access,user,expect", [
    (READ, False, 0), (WRITE, False, PFErr.W), (READ, True, PFErr.U),
    (FETCH, False, PFErr.I), (WRITE, True, PFErr.W | PFErr.U)])
def test_not_present_error_codes(access, user, expect):
    t = Tables()
    assert fault(t, access=access, user=user) == expect


def test_not_present_at_every_level():
    t = Tables()
    leaf = t.map(VA, 0x30_0000)
    t.mem.write_u64(leaf, 0)
    assert fault(t) == 0
    pml4e = t.entries(VA)[0]
    t.mem.write_u64(pml4e, 0)
    stats = Stats()
    with pytest.raises(PageFault):
        walk(t, stats=stats)
    assert stats.walk_hist == {1: 1}


def test_write_to_read_only_page_honours_cr0_wp():
    t = Tables()
    t.map(VA, 0x30_0000, leaf_flags=P)
    assert fault(t, access=WRITE) == PFErr.P | PFErr.W
    tr, _ = walk(t, access=WRITE, wp=False)     # CR0.WP=0: supervisor writes anyway
    assert tr.paddr(VA) == 0x30_0000
    assert fault(t, access=WRITE, user=True, wp=False) == PFErr.P | PFErr.W | PFErr.U


def test_read_only_in_an_upper_level_protects_the_page():
    t = Tables()
    t.map(VA, 0x30_0000, upper=P | US)
    assert fault(t, access=WRITE) == PFErr.P | PFErr.W


def test_user_access_to_supervisor_page():
    t = Tables()
    t.map(VA, 0x30_0000, leaf_flags=P | RW)
    assert fault(t, user=True) == PFErr.P | PFErr.U
    t.map(VA, 0x30_0000, leaf_flags=P | RW | US)
    tr, _ = walk(t, user=True)
    assert tr.user


def test_fetch_from_nx_page():
    t = Tables()
    t.map(VA, 0x30_0000, leaf_flags=P | RW | NX)
    assert fault(t, access=FETCH) == PFErr.P | PFErr.I
    walk(t, access=READ)                        # reads are fine


def test_nx_bit_is_reserved_without_efer_nxe():
    t = Tables()
    t.map(VA, 0x30_0000, leaf_flags=P | RW | NX)
    assert fault(t, nxe=False) == PFErr.P | PFErr.RSVD
    # without NXE a fetch does not report I (as QEMU, the oracle)
    t.map(VA, 0x30_0000, leaf_flags=P | RW)
    t.mem.write_u64(t.entries(VA)[-1], 0)
    assert fault(t, access=FETCH, nxe=False) == 0


@pytest.mark.parametrize("bad", ["high", "ps_in_pml4", "large_low_bits"])
def test_reserved_bits(bad):
    t = Tables()
    if bad == "high":
        leaf = t.map(VA, 0x30_0000)
        t.mem.write_u64(leaf, t.mem.read_u64(leaf) | 1 << 50)
    elif bad == "ps_in_pml4":
        t.map(VA, 0x30_0000)
        pml4e = t.entries(VA)[0]
        t.mem.write_u64(pml4e, t.mem.read_u64(pml4e) | PS)
    else:
        t.map(0x4000_0000, 0x20_0000 | 1 << 13, level=2)
    va = 0x4000_0000 if bad == "large_low_bits" else VA
    assert fault(t, va=va, access=WRITE) == PFErr.P | PFErr.RSVD | PFErr.W


def test_protection_fault_sets_accessed_only_above_the_leaf():
    """QEMU's order, which the oracle follows: A as each table is used,
    the leaf's A only when the access is allowed."""
    t = Tables()
    t.map(VA, 0x30_0000, leaf_flags=P)
    fault(t, access=WRITE)
    *upper, leaf = t.entries(VA)
    assert all(t.mem.read_u64(a) & A for a in upper)
    assert not t.mem.read_u64(leaf) & A


def test_global_bit_is_reported():
    t = Tables()
    t.map(VA, 0x30_0000, leaf_flags=P | RW | G)
    tr, _ = walk(t)
    assert tr.global_


def test_table_outside_guest_memory_is_an_escape():
    t = Tables()
    leaf = t.map(VA, 0x30_0000)
    pde = t.entries(VA)[2]
    t.mem.write_u64(pde, (RAM + 0x1000) | P | RW)
    with pytest.raises(GuestEscape, match="outside guest memory"):
        walk(t)
    assert leaf


def test_smep_faults_a_supervisor_fetch_from_a_user_page_even_from_the_tlb():
    """SDM Vol.3A §4.6.1: with CR4.SMEP a fetch at CPL 0 from a user page is
    #PF(P | I), with or without EFER.NXE; a TLB entry a user fetch filled
    serves no supervisor fetch (HardwareMMU._allows)."""
    from hv.arch.x86 import CR4, PG, WP
    from hv.hw.mmu import HardwareMMU
    from hv.hw.tlb import TLB

    t = Tables()
    t.map(VA, 0x300000, P | RW | US)
    w = Walker(t.mem, Stats(), RAM)
    for nxe in (True, False):
        w.smep = True
        with pytest.raises(PageFault) as pf:
            w.walk(CR3, VA, FETCH, False, True, nxe)
        assert pf.value.error_code == PFErr.P | PFErr.I
        assert w.walk(CR3, VA, FETCH, True, True, nxe).pbase == 0x300000
        w.smep = False
        assert w.walk(CR3, VA, FETCH, False, True, nxe).pbase == 0x300000
    mmu = HardwareMMU(t.mem, Stats(), TLB(), 0)
    mmu.load(PG | WP, CR3, int(CR4.PAE | CR4.SMEP), 0)
    assert mmu.fill(VA, FETCH, True)[0] == 0x300000          # cached by a user fetch
    with pytest.raises(PageFault):
        mmu.fill(VA, FETCH, False)


def test_smap_faults_a_supervisor_data_access_to_a_user_page_unless_ac():
    """SDM Vol.3A §4.6.1: with CR4.SMAP a supervisor read or write of a user
    page is #PF (P, and W for a write) while EFLAGS.AC is clear, for the
    CPU's own (implicit) accesses whatever AC is; a TLB entry filled with
    AC set serves no access with AC clear."""
    from hv.arch.x86 import CR4, PG, WP
    from hv.hw.mmu import HardwareMMU
    from hv.hw.tlb import TLB

    t = Tables()
    t.map(VA, 0x300000, P | RW | US | A | D)
    mmu = HardwareMMU(t.mem, Stats(), TLB(), 0)
    mmu.load(PG | WP, CR3, int(CR4.PAE | CR4.SMAP), 0)
    mmu.ac = True
    assert mmu.fill(VA, WRITE, False)[0] == 0x300000
    assert mmu.fill(VA, FETCH, False)[0] == 0x300000        # SMAP is for data
    with pytest.raises(PageFault):
        mmu.translate(VA, READ)                             # implicit: AC ignored
    mmu.ac = False
    for access, code in ((READ, PFErr.P), (WRITE, PFErr.P | PFErr.W)):
        with pytest.raises(PageFault) as pf:
            mmu.fill(VA, access, False)
        assert pf.value.error_code == code
    assert mmu.fill(VA, READ, True)[0] == 0x300000           # a user access


def test_protection_keys_refuse_data_accesses_to_user_pages_even_from_the_tlb():
    """SDM Vol.3A §4.6.2 and §4.7: with CR4.PKE, PKRU's AD for a user
    page's key refuses every data access, WD a write at CPL 3 or with
    CR0.WP; the #PF has PK, also when the access faults for another reason
    too; a faulting access sets no A bit; fetches and supervisor pages
    ignore PKRU; a WRPKRU applies to entries the TLB holds."""
    from hv.arch.x86 import CR4, PG, WP
    from hv.hw.mmu import PROT_W, HardwareMMU
    from hv.hw.tlb import TLB

    key = 5
    t = Tables()
    leaf = t.map(VA, 0x300000, P | RW | US | D | key << 59)
    w = Walker(t.mem, Stats(), RAM)
    w.pke, w.pkru = True, 1 << 2 * key                      # AD
    for access, user, code in ((READ, True, PFErr.U), (READ, False, 0),
                               (WRITE, False, PFErr.W)):
        with pytest.raises(PageFault) as pf:
            w.walk(CR3, VA, access, user, True, True)
        assert pf.value.error_code == PFErr.P | PFErr.PK | code
    assert not t.mem.read_u64(leaf) & A
    assert w.walk(CR3, VA, FETCH, True, True, True).pkey == key
    w.pkru = 2 << 2 * key                                   # WD
    assert w.walk(CR3, VA, WRITE, False, False, True).writable     # supervisor, WP clear
    with pytest.raises(PageFault) as pf:
        w.walk(CR3, VA, WRITE, False, True, True)
    assert pf.value.error_code == PFErr.P | PFErr.W | PFErr.PK
    t.mem.write_u64(leaf, 0x300000 | P | US | key << 59)     # read-only too: PK still
    with pytest.raises(PageFault) as pf:
        w.walk(CR3, VA, WRITE, True, True, True)
    assert pf.value.error_code == PFErr.P | PFErr.W | PFErr.U | PFErr.PK
    t.mem.write_u64(leaf, 0x300000 | P | RW | key << 59)     # a supervisor page
    w.pkru = 3 << 2 * key
    assert w.walk(CR3, VA, WRITE, False, True, True).pbase == 0x300000

    t.mem.write_u64(leaf, 0x300000 | P | RW | US | A | D | key << 59)
    mmu = HardwareMMU(t.mem, Stats(), TLB(), 0)
    mmu.load(PG | WP, CR3, int(CR4.PAE | CR4.PKE), 0)
    assert mmu.fill(VA, WRITE, True)[1] & PROT_W
    mmu.set_pkru(2 << 2 * key)                              # WD: the cached entry refuses
    assert not mmu.fill(VA, READ, True)[1] & PROT_W
    with pytest.raises(PageFault) as pf:
        mmu.fill(VA, WRITE, True)
    assert pf.value.error_code & PFErr.PK


def test_the_walk_memo_keeps_walks_under_different_pkru_apart():
    """A replayed walk must be the walk PKRU allows now: AD for key 2 is
    PKRU bit 4, which the memo's key once put where CR3 bit 12 is (and the
    tables' root here is 0x1000)."""
    from hv.hw.memo import WalkMemo

    t = Tables()
    t.map(VA, 0x300000, P | RW | US | A | D | 2 << 59)
    w = Walker(t.mem, Stats(), RAM)
    w.memo, w.pke = WalkMemo([]), True
    assert w.walk(CR3, VA, READ, True, True, True).pbase == 0x300000
    assert w.walk(CR3, VA, READ, True, True, True).pbase == 0x300000    # replayed
    w.pkru = 1 << 4
    with pytest.raises(PageFault) as pf:
        w.walk(CR3, VA, READ, True, True, True)
    assert pf.value.error_code == PFErr.P | PFErr.U | PFErr.PK


def test_five_level_walks_start_at_the_pml5_and_check_57_bit_canonical_form():
    """SDM Vol.3A §4.5.1: with CR4.LA57 a walk starts at the PML5 (bits
    56:48) and an address is canonical when bits 63:57 equal bit 56."""
    t = Tables()
    pml4 = CR3                      # the 4-level tables under the PML5's entry
    pml5 = t.alloc()
    high = 0x00AB_0000_0000_0000 | VA    # PML5 index 0xAB: not canonical at 48 bits
    t.map(VA, 0x30_0000)
    t.mem.write_u64(pml5 + 0xAB * 8, pml4 | P | RW | US)
    t.mem.write_u64(pml5, pml4 | P | RW | US)
    w = Walker(t.mem, Stats(), RAM)
    w.memo = WalkMemo([])
    with pytest.raises(NonCanonical):
        w.walk(pml4, high, READ, False, True, True)
    for va in (VA, high):
        tr = w.walk(pml5 | FIVE_LEVEL, va, READ, False, True, True)
        assert tr.paddr(va + 0x10) == 0x30_0010
    assert w.stats.counters["tlb.walk_refs"] == 10 and w.stats.walk_hist == {5: 2}
    assert w.by_level == [0, 2, 2, 2, 2, 2]
    with pytest.raises(NonCanonical):
        w.walk(pml5 | FIVE_LEVEL, 0x0100_0000_0000_0000 | VA, READ, False, True, True)
    # The same root walked with 4 and with 5 levels: the memo keeps the two
    # apart (read as a PML5, the PML4 has no entry 0).
    assert w.walk(pml4, VA, READ, False, True, True).paddr(VA) == 0x30_0000
    with pytest.raises(PageFault):
        w.walk(pml4 | FIVE_LEVEL, VA, READ, False, True, True)
