"""Booting real kernels (issue 13): multiboot entry in 32-bit protected mode
with paging off, the guest's own switch to long mode, the platform's
devices, CPUID and the MSR model; KVM's kvm-unit-tests `dummy` in every
mode. The prebuilt images live beside the checkout (../shared); where it
is absent those tests skip and say so."""
from pathlib import Path

import pytest

import hv
from hv.arch import cpuid
from hv.cost import DEFAULT_PROFILE, bundled_profiles, load_profile
from hv.errors import HvError
from hv.hw.cpu import CpuModel, parse_cpu

from conftest import MODES, run_src

KUT = Path(__file__).resolve().parents[2] / "shared" / "kvm-unit-tests" / "x86"


def kut_image(name: str) -> Path:
    path = KUT / f"{name}.flat"
    if not path.exists():
        pytest.skip(f"{path} is absent: the prebuilt kvm-unit-tests images live beside the "
                    "checkout (../shared), not in it")
    return path


@pytest.fixture(scope="module")
def dummy_runs():
    path = kut_image("dummy")
    return {mode: hv.run(path, mode) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_kvm_unit_tests_dummy_passes(dummy_runs, mode):
    r = dummy_runs[mode]
    assert (r.reason, r.exit_code) == ("exit", 0), r.detail
    assert r.console.endswith("Dummy Hello World!")
    assert r.ok


def test_dummy_is_the_same_guest_in_every_mode(dummy_runs):
    """Architectural results are identical: console, instructions, exit code."""
    native = dummy_runs["native"]
    for r in dummy_runs.values():
        assert (r.console, r.counters["insns"], r.exit_code) == \
            (native.console, native.counters["insns"], native.exit_code)


def test_dummy_exits_as_a_vmm_would_make_it(dummy_runs):
    """CPUID and MSR accesses exit in the virtualized modes, never natively;
    the xAPIC page is MMIO: EPT_MISCONFIG under ept, a reserved-bit #PF
    (EXCEPTION_NMI) under shadow paging, the same accesses in both."""
    native, shadow, ept = (dummy_runs[m] for m in ("native", "shadow", "ept"))
    assert not {"CPUID", "MSR_READ", "MSR_WRITE", "EPT_MISCONFIG"} & set(native.exits)
    assert native.counters["mmio_exits"] == 0
    for r in (shadow, ept):
        assert r.exits["CPUID"] == ept.exits["CPUID"] > 0
        assert r.exits["MSR_READ"] == ept.exits["MSR_READ"] > 0
    assert shadow.counters["mmio_exits"] == ept.counters["mmio_exits"] == \
        ept.exits["EPT_MISCONFIG"] > 0
    # Paging off, then the guest's own 4-level tables: walks of 4 (EPT
    # alone, paging off) and of up to 24 references under ept.
    hist = ept.tlb["walk_refs_hist"]
    assert 4 in hist and max(hist) <= 24


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vcpus", [2, 3])
def test_smptest_starts_its_application_processors_and_ipis_them(mode, vcpus):
    """INIT and SIPI to all-but-self start each AP in real mode at the
    trampoline, which switches to long mode on its own; fixed IPIs reach
    each vCPU's IDT, and wake the APs from HLT."""
    r = hv.run(kut_image("smptest"), mode, vcpus=vcpus)
    assert (r.reason, r.exit_code) == ("exit", 0), r.detail
    assert f"found {vcpus} cpus" in r.console and "PASS: IPI to each CPU" in r.console
    assert r.counters["interrupts"] == 2 * (vcpus - 1)
    assert [c["halted"] for c in r.vcpus] == [False] + [True] * (vcpus - 1)


@pytest.mark.parametrize("mode", MODES)
def test_rmap_chain_maps_one_frame_fifteen_thousand_times(mode):
    r = hv.run(kut_image("rmap_chain"), mode)
    assert (r.reason, r.exit_code) == ("exit", 0), r.detail
    assert r.console.rstrip().endswith("PASS")


# kvm-unit-tests pcid's three configurations (x86/unittests.cfg) and, under
# qemu (QEMU's MMU, no code scanning), what QEMU does with them: it loads
# CR4.PCIDE without CPUID.PCID, does not decode INVPCID (#UD), and lets
# the MOV to CR0 that clears PG in 64-bit mode load (no #GP): the kernel,
# unpaged, ends reading outside memory (escape).
PCID_CONFIGS = {
    "qemu64,+pcid,+invpcid": ("PCID when enabled", "INVPCID when enabled", "escape"),
    "qemu64,-pcid,-invpcid": ("PCID when disabled", "INVPCID when disabled",
                              "FAIL: Test on PCID when disabled"),
    "qemu64,-pcid,+invpcid": ("PCID when disabled", "INVPCID when enabled",
                              "SUMMARY: 2 tests, 2 unexpected failures"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cpu", PCID_CONFIGS)
def test_kvm_unit_tests_pcid_passes_in_its_three_configurations(mode, cpu):
    """CR4.PCIDE is #GP without CPUID.PCID, outside IA-32e mode or with
    CR3[11:0] set; clearing CR0.PG with it set is #GP; INVPCID is #UD
    without its CPUID bit, #GP for a PCID other than 0 with PCIDE clear,
    and runs its four types otherwise."""
    r = hv.run(kut_image("pcid"), mode, cpu=cpu)
    pcid, invpcid, under_qemu = PCID_CONFIGS[cpu]
    if mode == "qemu":
        assert under_qemu in (r.reason, r.console)[under_qemu != "escape"], r.detail
    else:
        assert (r.reason, r.exit_code) == ("exit", 0), r.detail
        assert f"PASS: Test on {pcid}" in r.console
        assert f"PASS: Test on {invpcid}" in r.console


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cpu", ("max", "max,-la57"))
def test_kvm_unit_tests_la57_passes_with_and_without_la57(mode, cpu):
    """kvm-unit-tests la57: setting CR4.LA57 in 64-bit mode is #GP; LGDT,
    LIDT, LTR, LLDT, WRMSR of FS/GS/KERNEL_GS_BASE, LSTAR, CSTAR and
    INVPCID check 57-bit canonical form on a CPU with LA57 (48-bit without);
    with LA57 the kernel then far-returns to compatibility mode, clears
    CR0.PG (leaving IA-32e mode), sets CR4.LA57 and pages on 5 levels.
    Under qemu QEMU loads the non-canonical bases, and a non-canonical
    GS_BASE from WRMSR too: the guest's next GS access faults until it
    triple-faults."""
    r = hv.run(kut_image("la57"), mode, cpu=cpu)
    if mode == "qemu":
        assert r.reason == "triple_fault" and "gs:" in r.detail
        return
    assert (r.reason, r.exit_code) == ("exit", 0), r.detail
    assert "SUMMARY: 56 tests, 4 skipped" in r.console
    la57 = "-la57" not in cpu
    assert ("PASS: Tested invpcid type 0 with 0xffaaaaaaaaaaaaaa value - "
            + ("success" if la57 else "failure")) in r.console
    assert ("Switching to 5 level paging mode" in r.console) == la57
    # (agile's policy nests the root when the kernel sets CR4.PCIDE for its
    # INVPCID tests, before the switch: the guest's tables are walked then)
    five = "shadow" if mode == "shadow" else "guest"
    assert (f"{five}.PML5" in r.tlb["walk_refs_by_level"]) == la57


@pytest.mark.parametrize("mode", MODES)
def test_kvm_unit_tests_pku_passes(mode):
    """Protection keys (issue 14): PKRU's AD refuses every data access to
    a user page of the key, WD a write at CPL 3 or with CR0.WP (under
    shadow paging a supervisor write with the guest's WP clear is
    emulated); supervisor pages ignore PKRU. QEMU's MMU agrees."""
    r = hv.run(kut_image("pku"), mode, ram="128M")
    assert (r.reason, r.exit_code) == ("exit", 0), r.detail
    assert "SUMMARY: 7 tests" in r.console and "FAIL" not in r.console
    assert "PASS: write to user page when pkru is wd and wp == 0" in r.console


def test_pku_skips_on_a_cpu_without_it():
    r = hv.run(kut_image("pku"), "ept", cpu="max,-pku")
    assert r.exit_code == 38 and "SUMMARY: 0 tests" in r.console     # 77 >> 1: all skipped


@pytest.mark.parametrize("mode", MODES)
def test_kvm_unit_tests_smap_passes(mode):
    """SMAP (issue 14): a supervisor data access to a user page faults
    unless EFLAGS.AC (STAC), from the TLB too, with and without INVLPG."""
    r = hv.run(kut_image("smap"), mode, ram="128M")
    assert (r.reason, r.exit_code) == ("exit", 0), r.detail
    assert "SUMMARY: 18 tests" in r.console and "FAIL" not in r.console
    without = hv.run(kut_image("smap"), mode, ram="128M", cpu="max,-smap")
    assert without.exit_code == 38 and "SMAP not enabled" in without.console


def test_dummy_counts_the_same_every_run():
    path = kut_image("dummy")
    assert hv.run(path, "ept").to_json() == hv.run(path, "ept").to_json()


def test_a_kernel_gets_its_command_line(tmp_path):
    r = hv.run(kut_image("dummy"), "native", append="extra args")
    assert r.ok


def test_an_elf_without_a_multiboot_header_is_refused(tmp_path):
    elf = tmp_path / "plain.elf"
    data = bytearray(kut_image("dummy").read_bytes())
    at = data.find((0x1BADB002).to_bytes(4, "little"))
    data[at:at + 4] = b"\0\0\0\0"
    elf.write_bytes(bytes(data))
    with pytest.raises(HvError, match="without a multiboot header"):
        hv.run(elf)


def test_a_kernel_with_more_ram_than_below_the_pc_hole_is_refused():
    with pytest.raises(HvError, match="at most 3 GiB"):
        hv.run(kut_image("dummy"), ram="4G")


def test_a_kernel_chooses_its_own_paging_levels():
    with pytest.raises(HvError, match="chooses its own"):
        hv.run(kut_image("dummy"), paging_levels=5)


# -- the CPU model ----------------------------------------------------------------

def test_cpuid_presents_an_intel_cpu_with_only_what_hv_implements():
    cpu = CpuModel()
    _, b, c, d = cpu.cpuid(0, 0, 0)
    assert b"".join(x.to_bytes(4, "little") for x in (b, d, c)) == b"GenuineIntel"
    _, ebx7, ecx7, _ = cpu.cpuid(7, 0, 0)
    assert ebx7 & (1 << 7 | 1 << 10 | 1 << 20) == 1 << 7 | 1 << 10 | 1 << 20  # SMEP, INVPCID, SMAP
    assert CpuModel(parse_cpu("max,-smep")).cpuid(7, 0, 0)[1] & 1 << 7 == 0
    assert ecx7 & (1 << 3 | 1 << 4 | 1 << 16) == 1 << 3 | 1 << 16  # PKU, LA57; OSPKE: PKE clear
    assert cpu.cpuid(7, 0, 0, cr4=1 << 22)[2] & 1 << 4       # OSPKE: CR4.PKE
    assert cpu.cpuid(1, 0, 0)[2] & (1 << 17 | 1 << 21) == 1 << 17   # PCID; no x2APIC
    # MAXPHYADDR, and the linear-address width: 57 bits with LA57, else 48.
    assert cpu.cpuid(0x8000_0008, 0, 0)[0] == cpuid.MAXPHYADDR | 57 << 8
    assert CpuModel(parse_cpu("-la57")).cpuid(0x8000_0008, 0, 0)[0] == cpuid.MAXPHYADDR | 48 << 8
    assert cpu.cpuid(0, 0, 0)[0] < 0xA                      # no PMU leaf
    assert cpu.cpuid(1, 0, 3)[1] >> 24 == 3                 # the APIC ID


def test_parse_cpu_takes_qemus_spelling():
    assert parse_cpu("") == parse_cpu("max") == cpuid.IMPLEMENTED
    assert "pdpe1gb" not in parse_cpu("qemu64,-pdpe1gb")
    assert "rdtscp" not in parse_cpu("max,rdtscp=off")
    assert parse_cpu("max,-x2apic") == cpuid.IMPLEMENTED    # taking away what is not there
    assert parse_cpu("max,-smep") == cpuid.IMPLEMENTED - {"smep"}
    for spec, why in (("+x2apic", "does not implement x2apic"), ("+bogus", "unknown CPU feature"),
                      ("-lm", "cannot be without lm"), ("max,pae=maybe", "neither")):
        with pytest.raises(HvError, match=why):
            parse_cpu(spec)


CPUID_VENDOR = """
    xor eax, eax
    cpuid
    mov eax, ebx
    out 0xF4, eax
"""


@pytest.mark.parametrize("mode", MODES)
def test_cpuid_is_hvs_in_every_mode(mode):
    r = run_src(CPUID_VENDOR, mode)
    assert r.exit_code == int.from_bytes(b"Genu", "little")
    assert r.exits["CPUID"] == (1 if hv.vmm.modes.MODES[mode].virtualized else 0)


RDMSR = """
    mov ecx, {msr}
    rdmsr
    out 0xF4, eax
"""


# The MSR model needs code scanning, which mode qemu (QEMU's MMU) has not:
# there QEMU's own MSRs answer (README, "Booting real kernels").
MSR_MODES = tuple(m for m in MODES if hv.vmm.modes.MODES[m].tlb_model)


@pytest.mark.parametrize("mode", MSR_MODES)
def test_rdmsr_reads_the_model(mode):
    r = run_src(RDMSR.format(msr=0x1B), mode)       # APIC_BASE: enabled, BSP, at 0xFEE00000
    assert r.exit_code == 0xFEE0_0900
    r = run_src(RDMSR.format(msr=0x277), mode)      # PAT's reset value, low half
    assert r.exit_code == 0x0007_0406


@pytest.mark.parametrize("mode", MSR_MODES)
def test_an_msr_hv_does_not_know_is_gp(mode):
    """No IDT: the #GP becomes a triple fault, at the RDMSR itself."""
    for src in (RDMSR.format(msr=0x1234), "mov ecx, 0x1234\nwrmsr\nhlt"):
        r = run_src(src, mode)
        assert r.reason == "triple_fault"
        assert r.crash["chain"][0]["name"] == "#GP(0x0)"
        assert r.crash["insn"].startswith(("rdmsr", "wrmsr"))


# A GDT at 0x6000 (null, the boot code and data segments, a 16-byte TSS
# descriptor at 0x18 whose base 0x80000000_00005000 is not canonical), its
# GDTR at 0x6100, and the same GDTR with a non-canonical base at 0x6200.
TABLE_LOADS = """
    mov qword ptr [0x6000], 0
    mov rax, 0x00af9a000000ffff
    mov qword ptr [0x6008], rax
    mov rax, 0x00cf92000000ffff
    mov qword ptr [0x6010], rax
    mov rax, 0x0000890050000067
    mov qword ptr [0x6018], rax
    mov rax, 0x0000000080000000
    mov qword ptr [0x6020], rax
    mov word ptr [0x6100], 0x27
    mov qword ptr [0x6102], 0x6000
    mov word ptr [0x6200], 0x27
    mov rax, 0x8000000000006000
    mov qword ptr [0x6202], rax
    lgdt [0x6100]
    {load}
    hlt
"""


@pytest.mark.parametrize("mode", MSR_MODES)
@pytest.mark.parametrize("load,insn,error", [("lgdt [0x6200]", "lgdt", 0),
                                             ("lidt [0x6200]", "lidt", 0),
                                             ("mov ax, 0x18\n    ltr ax", "ltr", 0x18)])
def test_a_table_base_that_is_not_canonical_is_gp(mode, load, insn, error):
    """No IDT: the #GP becomes a triple fault, at the instruction."""
    r = run_src(TABLE_LOADS.format(load=load), mode)
    assert r.reason == "triple_fault"
    assert r.crash["chain"][0]["name"] == f"#GP({error:#x})"
    assert r.crash["insn"].startswith(insn)


@pytest.mark.parametrize("cpu,high,gp", [("max", 0x100_0000, True), ("max", 0x8000, False),
                                         ("-la57", 0x8000, True)])
def test_a_non_canonical_fs_base_is_gp(cpu, high, gp):
    """Canonical at 57 bits on a CPU with LA57 (bit 56 up to bit 63 equal),
    at 48 bits without (bit 47 up)."""
    r = run_src(f"mov ecx, 0xC0000100\nmov edx, {high:#x}\nxor eax, eax\nwrmsr\nhlt", "ept",
                cpu=cpu)
    if gp:
        assert r.reason == "triple_fault" and r.crash["insn"].startswith("wrmsr")
    else:
        assert r.reason == "halted", r.detail


# -- the local APIC and interrupts, from a flat guest ----------------------------

# Map the xAPIC page (GiB 3 of the boot tables, a fresh page directory at
# 0x8000) and enable it at RBX; vector 31's handler, through the IDT,
# counts at 0x7000 (from 0) and writes EOI.
APIC_IPI = """
    mov qword ptr [0x3000 + 3 * 8], 0x8000 | 3
    mov rax, 0xFEE00000 | 0x93                 ; P RW PS PCD
    mov qword ptr [0x8000 + 0x1F7 * 8], rax
    mov rax, cr3
    mov cr3, rax
    mov rdi, 31
    lea rsi, [rip + on_ipi]
    call idt_set_handler
    mov rbx, 0xFEE00000
    mov dword ptr [rbx + 0xF0], 0x1FF          ; SPIV: software enable
    mov qword ptr [0x7000], 0
    jmp apic_ready
on_ipi:
    inc qword ptr [0x7000]
    mov rax, 0xFEE000B0
    mov dword ptr [rax], 0                     ; EOI
    ret
apic_ready:
"""
# Run the APIC timer: one-shot, then periodic, each waited for with `sti; hlt`.
APIC_TIMER = APIC_IPI + """
    mov dword ptr [rbx + 0x3E0], 0xB           ; divide by 1
    mov dword ptr [rbx + 0x320], 31            ; LVT timer: vector 31, one-shot
    mov dword ptr [rbx + 0x380], 100000        ; initial count
    sti
    hlt
    cli
    mov r14, qword ptr [0x7000]                ; 1: the one-shot fired once
    mov dword ptr [rbx + 0x320], 31 | 0x20000  ; periodic
    mov dword ptr [rbx + 0x380], 50000
wait:
    sti
    hlt
    cli
    cmp qword ptr [0x7000], 4
    jb wait
    mov dword ptr [rbx + 0x380], 0             ; stop it
    mov eax, dword ptr [rbx + 0x390]           ; current count: 0
    shl r14, 8
    add rax, r14
    add rax, qword ptr [0x7000]
    out 0xF4, eax
"""


@pytest.mark.parametrize("mode", MODES)
def test_the_apic_timer_wakes_hlt_through_the_idt(mode):
    from conftest import LIB
    r = run_src(LIB + APIC_TIMER, mode)
    assert (r.reason, r.exit_code) == ("exit", 0x104), (r.detail, r.console)
    assert r.counters["interrupts"] == 4
    assert r.exits["HLT"] == 4
    if hv.vmm.modes.MODES[mode].virtualized:
        assert r.counters["mmio_exits"] > 0


# CR8 is the TPR (SDM Vol.3A §11.8.6): each sees the other's writes. A
# self-IPI of vector 31 waits while CR8 = 15 holds it back, even with
# interrupts on; the MOV that lowers CR8 lets it in right after itself
# (0x7000 counts it). Exit code: CR8 read after an MMIO TPR write of 0x30,
# the TPR read after CR8 = 5, and the count before and after the MOV.
# R12..R15's low bytes as one word in RAX, R12's highest.
PACK_R12_R15 = """
    shl r12, 24
    shl r13, 16
    shl r14, 8
    lea rax, [r12 + r13]
    add rax, r14
    add rax, r15
"""
CR8_TPR = APIC_IPI + """
    mov dword ptr [rbx + 0x80], 0x30           ; TPR
    mov r12, cr8                               ; 3
    mov eax, 5
    mov cr8, rax
    mov r13d, dword ptr [rbx + 0x80]           ; 0x50
    mov eax, 15
    mov cr8, rax
    mov dword ptr [rbx + 0x300], 0x40000 | 31  ; ICR: self, fixed, vector 31
    sti
    nop
    mov r14, qword ptr [0x7000]                ; 0: held back
    xor eax, eax
    mov cr8, rax
    mov r15, qword ptr [0x7000]                ; 1: taken after the MOV
""" + PACK_R12_R15 + """
    out 0xF4, eax
"""


def run_interrupts(src: str, mode: str, exit_code: int, interrupts: int, exit_reason: str):
    """Run `src` after LIB; under a VMM it takes one `exit_reason` exit."""
    from conftest import LIB
    r = run_src(LIB + src, mode)
    assert (r.reason, r.exit_code) == ("exit", exit_code), (r.detail, r.console)
    assert r.counters["interrupts"] == interrupts
    virtualized = hv.vmm.modes.MODES[mode].virtualized
    assert r.exits.get(exit_reason, 0) == (1 if virtualized else 0)
    return r


@pytest.mark.parametrize("mode", MSR_MODES)
def test_cr8_is_the_tpr_and_lowering_it_lets_an_interrupt_in(mode):
    # Under a VMM CR8 is the TPR shadow: it exits only where it let the IPI in.
    run_interrupts(CR8_TPR, mode, 0x03_50_00_01, 1, "TPR_BELOW_THRESHOLD")


# A self-IPI sent with interrupts off waits for STI, and its shadow: it is
# taken after the instruction after STI. One sent with them on is taken
# right after the write that sent it, once. Exit code: the count at each
# step, one per byte.
SELF_IPI_STI = APIC_IPI + """
    cli
    mov dword ptr [rbx + 0x300], 0x40000 | 31  ; ICR: self, fixed, vector 31
    mov r12, qword ptr [0x7000]                ; 0: IF is clear
    sti
    mov r13, qword ptr [0x7000]                ; 0: STI's shadow
    mov r14, qword ptr [0x7000]                ; 1
    mov dword ptr [rbx + 0x300], 0x40000 | 31
    mov r15, qword ptr [0x7000]                ; 2
    nop
""" + PACK_R12_R15 + """
    add rax, qword ptr [0x7000]                ; 2: no second delivery
    out 0xF4, eax
"""


@pytest.mark.parametrize("mode", MSR_MODES)
def test_an_interrupt_waits_for_sti_and_its_shadow(mode):
    # Under a VMM the wait is interrupt-window exiting: one exit, at the window.
    run_interrupts(SELF_IPI_STI, mode, 0x00_00_01_04, 2, "INTERRUPT_WINDOW")


# `sti; hlt` with a self-IPI already pending (kvm-unit-tests' safe_halt in
# vmexit's self_ipi_sti_hlt): STI's shadow covers the HLT, which runs and
# halts; the interrupt wakes it at once and is taken after it, once.
SELF_IPI_STI_HLT = APIC_IPI + """
    cli
    mov dword ptr [rbx + 0x300], 0x40000 | 31  ; ICR: self, fixed, vector 31
    sti
    hlt
    mov rax, qword ptr [0x7000]                ; 1
    out 0xF4, eax
"""


@pytest.mark.parametrize("mode", MSR_MODES)
def test_hlt_in_stis_shadow_halts_and_the_pending_interrupt_wakes_it(mode):
    # The HLT is the one instruction the shadow lets run: it ends that
    # slice, and is still a HLT (an exit under a VMM, as HLT exiting makes it).
    r = run_interrupts(SELF_IPI_STI_HLT, mode, 1, 1, "INTERRUPT_WINDOW")
    assert r.exits["HLT"] == 1


@pytest.mark.parametrize("mode", MSR_MODES)
def test_cr8_reserved_bits_are_gp(mode):
    r = run_src("mov eax, 16\nmov cr8, rax\nhlt", mode)
    assert r.reason == "triple_fault" and r.crash["insn"].startswith("mov cr8")


# RDTSC before and after CPUID: four instructions started between the reads
# (MOV, XOR, CPUID, RDTSC). The TSC counts modelled cycles (hv.cost): one
# per instruction at CPI 1, plus, under a VMM, the CPUID exit's round trip.
TSC_CPUID = """
    rdtsc
    mov r8, rax
    xor eax, eax
    cpuid
    rdtsc
    sub eax, r8d
    out 0xF4, eax
"""


@pytest.mark.parametrize("profile", bundled_profiles())
@pytest.mark.parametrize("mode", ("native", "shadow", "ept"))
def test_the_tsc_counts_the_profiles_cycles(mode, profile):
    costs = load_profile(profile)
    if hv.vmm.modes.MODES[mode].needs_ept and not costs.ept:
        with pytest.raises(HvError, match="has no EPT"):
            run_src(TSC_CPUID, mode, profile=profile)
        return
    r = run_src(TSC_CPUID, mode, profile=profile)
    c = costs.cycles
    trip = c["exit"] + c["handler"] if hv.vmm.modes.MODES[mode].virtualized else 0
    assert r.exit_code == int(4 * c["cpi"] + trip)


# vCPU 1 waits in `sti; hlt` with vector 31's handler counting at 0x7000;
# vCPU 0 sends it a fixed IPI and spins until the handler ran. A sender
# yields after its ICR write and the woken vCPU runs in the same round, so
# the sender spins a few times, not a whole quantum: exit code, the spins.
IPI_WAIT = """
    jmp start
.include "serial.s"
.include "gdt.s"
.include "idt.s"
start:
    test rdi, rdi
    jnz ap
    call gdt_init
    call idt_init
    mov qword ptr [0x3000 + 3 * 8], 0x8000 | 3
    mov rax, 0xFEE00000 | 0x93                 ; P RW PS PCD
    mov qword ptr [0x8000 + 0x1F7 * 8], rax
    mov rdi, 31
    lea rsi, [rip + on_ipi]
    call idt_set_handler
    mov qword ptr [0x7018], 1                  ; the tables are ready
wait_ap:
    cmp qword ptr [0x7010], 1
    jne wait_ap
    mov rbx, 0xFEE00000
    mov dword ptr [rbx + 0x310], 1 << 24       ; ICR high: APIC ID 1
    mov dword ptr [rbx + 0x300], 31            ; ICR: fixed, vector 31
    xor ecx, ecx
spin:
    inc rcx
    cmp qword ptr [0x7000], 0
    je spin
    mov rax, rcx
    out 0xF4, eax
ap:
    cmp qword ptr [0x7018], 1
    jne ap
    call idt_load
    mov rbx, 0xFEE00000
    mov dword ptr [rbx + 0xF0], 0x1FF          ; SPIV: software enable
    mov qword ptr [0x7010], 1
idle:
    sti
    hlt
    jmp idle
on_ipi:
    inc qword ptr [0x7000]
    mov rax, 0xFEE000B0
    mov dword ptr [rax], 0                     ; EOI
    ret
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_vcpu_sending_an_ipi_yields_to_its_destination(mode):
    r = run_src(IPI_WAIT, mode, vcpus=2)
    assert r.reason == "exit" and 1 <= r.exit_code <= 3, (r.detail, r.exit_code, r.console)
    assert r.counters["interrupts"] == 1


def test_a_vcpus_clock_is_in_its_result():
    """Natively: its instructions and walk references at the default profile."""
    r = hv.run("hello", "native")
    c = load_profile(DEFAULT_PROFILE).cycles
    assert r.vcpus[0]["clock"] == int(r.counters["insns"] * c["cpi"]
                                      + r.tlb["walk_refs"] * c["walk_ref"]) > 0


@pytest.mark.parametrize("mode", MSR_MODES)
def test_invd_exits_under_a_vmm_and_runs_on(mode):
    r = run_src("invd\nmov eax, 7\nout 0xF4, eax", mode)
    assert r.exit_code == 7
    assert r.exits.get("INVD", 0) == (1 if hv.vmm.modes.MODES[mode].virtualized else 0)


@pytest.mark.parametrize("mode", ("native", "shadow", "ept"))
def test_check_invariants_takes_the_apic_page_for_the_vms_own(mode):
    """A TLB entry of a device page maps no RAM, and is the VM's own."""
    from conftest import LIB
    r = run_src(LIB + APIC_TIMER, mode, check_invariants=True)
    assert (r.reason, r.exit_code) == ("exit", 0x104), r.detail


# An interrupt that waited for IF, then was held back by CR8 instead: once
# IF is set it waits for no window, and lowering CR8 lets it in (exit codes
# as SELF_IPI_STI's: 0 with IF clear, 0 under CR8 = 15, 1 after the MOV).
HELD_THEN_TPR = APIC_IPI + """
    cli
    mov dword ptr [rbx + 0x300], 0x40000 | 31  ; ICR: self, fixed, vector 31
    nop
    mov r12, qword ptr [0x7000]                ; 0: IF is clear
    mov eax, 15
    mov cr8, rax
    sti
    nop
    nop
    mov r13, qword ptr [0x7000]                ; 0: CR8 holds it
    xor eax, eax
    mov cr8, rax
    mov r14, qword ptr [0x7000]                ; 1
    xor r15, r15
""" + PACK_R12_R15 + """
    out 0xF4, eax
"""


@pytest.mark.parametrize("mode", MSR_MODES)
def test_an_interrupt_the_tpr_took_over_from_if_needs_no_window(mode):
    r = run_interrupts(HELD_THEN_TPR, mode, 0x00_00_01_00, 1, "TPR_BELOW_THRESHOLD")
    assert r.exits.get("INTERRUPT_WINDOW", 0) == 0


# VA 0x8000000000 maps frame 0x600000 as a user page (U at every level);
# the code there exits with 0x42. The kernel (CPL 0) jumps to it with
# CR4.SMEP set or clear; nothing maps an IDT, so a #PF is a triple fault
# whose chain carries the error code.
SMEP_GUEST = """
    mov byte ptr [0x600000], 0xb0          ; mov al, 0x42
    mov byte ptr [0x600001], 0x42
    mov byte ptr [0x600002], 0xe6          ; out 0xf4, al
    mov byte ptr [0x600003], 0xf4
    mov rax, qword ptr [0x2000]
    mov qword ptr [0x700000], rax
    mov qword ptr [0x700008], 0x701007
    mov qword ptr [0x701000], 0x702007
    mov qword ptr [0x702000], 0x703007
    mov qword ptr [0x703000], 0x600007
    mov rax, 0x700000
    mov cr3, rax
    mov rax, cr4
    or rax, {smep}
    mov cr4, rax
    mov rax, 0x8000000000
    jmp rax
"""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("smep", [True, False], ids=["smep", "no-smep"])
def test_smep_makes_a_supervisor_fetch_from_a_user_page_fault(mode, smep):
    """SDM Vol.3A §4.6.1: with CR4.SMEP a fetch at CPL 0 from a user page
    is a #PF with P and I (0x11); without it, the code runs."""
    r = run_src(SMEP_GUEST.format(smep=1 << 20 if smep else 0), mode)
    if smep:
        assert r.reason == "triple_fault", r.detail
        first = r.crash["chain"][0]
        assert (first["vector"], first["error_code"], first["cr2"]) == (14, 0x11, 0x8000000000)
    else:
        assert (r.reason, r.exit_code) == ("exit", 0x42), r.detail


def test_without_smep_in_cpuid_cr4_smep_is_gp():
    r = run_src(SMEP_GUEST.format(smep=1 << 20), "native", cpu="max,-smep")
    assert r.reason == "triple_fault" and r.crash["chain"][0]["vector"] == 13
