"""The native MMU is exact: the TLB model, not Unicorn's TLB, decides what a
guest sees; every TLB-flush event reaches it, wherever the instruction is."""
import pytest

from conftest import run_src

EXIT = "mov dx, 0xf4\nout dx, al\n"

# Map VA 0x3000000 with a 4 KiB page table at 0x500000 (in the boot map's
# PD entry 24), frame 0x600000.
MAP_4K = """
    mov rbx, 0x500000
    mov rax, 0x600003
    mov qword ptr [rbx], rax
    mov rax, 0x500003
    mov rcx, 0x4000
    mov qword ptr [rcx + 24 * 8], rax
    mov rcx, 0x3000000
    mov rdx, 0x600000
    mov qword ptr [rdx], 0x11
    mov rdx, 0x601000
    mov qword ptr [rdx], 0x22
"""


def test_a_stale_translation_stays_until_invlpg():
    """Unicorn flushes its own TLB on a MOV to CR0; the model does not (no
    PG/WP change), so the stale entry survives, as in a real TLB."""
    r = run_src(MAP_4K + """
        mov rax, qword ptr [rcx]        ; caches VA -> 0x600000
        mov rax, 0x601003
        mov qword ptr [rbx], rax        ; remap, no INVLPG
        mov rax, cr0
        mov cr0, rax
        mov r8, qword ptr [rcx]         ; stale: 0x11
        invlpg [rcx]
        mov r9, qword ptr [rcx]         ; fresh: 0x22
        mov rax, r8
        shl rax, 8
        or rax, r9
        cmp rax, 0x1122
        sete al
    """ + EXIT)
    assert r.exit_code == 1
    assert r.counters["invlpg"] == 1 and r.counters["tlb_flush"] == 0


def test_the_same_guest_sees_the_same_accessed_and_dirty_bits(mode):
    """A/D in the guest's own PTE after a read, then after a write: the
    oracle (QEMU's walker) and hv's walker must agree."""
    r = run_src(MAP_4K + """
        mov rax, qword ptr [rcx]
        mov r8, qword ptr [rbx]         ; PTE after a read
        mov qword ptr [rcx], rax
        mov r9, qword ptr [rbx]         ; PTE after a write
        and r8, 0x60
        and r9, 0x60
        shl r8, 1
        or r8, r9
        mov rax, r8
    """ + EXIT, mode)
    assert r.exit_code == (0x20 << 1) | 0x60


def test_code_written_at_run_time_is_scanned_again():
    """MOV to CR3 in code the guest writes, rewrites and runs again."""
    r = run_src("""
        mov rdi, 0x700000
        mov dword ptr [rdi], 0xc3d8220f     ; mov cr3, rax; ret
        mov rax, cr3
        call rdi
        mov dword ptr [rdi], 0xc3909090     ; nop; nop; nop; ret
        call rdi
        mov dword ptr [rdi], 0xc3d8220f
        mov rax, cr3
        call rdi
        xor eax, eax
    """ + EXIT)
    assert r.counters["cr3_loads"] == 2


def test_code_changed_through_an_alias_is_scanned_again():
    r = run_src(MAP_4K + """
        mov rax, 0x700003                   ; VA 0x3000000 aliases frame 0x700000
        mov qword ptr [rbx], rax
        invlpg [rcx]
        mov rdi, 0x700000
        mov dword ptr [rdi], 0xc3909090     ; nop; nop; nop; ret
        call rdi
        mov dword ptr [rcx], 0xc3d8220f     ; mov cr3, rax; ret, through the alias
        mov rax, cr3
        call rdi
        xor eax, eax
    """ + EXIT)
    assert r.counters["cr3_loads"] == 1


def test_an_intercepted_instruction_across_a_page_boundary():
    r = run_src("""
        mov rax, cr3
        jmp there
    .align 4096
        .zero 4095
    there:
        mov cr3, rax                        ; 0f | 22 d8: starts on the last byte
        xor eax, eax
    """ + EXIT)
    assert r.counters["cr3_loads"] == 1


