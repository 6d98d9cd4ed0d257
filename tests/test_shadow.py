"""Shadow paging: exits counted exactly on purpose-built guests, write
protection, flooding, and the shadow MMU's invariants."""
import pytest

import hv
from hv.api import make_result
from hv.vmm.vm import VM, Config

from conftest import LIB, image

EXIT = "xor eax, eax\nmov dx, 0xf4\nout dx, al\n"
N = 10

# VA 0x3000000 through a 4 KiB page table at 0x500000 (boot PD entry 24),
# frames 0x600000 + i*4K; the PT is live once the guest has used it.
# r14 = the PT, r15 = the VA (marks clobber rax and rbx).
MAP_PT = """
    mov r14, 0x500000
    mov rax, 0x600003
    mov qword ptr [r14], rax
    mov rax, 0x500003
    mov rcx, 0x4000
    mov qword ptr [rcx + 24 * 8], rax
    mov r15, 0x3000000
    invlpg [r15]
    mov rax, qword ptr [r15]            ; uses the PT: now it is shadowed
"""


def shadow_run(src: str, **kw) -> tuple[hv.Result, VM]:
    vm = VM(image(src), Config(mmu="shadow", **kw))
    vm.run()
    vm.mmu.check()
    return make_result("test", vm), vm


def mark(n: int) -> str:
    return f"xor eax, eax\nmov ebx, {n}\nvmcall\n"


def test_guest_memory_is_scattered_in_host_memory():
    _, vm = shadow_run(EXIT)
    gpas = range(0, vm.guest.ram, 2 << 20)
    assert all(vm.guest.hpa(g) != g for g in gpas)
    assert len({vm.guest.hpa(g) for g in gpas}) == len(gpas)
    assert vm.guest.hpa(vm.guest.ram) is None


def test_each_cr3_load_is_one_cr_access_exit():
    r, _ = shadow_run(mark(1) + f"""
        mov rcx, {N}
        mov rax, cr3
    again:
        mov cr3, rax
        dec rcx
        jnz again
    """ + mark(2) + EXIT)
    d = r.between(1, 2)
    assert d["exit.CR_ACCESS"] == N and d["cr3_loads"] == N
    assert d["mmu_cache_miss"] == 0         # the same address space, found again


def test_each_invlpg_is_one_invlpg_exit():
    r, _ = shadow_run(mark(1) + f"""
        mov rcx, {N}
        mov rbx, 0x1000000
    again:
        invlpg [rbx]
        add rbx, 0x1000
        dec rcx
        jnz again
    """ + mark(2) + EXIT)
    d = r.between(1, 2)
    assert d["exit.INVLPG"] == N and d["invlpg"] == N


def test_each_write_to_a_live_pte_is_one_emulated_write():
    """Remap, INVLPG, use: the table stays live, so no flooding."""
    r, _ = shadow_run(MAP_PT + mark(1) + f"""
        mov r8, {N}
        mov rdx, 0x601003
    again:
        mov qword ptr [r14], rdx            ; a write to a live PTE: trapped
        invlpg [r15]
        mov rax, qword ptr [r15]            ; hidden fault: the table is used
        add rdx, 0x1000
        dec r8
        jnz again
    """ + mark(2) + EXIT)
    d = r.between(1, 2)
    assert d["mmu_pte_write"] == N and d["insn_emulation"] == N
    assert d["pf_fixed"] == N and d["mmu_flooded"] == 0
    assert d["exit.EXCEPTION_NMI"] == 2 * N and d["exit.INVLPG"] == N


def test_writes_by_any_instruction_are_emulated():
    r, _ = shadow_run(MAP_PT + mark(1) + """
        mov rax, 0x601003
        xchg qword ptr [r14], rax           ; not a mov
        invlpg [r15]
        mov rax, qword ptr [r15]
        mov rax, 0x601003
        mov rdx, 0x602003
        lock cmpxchg qword ptr [r14], rdx
        invlpg [r15]
        mov r9, qword ptr [r15]             ; reads frame 0x602000
        mov rax, 0x602000
        cmp r9, qword ptr [rax]
        jne bad
    """ + mark(2) + EXIT + "bad:\nmov al, 1\nmov dx, 0xf4\nout dx, al\n")
    assert r.exit_code == 0
    assert r.between(1, 2)["mmu_pte_write"] == 2


