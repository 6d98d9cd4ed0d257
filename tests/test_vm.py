"""Boot ABI, exits, exception delivery and the MMU's exactness, on small
inline guests, in every mode (qemu is the oracle)."""
import json

import pytest

from conftest import LIB, run_src

from hv.arch.paging import PFErr

EXIT = "mov dx, 0xf4\nout dx, al\n"


def test_console_exit_code_and_boot_registers(mode):
    r = run_src("""
        mov rax, rdi
        add al, '0'
        mov dx, 0x3f8
        out dx, al
        mov rax, rsi
        add al, '0'
        out dx, al
        mov al, 7
    """ + EXIT, mode)
    assert (r.console, r.exit_code, r.reason) == ("01", 7, "exit")
    assert r.exits["IO_INSTRUCTION"] == 3 and r.counters["io_exits"] == 3


def test_page_fault_is_delivered_with_cr2_and_error_code(mode):
    r = run_src(LIB + """
        mov rdi, 14
        lea rsi, [rip + pf_handler]
        call idt_set_handler
        mov rbx, 0x0000700000000000
        mov qword ptr [rbx + 8], 1       ; not present: #PF, W
        mov al, 0xEE
        call exit
    pf_handler:
        mov rax, cr2
        mov rbx, 0x0000700000000008
        cmp rax, rbx
        jne bad
        mov rax, qword ptr [rdi + FRAME_ERROR]
        call exit
    bad:
        mov al, 0xEF
        call exit
    """, mode)
    assert r.exit_code == PFErr.W
    assert r.counters["pf_guest"] == 1
    # Only shadow paging (and agile's shadowed part, not yet shadowed here:
    # agile starts nested) intercepts #PF (EXCEPTION_NMI exits); elsewhere
    # the CPU delivers it to the guest.
    assert ("EXCEPTION_NMI" in r.exits) == (mode == "shadow")


def test_every_fault_is_delivered_as_itself(mode):
    """unicorn#1883 at the level of a guest: three #DE in a row, each seen as #DE."""
    r = run_src(LIB + """
        mov rdi, 0
        lea rsi, [rip + de_handler]
        call idt_set_handler
        xor r12, r12
        xor ebx, ebx
        div ebx
        div ebx
        div ebx
        mov rax, r12
        call exit
    de_handler:
        inc qword ptr [rdi + FRAME_R12]
        add qword ptr [rdi + FRAME_RIP], 2      ; skip the 2-byte div
        ret
    """, mode)
    assert r.exit_code == 3 and r.counters["exceptions"] == 3


def test_a_fault_without_an_idt_is_a_triple_fault_with_a_report(mode):
    r = run_src("nop\nud2\n", mode)
    assert r.reason == "triple_fault" and not r.ok
    assert "rip=0x100001" in r.detail and "ud2" in r.detail
    assert r.exits["TRIPLE_FAULT"] == 1


def test_runaway_guest_stops_at_max_insns(mode):
    r = run_src("spin: jmp spin\n", mode, max_insns=10_000)
    assert r.reason == "max_insns" and r.counters["insns"] == 10_000


def test_hlt_stops_every_vcpu(mode):
    r = run_src("""
        mov rax, rdi
        add al, 'a'
        mov dx, 0x3f8
        out dx, al
        hlt
    """, mode, vcpus=3)
    assert r.reason == "halted" and r.console == "abc"
    assert r.exits["HLT"] == 3


@pytest.mark.parametrize("quantum", [1, 2, 3, 4])
def test_hlt_halts_as_the_last_instruction_of_a_slice_too(mode, quantum):
    # Unicorn ends a run at HLT as at its limit: quantum 1 and 3 end a slice there.
    r = run_src("cli\nnop\nhlt\nmov al, 1\n" + EXIT, mode, quantum=quantum)
    assert (r.reason, r.exits["HLT"], r.console) == ("halted", 1, "")


def test_marks_and_between(mode):
    r = run_src("""
        xor eax, eax
        mov ebx, 1
        vmcall
        mov dx, 0x3f8
        mov al, 'x'
        out dx, al
        out dx, al
        xor eax, eax
        mov ebx, 2
        vmcall
        mov eax, 99
        vmcall
        mov rbx, -1000
        cmp rax, rbx
        sete al
    """ + EXIT, mode)
    assert r.exit_code == 1                 # unknown hypercall: -1000
    d = r.between(1, 2)
    assert d["io_exits"] == 2 and d["hypercalls"] == 1 and d["insns"] == 7