def test_cr3_load_flushes_non_global_entries_only():
    r = run_src(MAP_4K + """
        mov rax, 0x600103                   ; global
        mov qword ptr [rbx], rax
        mov rax, cr4
        or rax, 0x80                        ; CR4.PGE
        mov cr4, rax
        mov rax, qword ptr [rcx]            ; cache the global entry
        mov rax, 0x601103
        mov qword ptr [rbx], rax            ; remap
        mov rax, cr3
        mov cr3, rax                        ; keeps global entries
        mov r8, qword ptr [rcx]             ; stale 0x11
        mov rax, cr4
        and rax, ~0x80
        mov cr4, rax                        ; PGE off: flushes everything
        mov r9, qword ptr [rcx]             ; 0x22
        shl r8, 8
        or r8, r9
        cmp r8, 0x1122
        sete al
    """ + EXIT)
    assert r.exit_code == 1
    assert r.counters["cr3_loads"] == 1 and r.counters["tlb_flush"] == 3


@pytest.mark.parametrize("mmu", ["native", "ept"])
def test_pcid_keeps_each_address_space_s_entries_until_invpcid(mmu):
    """SDM Vol.3A §4.10.4.1: with CR4.PCIDE a MOV to CR3 with bit 63 set
    flushes nothing, and a PCID's entries survive a switch away and back;
    INVPCID single-context drops them; CR3 reads back without bit 63. (A
    stale entry may stay, not must: under shadow paging the remap exits
    and the VMM drops it.)"""
    r = run_src(MAP_4K + """
        mov rax, cr4
        or rax, 0x20000                     ; CR4.PCIDE (CR3 bits 11:0 are 0)
        mov cr4, rax
        mov r12, cr3
        lea rax, [r12 + 1]
        mov cr3, rax                        ; PCID 1 (flushes PCID 1)
        mov rax, qword ptr [rcx]            ; caches VA -> 0x600000 under PCID 1
        mov rax, 0x601003
        mov qword ptr [rbx], rax            ; remap, no INVLPG
        mov rax, 0x8000000000000000
        or rax, r12
        mov cr3, rax                        ; PCID 0, no flush
        mov r8, qword ptr [rcx]             ; no PCID 0 entry: 0x22
        mov r11, cr3
        shr r11, 63                         ; bit 63 is not loaded: 0
        mov rax, 0x8000000000000001
        or rax, r12
        mov cr3, rax                        ; PCID 1 again, no flush
        mov r9, qword ptr [rcx]             ; PCID 1's stale entry: 0x11
        push 0                              ; INVPCID descriptor: address ...
        push 1                              ; ... and PCID 1
        mov eax, 1
        invpcid rax, [rsp]                  ; single-context
        mov r10, qword ptr [rcx]            ; 0x22
        shl r8, 16
        shl r9, 8
        or r8, r9
        or r8, r10
        or r8, r11
        cmp r8, 0x221122
        sete al
    """ + EXIT, mmu)
    assert r.exit_code == 1
    assert (r.counters["cr3_loads"], r.counters["tlb_flush"], r.counters["invpcid"]) == (3, 2, 1)


# vCPU 1 writes a MOV to CR3 into a code page both vCPUs already ran, runs
# it, and only then does vCPU 0 run it: vCPU 0 must scan the page again
# (whether a page was written since a scan is each vCPU's, not the VM's,
# or vCPU 1's scan would hide the write from vCPU 0's hooks).
CROSS_VCPU_SMC = """
    jmp main
.include "serial.s"
.include "sync.s"
main:
    mov r12, rdi
    call patchable                      ; both vCPUs: the page is scanned, no MOV
    mov rdi, 0x80000                    ; flag: vCPU 0 ran it
    test r12, r12
    jnz vcpu1
    mov qword ptr [rdi], 1
    mov rdi, 0x80040
    mov esi, 1
    call smp_wait                       ; until vCPU 1 patched and ran it
    mov rax, cr3
    call patchable
    xor eax, eax
    mov dx, 0xf4
    out dx, al
vcpu1:
    mov esi, 1
    call smp_wait
    mov rdi, patchable                  ; 0f 22 d8: mov cr3, rax over the NOPs
    mov byte ptr [rdi], 0x0f
    mov byte ptr [rdi + 1], 0x22
    mov byte ptr [rdi + 2], 0xd8
    mov rax, cr3
    call patchable
    mov qword ptr [0x80040], 1
    hlt
.align 4096
patchable:
    nop
    nop
    nop
    ret
"""