def test_a_page_that_stops_being_a_table_stops_costing_exits():
    r, _ = shadow_run(MAP_PT + """
        mov rcx, 0x4000
        mov qword ptr [rcx + 24 * 8], 0     ; unlink the PT from the PD
        invlpg [r15]
    """ + mark(1) + f"""
        mov r8, {N}
    again:
        mov qword ptr [r14 + 8 * r8], r8    ; the old PT is data now
        dec r8
        jnz again
    """ + mark(2) + EXIT)
    d = r.between(1, 2)
    assert d["mmu_flooded"] == 1 and d["mmu_pte_write"] == 3
    assert d["mmu_shadow_zapped"] >= 1
    # after the third write the page is writable again: one hidden fault
    assert d["exit.EXCEPTION_NMI"] == 4 and d["pf_fixed"] == 1


def test_address_spaces_are_found_again():
    """Switching back to an address space costs no new shadow pages."""
    r, _ = shadow_run(mark(1) + """
        mov r12, cr3
        mov rdi, 0x700000                   ; a second PML4: a copy of the boot one
        mov rsi, r12
        mov rcx, 512
        rep movsq
        mov r13, 0x700000
        mov cr3, r13
        mov rax, qword ptr [0x1000000]
        mov cr3, r12
        mov rax, qword ptr [0x1000000]
    """ + mark(2) + f"""
        mov rcx, {N}
    again:
        mov cr3, r13
        mov rax, qword ptr [0x1000000]
        mov cr3, r12
        mov rax, qword ptr [0x1000000]
        dec rcx
        jnz again
    """ + mark(3) + EXIT)
    assert r.between(1, 2)["mmu_cache_miss"] >= 1
    d = r.between(2, 3)
    assert d["mmu_cache_miss"] == 0 and d["exit.CR_ACCESS"] == 2 * N


def test_guest_page_fault_is_injected_and_demand_mapping_fixed():
    """A #PF handler that maps N pages on demand: N injected guest faults,
    N emulated PTE writes, N hidden faults fixed when the access retries."""
    r, _ = shadow_run(LIB + MAP_PT + """
        mov rdi, 14
        lea rsi, [rip + pf_handler]
        call idt_set_handler
    """ + mark(1) + f"""
        mov r12, 0x3001000
        mov r13, {N}
    touch:
        mov qword ptr [r12], r13            ; not present: the handler maps it
        add r12, 0x1000
        dec r13
        jnz touch
    """ + mark(2) + """
        xor eax, eax
        call exit
    pf_handler:
        mov rax, cr2
        sub rax, 0x3000000
        shr rax, 12                          ; PTE index
        mov rdx, rax
        shl rdx, 12
        add rdx, 0x600003                    ; frame 0x600000 + index*4K
        mov qword ptr [0x500000 + rax * 8], rdx
        ret
    """)
    assert r.exit_code == 0, r.console
    d = r.between(1, 2)
    assert d["pf_guest"] == N and d["mmu_pte_write"] == N
    assert d["pf_fixed"] >= N
    assert d["exit.EXCEPTION_NMI"] == d["pf_guest"] + d["mmu_pte_write"] + d["pf_fixed"]


def test_recursive_page_table_mapping(mode):
    """PML4[511] points at the PML4 itself: one frame, shadowed per level."""
    from conftest import run_src
    r = run_src("""
        mov rbx, 0x2000
        mov rax, 0x2003
        mov qword ptr [rbx + 511 * 8], rax  ; the recursive slot
        mov rax, 0xFFFFFFFFFFFFF000         ; the PML4 itself, via 4 recursive steps
        mov rax, qword ptr [rax]            ; PML4[0]
        and rax, ~0xFFF
        cmp rax, 0x3000                      ; the boot PDPT
        sete al
        mov dx, 0xf4
        out dx, al
    """, mode)
    assert r.exit_code == 1


@pytest.mark.parametrize("guest", ["hello", "pagetouch"])
def test_bundled_guests_keep_the_invariants(guest):
    _name, img = hv.load_guest(guest)
    vm = VM(img, Config(mmu="shadow"))
    vm.run()
    assert vm.exit_code == 0
    vm.mmu.check()