def test_the_same_run_gives_the_same_json():
    src = """
        mov rcx, 200
        mov rbx, 0x1000000
    touch:
        mov qword ptr [rbx], rcx
        add rbx, 0x1000
        loop touch
    """ + "xor eax, eax\n" + EXIT
    a, b = (json.dumps(run_src(src).to_json(), sort_keys=True) for _ in range(2))
    assert a == b


def test_escape_beyond_guest_ram_stops_the_vm(mode):
    # Point the boot map's 2 MiB page at 0x0 to GPA 4 GiB (outside 64 MiB RAM).
    r = run_src("""
        mov rbx, 0x4000
        mov rax, 0x100000083
        mov qword ptr [rbx + 8 * 20], rax   ; VA 0x2800000 -> GPA 0x100000000
        mov rbx, 0x2800000
        invlpg [rbx]
        mov rax, qword ptr [rbx]
    """ + EXIT, mode)
    assert r.reason == "escape" and not r.ok
    assert "0x100000000" in r.detail or "UNMAPPED" in r.detail


# Run `{insn}` at CPL 3: the boot map's first 2 MiB (code, stacks) made user
# pages, then SYSRETQ. The default handlers report any exception and exit.
USER_SRC = LIB + """
    or qword ptr [0x2000], 4
    or qword ptr [0x3000], 4
    or qword ptr [0x4000], 4
    mov rax, cr3
    mov cr3, rax
    mov rax, 0x90000
    mov qword ptr [rip + gdt_tss + TSS_RSP0], rax
    {setup}
    lea rcx, [rip + user]               ; SYSRETQ: RIP = RCX, RFLAGS = R11, CPL 3
    mov r11d, 2
    .byte 0x48, 0x0f, 0x07              ; sysretq
user:
    {insn}
after:
    hlt
"""


def user_run(insn: str, mode: str, setup: str = "") -> tuple:
    import hv
    src = USER_SRC.format(insn=insn, setup=setup)
    labels = hv.asm.assemble_source(src, name="<test>").symbols
    return run_src(src, mode, max_insns=100_000), labels["user"], labels["after"]


def test_int_n_at_cpl3_through_a_dpl0_gate_is_gp_with_the_gate_named(mode):
    """SDM Vol.2A "INT n/INTO/INT3/INT1": a software interrupt through a
    gate of DPL < CPL is #GP(vector * 8 + 2): IDT bit set, EXT clear. The
    fault is the INT instruction's: its frame points at it. (The qemu
    mode shares hv's delivery: this is checked against the SDM, by hand.)"""
    for insn, vector in (("int3", 3), ("int 3", 3), ("int 0x1e", 0x1E),
                         ("int 0x40", 0x40)):      # beyond the IDT's limit: the same code
        r, user, _after = user_run(insn, mode)
        assert r.console.startswith(f"unexpected exception 13 at rip={user:#x} "
                                    f"err={vector * 8 + 2:#x} "), (insn, r.console)
        assert r.exit_code == 0xEE


def test_int3_at_cpl3_through_a_dpl3_gate_is_bp_after_it(mode):
    setup = """
        lea rax, [rip + idt_table + 3 * 16 + 5]
        mov byte ptr [rax], 0xEE            ; gate 3: present, DPL 3, interrupt gate
    """
    r, _user, after = user_run("int3", mode, setup)
    assert r.console.startswith(f"unexpected exception 3 at rip={after:#x} "), r.console


# A #UD (a fault: EXT set in the error code) whose gate names selector
# {selector:#x}, after the GDT's data descriptor (0x10) got DPL {dpl}.
GATE_SELECTOR_SRC = LIB + """
    lea rax, [rip + idt_table + 6 * 16 + 2]
    mov word ptr [rax], {selector}
    lea rax, [rip + gdt_table + 0x10 + 5]
    or byte ptr [rax], {dpl} << 5
    ud2
"""