@pytest.mark.parametrize("mmu", ["native", "shadow", "ept"])
def test_code_one_vcpu_writes_and_runs_is_scanned_again_by_the_other(mmu):
    r = run_src(CROSS_VCPU_SMC, mmu, vcpus=2, quantum=50)
    assert (r.reason, r.exit_code) == ("exit", 0), r.detail
    assert [cpu["counters"]["cr3_loads"] for cpu in r.vcpus] == [1, 1]


def test_the_scanner_finds_vex_forms_and_knows_when_the_next_page_matters():
    from hv.hw.intercept import candidate_starts, ends_open
    page = bytearray(b"\x90" * 4096)
    page[100:104] = bytes.fromhex("c5f822d8")          # VEX-prefixed mov cr3, rax
    page[200:205] = bytes.fromhex("c4e17822d8")
    page[300:303] = bytes.fromhex("0f01f9")             # rdtscp
    assert candidate_starts(bytes(page), 4096) == [100, 200, 300]
    assert not ends_open(bytes(page), 4096)
    for tail in (b"\x0f", b"\x48", b"\x0f\x01"):         # an opcode or prefix at the end
        assert ends_open(bytes(page[:4096 - len(tail)]) + tail, 4096)


def test_a_straight_run_ends_where_rflags_if_may_be_set_or_code_branches():
    from hv.hw.intercept import straight_run
    # nop; nop; mov eax, 1; sti; nop: three instructions, then STI
    assert straight_run(bytes.fromhex("9090b801000000fb90")) == 4
    for opener in ("9d", "48cf", "480f07", "eb00", "e800000000", "c3", "cd20"):
        # after two NOPs: popfq, iretq, sysretq, jmp, call, ret, int 0x20
        assert straight_run(bytes.fromhex("9090" + opener + "90")) == 3, opener
    assert straight_run(bytes.fromhex("9066")) == 1         # no whole second instruction
    assert straight_run(b"") == 1
    assert straight_run(bytes.fromhex("9090fb"), 16) == 3


# One code frame (0x600000: `mov cr3, rax; ret`) behind 32 virtual pages
# (0x3000000 + i * 4 KiB, through a page table at 0x500000), each called
# twice.
ALIASES_SRC = """
    mov dword ptr [0x600000], 0xC3D8220F
    mov rdi, 0x500000
    mov rcx, 32
    mov rax, 0x600003
fill:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec rcx
    jnz fill
    mov rax, 0x500003
    mov qword ptr [0x4000 + 24 * 8], rax
    mov rax, cr3
    mov cr3, rax
    mov r8, 2
again:
    mov rbx, 0x3000000
    mov rcx, 32
call_each:
    call rbx
    add rbx, 0x1000
    dec rcx
    jnz call_each
    dec r8
    jnz again
    xor eax, eax
    mov dx, 0xf4
    out dx, al
"""