@pytest.mark.parametrize("mode", ["shadow", "agile"])
def test_host_large_pages_give_2m_shadow_leaves_where_no_table_lies(mode):
    """With --ept-large-pages the host backs guest memory with 2 MiB pages:
    a guest 2 MiB page is shadowed by one 2 MiB leaf (one TLB miss for 16
    of its pages), unless a guest page table lies in it: the boot tables
    (0x2000..) share the first 2 MiB with the image, whose pages get 4 KiB
    leaves, so a write to the PD there still exits. (Agile started
    shadowed.)"""
    src = mark(1) + """
        mov rbx, 0x1000000
        mov rcx, 16
    touch:
        mov qword ptr [rbx], rcx
        add rbx, 0x1000
        loop touch
    """ + mark(2) + """
        mov rax, qword ptr [0x4000 + 500 * 8]
        mov qword ptr [0x4000 + 500 * 8], rax
    """ + mark(3) + EXIT
    vm = VM(image(src), Config(mmu=mode, ept_large_pages=True, agile_policy="dynamic:rent=0"))
    vm.run()
    vm.mmu.check()
    r = make_result("test", vm)
    assert r.between(1, 2)["tlb.misses"] == 1 and r.between(1, 2)["pf_fixed"] == 1
    assert r.between(2, 3)["mmu_pte_write"] == 1
    small = hv.run("test", mmu=mode, image=image(src), agile_policy="dynamic:rent=0").between(1, 2)
    assert small["tlb.misses"] == small["pf_fixed"] == 16


def test_guest_physical_addresses_never_reach_the_vmm_area():
    """GPA 0 is a guest frame, not host frame 0 (where the shadow root lives)."""
    r, vm = shadow_run("""
        xor ebx, ebx
        mov rax, 0x1122334455667788
        mov qword ptr [rbx], rax
    """ + EXIT)
    assert r.exit_code == 0
    root_hpa = vm.vcpus[0].mmu.root.hpa
    assert root_hpa < vm.guest.chunks[-1]                   # in the VMM area
    assert vm.guest.read(0, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert vm.mem.read(root_hpa, 8) != vm.guest.read(0, 8)


def test_supervisor_write_to_a_read_only_page_with_cr0_wp_clear(mode):
    from conftest import run_src
    r = run_src(MAP_PT + """
        mov rax, 0x600001                   ; read-only
        mov qword ptr [r14], rax
        invlpg [r15]
        mov rax, cr0
        and rax, ~0x10000                   ; CR0.WP = 0
        mov cr0, rax
        mov qword ptr [r15], 0x42           ; allowed at CPL 0
        mov rax, qword ptr [r15]
        mov dx, 0xf4
        out dx, al
    """, mode)
    assert r.exit_code == 0x42


def test_a_shadow_page_at_host_physical_0_is_linked():
    """Fixed hv bug (found by the random-code fuzzer, test_fuzz.py): the
    VMM area's first frame is host-physical 0, and ShadowCache.link took an
    empty spte, whose address bits are 0 too, for a link to the shadow page
    there: a guest large page stayed unmapped in the shadow tables, and the
    hidden fault it raised again reached the guest as its own #PF."""
    from collections import Counter

    from hv.arch.paging import ADDR_MASK, P
    from hv.memory import GuestMemory
    from hv.vmm.shadow import ShadowCache
    cache = ShadowCache(GuestMemory.scattered(8 << 20, 8 << 20), 8 << 20)
    c = Counter()
    first = cache.get_page(c, 0x1200, 1, True, 7, True)         # the first frame allocated
    parent = cache.get_page(c, 0x1400, 2, True, 7, True)
    assert first.hpa == 0
    cache.link(parent, 5, first)
    spte = cache.host.read_u64(parent.hpa + 5 * 8)
    assert spte & P and spte & ADDR_MASK == 0
    cache.check()


def test_a_walk_that_faults_after_its_fix_ends_the_vm_as_an_hv_bug(monkeypatch):
    """A hidden fault that the #PF handler leaves unfixed comes back at
    once: the VMM's bug (reason `invariant`), never a #PF the guest gets."""
    from hv.vmm.shadow import ShadowPaging
    monkeypatch.setattr(ShadowPaging, "page_fault", lambda self, vaddr, error_code: None)
    r = hv.run("hello", mmu="shadow")
    assert r.reason == "invariant" and "EXCEPTION_NMI came back" in r.detail, r.detail
    assert r.counters["pf_guest"] == 0


def test_efer_writes_exit_in_the_virtualized_modes(mode):
    """RDMSR and WRMSR exit wherever a VMM runs the guest (hv's MSR model;
    the shadow VMM keeps the guest's EFER too, shadow pages being kept by
    NXE), never natively. MOV to CR2 is no paging control and exits
    nowhere."""
    from conftest import run_src
    r = run_src(mark(1) + """
        mov ecx, 0xC0000080
        rdmsr
        wrmsr
        mov rax, cr2
        mov cr2, rax
    """ + mark(2) + EXIT, mode)
    d = r.between(1, 2)
    assert r.exit_code == 0
    virtualized = hv.vmm.modes.MODES[mode].virtualized
    assert d.exits["MSR_WRITE"] == d.exits["MSR_READ"] == virtualized
    assert d.exits["CR_ACCESS"] == 0
