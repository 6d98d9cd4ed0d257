"""EPT: the two-dimensional walk's arithmetic, EPT violations, and what is
no longer an exit."""
from collections import Counter

import pytest

import hv
from hv.api import make_result
from hv.arch import ept
from hv.arch.paging import ADDR_MASK, level_shift
from hv.memory import GiB, GuestMemory, parse_size
from hv.vmm.ept import EptTables
from hv.vmm.vm import VM, Config

from conftest import LIB, image, run_src

EXIT = "xor eax, eax\nmov dx, 0xf4\nout dx, al\n"


def mark(n: int) -> str:
    return f"xor eax, eax\nmov ebx, {n}\nvmcall\n"


# Touch 16 pages through 4 KiB guest pages: a PT at 0x500000 maps VA
# 0x3000000.. to frames 0x600000.. (boot PD entry 24). Marks 1-2 bracket a
# pass whose pages are warm in EPT but not in the TLB.
TOUCH_4K = """
    mov rbx, 0x500000
    mov rax, 0x600003
    mov rcx, 16
map:
    mov qword ptr [rbx], rax
    add rbx, 8
    add rax, 0x1000
    loop map
    mov rax, 0x500003
    mov qword ptr [0x4000 + 24 * 8], rax
    mov r12, 0x3000000
    mov rcx, 16
first:
    mov rax, qword ptr [r12 + rcx * 8 - 8]
    mov rdx, rcx
    shl rdx, 12
    mov rax, qword ptr [r12 + rdx - 0x1000]
    loop first
    mov rax, cr3
    mov cr3, rax                       ; empty the TLB; EPT stays warm
""" + mark(1) + """
    mov rcx, 16
second:
    mov rdx, rcx
    shl rdx, 12
    mov rax, qword ptr [r12 + rdx - 0x1000]
    loop second
""" + mark(2) + EXIT


def ept_run(src, **kw):
    vm = VM(image(src), Config(mmu="ept", **kw))
    vm.run()
    return make_result("test", vm), vm


def refs_per_walk(r, a, b):
    d = r.between(a, b)
    return d["tlb.walk_refs"] / d["tlb.walks"], d


def test_a_cold_4k_on_4k_miss_costs_24_references():
    r, _ = ept_run(TOUCH_4K)
    per_walk, d = refs_per_walk(r, 1, 2)
    assert d["tlb.misses"] == 16 and per_walk == 24     # (4+1)*(4+1)-1
    assert d.exits["EPT_VIOLATION"] == 0
    assert r.tlb["walk_refs_hist"][24] >= 16


def test_large_ept_pages_shorten_the_walk():
    r, _ = ept_run(TOUCH_4K, ept_large_pages=True)
    per_walk, _ = refs_per_walk(r, 1, 2)
    assert per_walk == 19                                # (4+1)*(3+1)-1
    assert r.counters["pages_2m"] >= 1 and "pages_4k" not in r.counters
    r, _ = ept_run(TOUCH_4K, ept_large_pages=True, ram=2 << 30)
    per_walk, _ = refs_per_walk(r, 1, 2)
    assert per_walk == 14                                # (4+1)*(2+1)-1
    assert r.counters["pages_1g"] == 1


def test_2m_guest_pages_on_4k_ept():
    r, _ = ept_run(mark(1) + """
        mov rax, qword ptr [0x1000000]
    """ + mark(2) + mark(3) + """
        mov rax, cr3
        mov cr3, rax
        mov rax, qword ptr [0x1000000]
    """ + mark(4) + EXIT)
    per_walk, _ = refs_per_walk(r, 3, 4)
    assert per_walk == 19                                # (3+1)*(4+1)-1


def test_first_touch_of_each_frame_is_one_ept_violation():
    r, vm = ept_run(mark(1) + """
        mov rbx, 0x1000000
        mov rcx, 32
    touch:
        mov qword ptr [rbx], rcx
        add rbx, 0x1000
        loop touch
    """ + mark(2) + """
        mov rbx, 0x1000000
        mov rcx, 32
    again:
        mov rax, qword ptr [rbx]
        add rbx, 0x1000
        loop again
    """ + mark(3) + EXIT)
    assert r.between(1, 2)["exit.EPT_VIOLATION"] == 32
    assert r.between(2, 3).exits["EPT_VIOLATION"] == 0
    assert r.between(1, 2)["pages_4k"] == 32