@pytest.mark.parametrize("mmu", ["native", "shadow", "ept"])
def test_code_scans_are_bounded_and_a_page_scanned_again_hooks_nothing_twice(mmu, monkeypatch):
    """The scans a vCPU keeps are bounded (hv/hw/codescan.py): with room
    for 4, 32 aliases push out the oldest, and the second call through each
    scans it again without hooking its MOV to CR3 twice (a second hook
    would report the instruction twice)."""
    from hv.hw import codescan
    from hv.vmm.vm import VM, Config
    from conftest import image
    monkeypatch.setattr(codescan, "MAX_PAGES", 4)
    vm = VM(image(ALIASES_SRC), Config(mmu=mmu))
    vm.run()
    assert (vm.reason, vm.exit_code) == ("exit", 0), vm.detail
    assert vm.vcpus[0].stats.counters["cr3_loads"] == 1 + 2 * 32
    assert len(vm.vcpus[0].code._pages) <= 4


# Frame 0x700000 runs as code at VA 0x700000 and is written through an alias
# at VA 0x3005000 (page-table entry 5 of MAP_4K's table).
ALIAS_SETUP = MAP_4K + """
    mov rax, 0x700003
    mov qword ptr [rbx + 5 * 8], rax
    add rcx, 0x5000
    invlpg [rcx]
    mov rdi, 0x700000
    mov dword ptr [rdi], 0xc3909090     ; nop; nop; nop; ret
    call rdi
"""


@pytest.mark.parametrize("mmu", ["native", "shadow", "ept"])
def test_a_write_through_an_alias_takes_execute_from_the_code_page(mmu):
    """New code written through a data alias, then run at the code page's
    address: the write took X from the code page, so running it scans the
    page again. (Without the walk memo, whose flushes of every TLB would
    hide a missing one.)"""
    r = run_src(ALIAS_SETUP + """
        mov dword ptr [rcx + 0x100], 0xc3d8220f     ; mov cr3, rax; ret
        mov rax, cr3
        lea rdi, [rdi + 0x100]
        call rdi
        xor eax, eax
    """ + EXIT, mmu, memo=False)
    assert (r.reason, r.counters["cr3_loads"]) == ("exit", 1)


@pytest.mark.parametrize("mmu", ["native", "shadow", "ept"])
def test_a_scan_takes_write_from_every_alias_again(mmu):
    """After the code page is scanned again, the alias that wrote it has no
    W left: its next write must take X from the code page again."""
    r = run_src(ALIAS_SETUP + """
        mov dword ptr [rcx + 0x100], 0xc3909090     ; harmless code, through the alias
        lea rsi, [rdi + 0x100]
        call rsi                                    ; scanned again here
        mov dword ptr [rcx + 0x200], 0xc3d8220f     ; mov cr3, rax; ret
        mov rax, cr3
        lea rsi, [rdi + 0x200]
        call rsi
        xor eax, eax
    """ + EXIT, mmu, memo=False)
    assert (r.reason, r.counters["cr3_loads"]) == ("exit", 1)
    assert r.counters["code_rescans"] == 2


# A counter in the page of the loop that increments it, and a hypercall
# every round (an exit: the next instruction is looked up again).
MIXED_PAGE = """
    mov rcx, 100
again:
    inc qword ptr [rip + counter]
    mov eax, 99
    vmcall
    dec rcx
    jnz again
    mov rax, qword ptr [rip + counter]
    mov dx, 0xf4
    out dx, al
counter:
    .quad 0
"""


def test_data_in_a_code_page_costs_a_rescan_per_round(mode):
    """Each round writes the page, then runs it: one scan again each
    (`code_rescans`), of only the bytes that changed (no instruction near
    them: no new hook). qemu scans nothing."""
    r = run_src(MIXED_PAGE, mode)
    assert (r.reason, r.exit_code) == ("exit", 100)
    assert r.counters.get("code_rescans", 0) == (0 if mode == "qemu" else 100)


def test_changed_span():
    from hv.hw.codescan import changed_span
    a = bytes(64)
    assert changed_span(a, a) is None
    b = bytearray(a)
    b[3], b[40] = 1, 0x80
    assert changed_span(a, bytes(b)) == (3, 40)
    b[63] = 1
    assert changed_span(bytes(b), a) == (3, 63)