def test_a_handler_in_a_less_privileged_code_segment_is_gp_naming_it(mode):
    """SDM Vol.3A §6.12.1.1: #GP(selector | EXT)."""
    r = run_src(GATE_SELECTOR_SRC.format(selector=0x10, dpl=3), mode)
    assert " exception 13 " in r.console and " err=0x11 " in r.console, r.console


def test_a_gate_with_a_null_selector_is_gp_with_ext_alone(mode):
    """SDM Vol.2A "INT n" (IA-32e mode): a NULL code-segment selector is
    #GP(EXT). QEMU's do_interrupt64 says #GP(0); the SDM decides."""
    r = run_src(GATE_SELECTOR_SRC.format(selector=0, dpl=0), mode)
    assert " exception 13 " in r.console and " err=0x1 " in r.console, r.console


# -- crash reports -------------------------------------------------------------------

# No IDT (the boot ABI): #UD needs gate 6, beyond the IDT's limit of 0: #GP
# naming gate 6 (6 * 8 + IDT 2 + EXT 1 = 0x33); #GP needs gate 13, beyond it
# too: #GP during #GP is #DF (SDM Vol.3A Table 6-5); #DF needs gate 8: shutdown.
# CR3 is a copy of the boot PML4, so shadow paging's root is not the guest's.
NO_IDT_SRC = """
    mov rsi, 0x2000
    mov rdi, 0x8000
    mov rcx, 512
    rep movsq
    mov rax, 0x8000
    mov cr3, rax
    mov rax, 0x1234
    mov r15, -2
main:
    nop
boom:
    ud2
"""


def test_a_triple_fault_reports_the_chain_and_the_registers(mode):
    from hv.asm import assemble_source
    labels = assemble_source(NO_IDT_SRC, name="<test>").symbols
    r = run_src(NO_IDT_SRC, mode)
    c = r.crash
    assert [s["name"] for s in c["chain"]] == ["#UD", "#GP(0x33)", "#DF(0x0)"]
    assert [(s["vector"], s["error_code"]) for s in c["chain"]] == [(6, None), (13, 0x33), (8, 0)]
    assert {s["why"] for s in c["chain"]} == {"no IDT loaded"}
    assert r.detail.endswith(": ud2; #UD → #GP(0x33) → #DF(0x0) → shutdown: no IDT loaded")
    assert "\n" not in r.detail
    regs = c["registers"]
    assert c["rip"] == regs["rip"] == labels["boom"] and c["insn"] == "ud2"
    assert (regs["rax"], regs["r15"], regs["cr3"]) == (0x1234, 2**64 - 2, 0x8000)
    assert (c["vm"], c["vcpu"]) == (0, 0)
    # The same report as the oracle's, registers and all.
    assert c == run_src(NO_IDT_SRC, "qemu").crash


def test_a_chain_through_page_faults_names_each_fault(mode):
    """The IDT on a page nothing maps: each gate read is a #PF (supervisor
    read, not present: error code 0). #UD's becomes #PF (#UD is benign);
    the #PF's, #DF (SDM Vol.3A Table 6-5); the #DF's, shutdown."""
    r = run_src("""
        lidt [rip + idtr]
        ud2
    idtr:
        .word 0xfff
        .quad 0x700000000000
    """, mode)
    assert [s["name"] for s in r.crash["chain"]] == [
        "#UD", "#PF(0x0) at 0x700000000060", "#DF(0x0)"]
    assert r.crash["chain"][1]["cr2"] == 0x700000000060
    assert [s["why"] for s in r.crash["chain"]] == [
        f"#PF(0x0) at {0x700000000000 + 16 * v:#x} reading the IDT gate" for v in (6, 14, 8)]
    assert r.detail.endswith("; #UD (#PF(0x0) at 0x700000000060 reading the IDT gate) → "
                             "#PF(0x0) at 0x700000000060 (#PF(0x0) at 0x7000000000e0 reading "
                             "the IDT gate) → #DF(0x0) (#PF(0x0) at 0x700000000080 reading the "
                             "IDT gate) → shutdown")


def test_no_crash_report_when_the_guest_ends_well():
    r = run_src("mov al, 0\n" + EXIT)
    assert r.ok and r.crash is None