def test_cr3_invlpg_and_guest_page_faults_are_no_exits():
    r, _ = ept_run(LIB + """
        mov rdi, 14
        lea rsi, [rip + pf_handler]
        call idt_set_handler
    """ + mark(1) + """
        mov rax, cr3
        mov cr3, rax
        invlpg [0x1000000]
        mov rax, 0x700000000000
        mov rax, qword ptr [rax]             ; #PF, handled by the guest
    """ + mark(2) + """
        xor eax, eax
        call exit
    pf_handler:
        add qword ptr [rdi + FRAME_RIP], 3   ; skip the 3-byte load
        ret
    """)
    d = r.between(1, 2)
    assert d["cr3_loads"] == 1 and d["invlpg"] == 1 and d["pf_guest"] == 1
    assert d["exits"] == d["exit.VMCALL"] + d["exit.EPT_VIOLATION"]


def test_guest_physical_outside_ram_stops_the_vm():
    r = run_src("""
        mov rax, 0x100000083                 ; a 2 MiB page at GPA 4 GiB
        mov qword ptr [0x4000 + 8 * 20], rax
        mov rax, qword ptr [0x2800000]
    """ + EXIT, "ept")
    assert r.reason == "escape" and "0x100000000" in r.detail


def test_a_malformed_ept_entry_is_an_ept_misconfig():
    vm = VM(image("mov rax, qword ptr [0x1000000]\n" + EXIT), Config(mmu="ept"))
    # Write without read in the EPT PML4 entry the guest will need.
    vm.mem.write_u64(vm.mmu.root, vm.mmu.frames.alloc() | ept.W | ept.X)
    vm.run()
    r = make_result("test", vm)
    assert r.reason == "ept_misconfig" and r.exits["EPT_MISCONFIG"] == 1


@pytest.mark.parametrize("bad", [ept.W, ept.R | ept.LARGE | (2 << 3)])
def test_misconfiguration_rules(bad):
    assert ept.misconfigured(3, bad)
    assert not ept.misconfigured(1, ept.RWX | ept.MT_WB)


def test_warm_page_walk_caches_cut_the_references():
    plain, _ = ept_run(TOUCH_4K)
    cached, _ = ept_run(TOUCH_4K, pwc=True)
    per_plain, d_plain = refs_per_walk(plain, 1, 2)
    per_cached, d = refs_per_walk(cached, 1, 2)
    assert per_plain == 24 and per_cached < 6
    assert d["tlb.misses"] == d_plain["tlb.misses"]      # the same misses, shorter walks
    assert d["pwc.hits"] >= 15 and d["pwc.ntlb_hits"] >= 15


def test_page_walk_caches_change_no_result(mode):
    r = run_src(TOUCH_4K, mode, pwc=True)
    assert r.ok


def test_an_ept_violation_left_unmapped_ends_the_vm_as_an_hv_bug(monkeypatch):
    """The vCPU's one guard: the same exit right after its handler ran is
    an invariant failure, not a loop."""
    from hv.vmm.ept import EptPaging
    monkeypatch.setattr(EptPaging, "ept_violation", lambda self, ex: None)
    r = hv.run("hello", mmu="ept")
    assert r.reason == "invariant" and "EPT_VIOLATION came back" in r.detail, r.detail
    assert r.exits == {"EPT_VIOLATION": 1}


def test_a_cold_two_dimensional_walk_takes_an_exit_per_frame():
    """Several EPT violations in a row for one TLB miss (the guard is not
    "one retry"): the boot tables' frames and the page, each once."""
    r, _ = ept_run(TOUCH_4K)
    assert r.ok and r.counters["pages_4k"] == r.exits["EPT_VIOLATION"] >= 5


@pytest.mark.parametrize("ram, level", [("1G", 3), ("4M", 2)], ids=["1g-leaf", "2m-leaf"])
def test_protect_splits_a_large_leaf_down_to_one_read_only_4k_page(ram, level):
    """Agile paging write-protects a shadowed guest table in EPT: a large
    leaf over it becomes tables of the same mappings, with W gone from
    that one 4 KiB page only; a frame no longer protected gets W back."""
    guest = GuestMemory.scattered(parse_size(ram), GiB, GiB)
    tables = EptTables(guest, GiB, large_pages=True)
    c = Counter()
    gfn = 0x201                                 # in the second 2 MiB
    tables.map(c, gfn << 12)
    assert tables.leaf(gfn << 12)[1] == level
    assert tables.protect(c, gfn) and not tables.protect(c, gfn)
    # The map made the tables above its leaf (4 - level, besides the root),
    # the split one per level below it.
    assert c["ept_tables"] == (4 - level) + (level - 1)
    span = 1 << 9 * (level - 1)                 # 4 KiB pages the large leaf mapped
    first = gfn & ~(span - 1)
    for page in (first, gfn - 1, gfn, gfn + 1, first + span - 1):
        _addr, lv, entry = tables.leaf(page << 12)
        # Every page still maps its own frame, readable and executable.
        assert entry & ept.R and entry & ept.X
        low = (1 << level_shift(lv)) - 1
        assert entry & ADDR_MASK | (page << 12) & low == guest.hpa(page << 12)
        assert bool(entry & ept.W) == (page != gfn)
    assert tables.leaf(gfn << 12)[1] == 1
    tables.check()
    tables.allow_write(c, gfn << 12)
    assert tables.leaf(gfn << 12)[2] & ept.W


# The 2 MiB boot mapping of 0x1000000, read once more after a flush.
TOUCH_2M = mark(3) + """
    mov rax, cr3
    mov cr3, rax
    mov rax, qword ptr [0x1000000]
""" + mark(4) + EXIT
# (the window's marks, the guest's leaf level) of each guest page size.
GUEST_PAGES = {"4k": (TOUCH_4K, (1, 2), 1), "2m": (mark(1) + "mov rax, qword ptr [0x1000000]\n"
                                                   + mark(2) + TOUCH_2M, (3, 4), 2)}
# EPT's leaf level, and the options and RAM that give it.
EPT_PAGES = {"4k": (1, {}), "2m": (2, {"ept_large_pages": True}),
             "1g": (3, {"ept_large_pages": True, "ram": 2 << 30})}


@pytest.mark.parametrize("paging_levels", (4, 5))
@pytest.mark.parametrize("ept_levels", (4, 5))
@pytest.mark.parametrize("guest_page,ept_page", [("4k", "4k"), ("4k", "2m"), ("4k", "1g"),
                                                 ("2m", "4k"), ("2m", "2m")])
def test_two_dimensional_walk_arithmetic(paging_levels, ept_levels, guest_page, ept_page):
    """A walk reads g guest entries (its levels down to the leaf) and
    translates each of their guest-physical addresses and the page's through
    EPT, e entries each: g + (g + 1) e references. 4 on 4 levels with 4 KiB
    pages: 24; 5 on 5: 35; 5 on 4 or 4 on 5: 29 (issue 14)."""
    src, window, guest_leaf = GUEST_PAGES[guest_page]
    ept_leaf, options = EPT_PAGES[ept_page]
    r, vm = ept_run(src, paging_levels=paging_levels, ept_levels=ept_levels, **options)
    assert ept.eptp_levels(vm.mmu.eptp) == ept_levels
    g, e = paging_levels - guest_leaf + 1, ept_levels - ept_leaf + 1
    per_walk, d = refs_per_walk(r, *window)
    assert per_walk == g + (g + 1) * e
    by_level = r.tlb["walk_refs_by_level"]
    assert ("guest.PML5" in by_level) == (paging_levels == 5)
    assert ("ept.PML5" in by_level) == (ept_levels == 5)


@pytest.mark.parametrize("mmu", ("native", "shadow", "agile"))
@pytest.mark.parametrize("paging_levels", (4, 5))
@pytest.mark.parametrize("guest_page", ("4k", "2m"))
def test_one_dimensional_walks_read_one_entry_per_level(mmu, paging_levels, guest_page):
    """Natively, and on shadow tables (which have the guest's levels; agile
    started shadowed), a walk reads one entry per level down to its leaf."""
    src, window, guest_leaf = GUEST_PAGES[guest_page]
    r = run_src(src, mmu=mmu, paging_levels=paging_levels, check_invariants=True,
                agile_policy="dynamic:rent=0")
    per_walk, _ = refs_per_walk(r, *window)
    # Shadow tables map a guest large page with 4 KiB pages (no host large pages).
    leaf = 1 if mmu != "native" else guest_leaf
    assert per_walk == paging_levels - leaf + 1
