"""The bundled guests and the asm/ library they are built on.

Every bundled guest runs in `native` and in `qemu` (the oracle): it must end
by itself with exit code 0, print its result line, and do exactly the same
architectural things in both modes; a native run must be deterministic. For
pagetouch, the counters must show what the guest did, phase by phase (its
hv marks, see guests/pagetouch.s); for tlbstress, hugepages, compute and smp,
what the TLB model makes of a working set beyond its reach, one within it,
almost no memory traffic, and shootdowns on several vCPUs; for ptemod and
ctxswitch, what PTE updates and CR3 switches cost with shadow paging and
with EPT; for multiboot, that a flat source with a multiboot header boots as a
kernel, enters long mode itself, takes APIC timer interrupts and starts its
other vCPUs with INIT and SIPI, the same in every mode.
"""
import functools

import pytest

import hv
from hv.asm import assemble_source
from hv.loader import MBI_ADDR, Kernel
from hv.vmm.vm import VM, Config
from hv.paths import bundled_guests

from conftest import LIB, MODES, run_src

GUESTS = sorted(bundled_guests())

# The line each bundled guest prints when all went well.
RESULT_LINE = {
    "hello": "hello from hv: vcpu 0 of 1",
    "pagetouch": "pagetouch: ok (512 pages, 1808 checks)",
    "forkwait": "forkwait: ok (40 forks, 640 pages copied)",
    "pgfault": "pgfault: ok (256 pages, 256 faults)",
    "tlbstress": "tlbstress: ok (4096 pages of 4 KiB, 5 passes, 20480 checks)",
    "hugepages": "hugepages: ok (4096 pages in 8 pages of 2 MiB, 5 passes, 20480 checks)",
    "compute": "compute: ok (524288 iterations, checksum 0x21bd79c2def47bf2)",
    "smp": "smp: ok (1 vcpus, 8 rounds)",
    "ptemod": "ptemod: ok (2000 rounds, 4007 checks)",
    "ctxswitch": "ctxswitch: ok (8 address spaces, 2000 switches, 6024 checks)",
    "multiboot": "multiboot: ok (1 vcpus, 3 timer interrupts)",
    "phases": "phases: ok (3 phases of 2500 rounds, 5064 PTEs churned, 320000 pages read, 343449 checks)",
}

# What pagetouch does (guests/pagetouch.s): its constants, and its marks.
PAGES = 512             # 4 KiB pages touched in phase 2
SWITCHES = 8            # CR3 switches in phase 4
SWITCH_PAGES = 32       # pages checked after each switch
FAULTS = 2              # page faults taken on purpose in phase 5
BUILD_A, TOUCH, TOUCHED, REMAPPED, SWITCHED, FAULTED = 1, 2, 3, 4, 5, 6


@functools.cache
def run(guest: str, mmu: str) -> hv.Result:
    """One run per guest and mode, shared by the tests (runs are deterministic)."""
    return hv.run(guest, mmu=mmu)


# -- every bundled guest ---------------------------------------------------------

def test_the_samples_are_bundled():
    assert {"hello", "pagetouch"} <= set(GUESTS)


@pytest.mark.parametrize("mmu", MODES)
@pytest.mark.parametrize("guest", GUESTS)
def test_guest_passes(guest, mmu):
    assert guest in RESULT_LINE, f"add the result line of guest {guest!r} to RESULT_LINE"
    r = run(guest, mmu)
    assert (r.reason, r.exit_code) == ("exit", 0), f"{r.detail}\n{r.console}"
    assert RESULT_LINE[guest] in r.console.splitlines()


@pytest.mark.parametrize("guest", GUESTS)
def test_guest_is_architecturally_the_same_in_both_modes(guest):
    native, qemu = run(guest, "native"), run(guest, "qemu")
    assert native.console == qemu.console
    assert (native.reason, native.exit_code) == (qemu.reason, qemu.exit_code)
    # Events the guest causes, whatever the MMU: exits (both modes intercept
    # the same), exceptions delivered, and where it took its marks.
    assert native.exits == qemu.exits
    for name in ("pf_guest", "exceptions", "hypercalls", "io_exits"):
        assert native.counters[name] == qemu.counters[name], name
    assert sorted(native.marks) == sorted(qemu.marks)


@pytest.mark.parametrize("guest", GUESTS)
def test_native_run_is_deterministic(guest):
    assert hv.run(guest, mmu="native").to_json() == run(guest, "native").to_json()


# -- hello -------------------------------------------------------------------------

@pytest.mark.parametrize("mmu", MODES)
def test_hello_greets_from_every_vcpu(mmu):
    r = hv.run("hello", mmu=mmu, vcpus=3)
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert r.console == "".join(f"hello from hv: vcpu {i} of 3\n" for i in range(3))


# -- pagetouch ----------------------------------------------------------------------

def test_pagetouch_prints_one_line_per_phase():
    lines = run("pagetouch", "native").console.splitlines()
    assert [line.split(":")[1].strip() for line in lines[1:6]] == [
        f"phase {n}" for n in range(1, 6)]
    assert not any("FAIL" in line for line in lines)


def test_pagetouch_counters():
    c = run("pagetouch", "native").counters
    assert c["invlpg"] == 2                     # the remap, and pt_unmap_4k
    assert c["cr3_loads"] == 1 + SWITCHES       # load A, then the switches
    assert c["tlb_flush"] >= 1 + SWITCHES       # each MOV to CR3 flushes
    assert c["pf_guest"] == FAULTS
    assert c["exceptions"] == 0


def test_pagetouch_touch_phase_walks_4_levels_per_page():
    r = run("pagetouch", "native")
    touch = r.between(TOUCH, TOUCHED)
    assert touch["tlb.misses"] >= PAGES         # every page's first touch misses
    assert touch["tlb.walks"] >= PAGES
    # Code, stack and data sit in 2 MiB pages the TLB already holds: every
    # walk of the phase is a 4-reference walk to a 4 KiB page.
    assert touch["tlb.walk_refs"] == 4 * touch["tlb.walks"]
    assert r.tlb["misses"] >= PAGES
    assert r.tlb["walk_refs_hist"].get(4, 0) >= PAGES


def test_pagetouch_phases_cost_what_they_do():
    r = run("pagetouch", "native")
    assert r.between(BUILD_A, TOUCH)["cr3_loads"] == 1
    assert r.between(TOUCH, TOUCHED)["cr3_loads"] == 0
    assert r.between(TOUCHED, REMAPPED)["invlpg"] == 1
    switched = r.between(REMAPPED, SWITCHED)
    assert switched["cr3_loads"] == SWITCHES
    # A switch drops the other space's translations: its pages miss again.
    assert switched["tlb.misses"] >= SWITCHES * SWITCH_PAGES
    faulted = r.between(SWITCHED, FAULTED)
    assert faulted["pf_guest"] == FAULTS
    assert faulted["invlpg"] == 1
    assert faulted["cr3_loads"] == 0


def test_pagetouch_faults_are_the_oracles_too():
    r = run("pagetouch", "qemu")
    assert r.between(SWITCHED, FAULTED)["pf_guest"] == FAULTS
    assert sorted(r.marks) == list(range(BUILD_A, FAULTED + 1))


# -- forkwait ------------------------------------------------------------------------

# What forkwait does (guests/forkwait.s): its constants, and its marks.
FORKS = 40              # fork, run the child, wait, reap
FORK_PAGES = 64         # the region: shared copy-on-write, unmapped at the reap
COPIES = 16             # pages each child writes, so copies (one #PF each)
FORKING, FIRST_REAPED, ALL_REAPED = 1, 2, 3


def test_forkwait_prints_one_line_per_phase():
    lines = run("forkwait", "native").console.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "parent", "fork 1", f"forks 2-{FORKS}", f"ok ({FORKS} forks, {FORKS * COPIES} pages copied)"]
    assert f"{FORK_PAGES} PTEs unmapped, 21 pages freed" in lines[1]    # 16 copies, 5 tables


def test_forkwait_counters():
    c = run("forkwait", "native").counters
    # Load the parent's tables, then for each fork: to the child and back.
    assert c["cr3_loads"] == 1 + 2 * FORKS
    assert c["tlb_flush"] >= 2 * FORKS
    # pt_unmap_4k's INVLPG for every region page of every child, and the #PF
    # handler's after mapping each copy.
    assert c["invlpg"] == FORKS * (FORK_PAGES + COPIES)
    assert c["pf_guest"] == FORKS * COPIES
    assert c["exceptions"] == 0


def test_forkwait_every_fork_does_the_same():
    r = run("forkwait", "native")
    first, rest = r.between(FORKING, FIRST_REAPED), r.between(FIRST_REAPED, ALL_REAPED)
    later = FORKS - 1
    for phase, forks in ((first, 1), (rest, later)):
        assert phase["cr3_loads"] == 2 * forks
        assert phase["invlpg"] == forks * (FORK_PAGES + COPIES)
        assert phase["pf_guest"] == forks * COPIES
        assert phase["io_exits"] == 0                   # the console is quiet
        # Each fork walks to every region page at least three times: the
        # child after its CR3 load, the parent after the wait, and the parent
        # after the reap's INVLPGs (its next round of writes).
        assert 3 * FORK_PAGES * forks <= phase["tlb.walks"] <= 4 * FORK_PAGES * forks
    # A later fork costs what the first did, without the first's cold misses.
    assert rest["tlb.walks"] <= later * first["tlb.walks"]
    assert rest["insns"] <= later * first["insns"]


def test_forkwait_faults_are_the_oracles_too():
    r = run("forkwait", "qemu")
    assert r.between(FORKING, FIRST_REAPED)["pf_guest"] == COPIES
    assert r.between(FIRST_REAPED, ALL_REAPED)["pf_guest"] == (FORKS - 1) * COPIES
    assert sorted(r.marks) == [FORKING, FIRST_REAPED, ALL_REAPED]


# -- pgfault -------------------------------------------------------------------------

# What pgfault does (guests/pgfault.s): its region, and its marks.
DEMAND_PAGES = 256      # unmapped until the #PF handler maps each on demand
TOUCHING, WRITTEN, READ = 1, 2, 3


def test_pgfault_prints_one_line_per_phase():
    lines = run("pgfault", "native").console.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == [
        "own GDT, TSS, IDT (#PF on IST1) and page tables, cr3=0x400000", "write pass",
        "read pass", f"ok ({DEMAND_PAGES} pages, {DEMAND_PAGES} faults)"]


def test_pgfault_counters():
    c = run("pgfault", "native").counters
    assert c["pf_guest"] == DEMAND_PAGES
    assert c["cr3_loads"] == 2                  # its own tables, the read pass's reload
    assert (c["invlpg"], c["exceptions"]) == (0, 0)


def test_pgfault_write_pass_faults_once_per_page():
    w = run("pgfault", "native").between(TOUCHING, WRITTEN)
    assert w["pf_guest"] == DEMAND_PAGES
    # Each page: the walk that faults, and the retried write's walk.
    assert w["tlb.walks"] >= 2 * DEMAND_PAGES
    assert w["cr3_loads"] == 0


def test_pgfault_read_pass_walks_every_page_and_never_faults():
    r = run("pgfault", "native")
    read = r.between(WRITTEN, READ)
    assert read["pf_guest"] == 0
    assert read["cr3_loads"] == 1
    # After the reload every page misses and is walked again, 4 references
    # down to the PTE the handler wrote; code, stack and data are in 2 MiB
    # pages (at most 3 references each).
    assert read["tlb.misses"] >= DEMAND_PAGES
    assert read["tlb.walks"] >= DEMAND_PAGES
    assert 4 * DEMAND_PAGES <= read["tlb.walk_refs"] <= 4 * read["tlb.walks"]
    # Over the run, 4-reference walks for each page's fault, retry and read,
    # but for the first fault: no page directory maps the region yet, so that
    # walk stops at the PDPT, after 2 references.
    hist = r.tlb["walk_refs_hist"]
    assert hist.get(2, 0) >= 1
    assert hist.get(4, 0) >= 3 * DEMAND_PAGES - 1


def test_pgfault_faults_are_the_oracles_too():
    r = run("pgfault", "qemu")
    assert r.between(TOUCHING, WRITTEN)["pf_guest"] == DEMAND_PAGES
    assert r.between(WRITTEN, READ)["pf_guest"] == 0
    assert sorted(r.marks) == [TOUCHING, WRITTEN, READ]


# -- tlbstress and hugepages ----------------------------------------------------------

# What they do (guests/tlbstress.s, guests/hugepages.s, asm/wset.s): one
# working set, the same passes; 4 KiB pages in one, 2 MiB pages in the other.
WS_PAGES = 4096         # 4 KiB pages in the working set (16 MiB)
WS_LARGE = 8            # the 2 MiB pages hugepages maps it with
WS_PASSES = 5           # pass 0 (cold), then the steady passes
TLB_ENTRIES = 1536      # hv's default TLB model
COLD, WARM, STEADY_DONE = 1, 2, 3


def test_tlbstress_working_set_exceeds_the_tlb():
    assert WS_PAGES > TLB_ENTRIES


def test_tlbstress_every_touch_misses_in_the_steady_state():
    r = run("tlbstress", "native")
    cold, steady = r.between(COLD, WARM), r.between(WARM, STEADY_DONE)
    touched = (WS_PASSES - 1) * WS_PAGES        # pages touched in the steady passes
    assert cold["tlb.misses"] >= WS_PAGES
    # FIFO sets of 12 ways, each cycled through by 32 pages: a page is always
    # gone by the time the next pass comes back to it.
    assert steady["tlb.misses"] >= touched
    assert steady["tlb.walks"] >= touched
    assert steady["tlb.walk_refs"] >= 4 * touched  # 4 levels down to each PTE
    assert steady["tlb.misses"] <= touched + 64  # and little else misses
    assert r.tlb["walk_refs_hist"].get(4, 0) >= WS_PASSES * WS_PAGES
    # A and D are set in the cold pass and never again.
    assert steady["tlb.ad_writes"] == 0
    assert steady["io_exits"] == 0              # the console is quiet
    assert r.counters["pf_guest"] == r.counters["exceptions"] == 0


def test_hugepages_hold_the_working_set_in_the_tlb():
    r = run("hugepages", "native")
    cold, steady = r.between(COLD, WARM), r.between(WARM, STEADY_DONE)
    assert WS_LARGE <= cold["tlb.misses"] < 50
    assert steady["tlb.misses"] < 50
    # Every walk ends at a 2 MiB PDE: PML4E, PDPTE, PDE.
    hist = r.tlb["walk_refs_hist"]
    assert hist.get(3, 0) >= WS_LARGE
    assert set(hist) == {3}
    assert r.tlb["walk_refs"] == 3 * r.tlb["walks"]
    assert steady["io_exits"] == 0


def test_hugepages_and_tlbstress_do_the_same_work():
    small, large = run("tlbstress", "native"), run("hugepages", "native")
    steady = [r.between(WARM, STEADY_DONE) for r in (small, large)]
    assert steady[0]["insns"] == steady[1]["insns"]
    assert steady[0]["tlb.misses"] > 100 * max(1, steady[1]["tlb.misses"])


def test_hugepages_gain_nothing_where_the_tlb_caches_4k():
    # Shadow paging shadows a guest 2 MiB page with 4 KiB entries, so the
    # TLB caches 4 KiB pieces and the steady passes miss as with 4 KiB pages.
    steady = run("hugepages", "shadow").between(WARM, STEADY_DONE)
    assert steady["tlb.misses"] >= (WS_PASSES - 1) * WS_PAGES


# -- compute -----------------------------------------------------------------------------

COMPUTE_ITERATIONS = 1 << 19
LOOP, LOOPED = 1, 2


@pytest.mark.parametrize("mmu", ["native", "shadow", "ept"])
def test_compute_costs_next_to_no_mmu_work(mmu):
    r = run("compute", mmu)
    loop = r.between(LOOP, LOOPED)
    assert loop["insns"] >= 19 * COMPUTE_ITERATIONS     # about 10 million
    assert r.tlb["misses"] < 100
    assert loop["tlb.misses"] < 10              # the array's two pages, at most
    assert loop["exits"] <= 10                  # the mark; a few hidden faults
    assert loop["io_exits"] == 0


# -- smp ---------------------------------------------------------------------------------

# What smp does (guests/smp.s): rounds of remap + shootdown, and its marks.
SMP_ROUNDS = 8
ROUNDS_START, ROUNDS_DONE = 1, 2


@functools.cache
def run_smp(mmu: str, vcpus: int, quantum: int | None = None) -> hv.Result:
    options = {} if quantum is None else {"quantum": quantum}
    return hv.run("smp", mmu=mmu, vcpus=vcpus, **options)


def smp_ok(r: hv.Result, vcpus: int) -> None:
    assert (r.reason, r.exit_code) == ("exit", 0), f"{r.detail}\n{r.console}"
    assert r.console.splitlines()[-1] == f"smp: ok ({vcpus} vcpus, {SMP_ROUNDS} rounds)"


@pytest.mark.parametrize("vcpus", [1, 4])
def test_smp_passes(vcpus):
    r = run_smp("native", vcpus)
    smp_ok(r, vcpus)
    assert not any("FAIL" in line for line in r.console.splitlines())


@pytest.mark.parametrize("vcpus", [1, 4])
def test_smp_every_vcpu_shoots_down_every_round(vcpus):
    r = run_smp("native", vcpus)
    c = r.counters
    assert c["invlpg"] == vcpus * SMP_ROUNDS
    assert c["cr3_loads"] == vcpus             # every vCPU loads vCPU 0's tables
    # The others halt, vCPU 0 exits. (With slices this long the others reach
    # their HLT before vCPU 0 sees their done flags; with tiny ones it may exit
    # first.)
    assert c["halt_exits"] == vcpus - 1
    assert c["pf_guest"] == c["exceptions"] == 0
    rounds = r.between(ROUNDS_START, ROUNDS_DONE)
    assert rounds["invlpg"] == vcpus * SMP_ROUNDS
    # Each INVLPG drops the shared page: the read after it misses and walks.
    assert rounds["tlb.misses"] >= vcpus * SMP_ROUNDS
    for cpu in r.vcpus:
        assert cpu["counters"]["invlpg"] == SMP_ROUNDS
        assert cpu["counters"]["cr3_loads"] == 1


def test_smp_invlpg_grows_with_vcpus():
    one, four = run_smp("native", 1), run_smp("native", 4)
    assert four.counters["invlpg"] == 4 * one.counters["invlpg"]
    assert four.tlb["misses"] > one.tlb["misses"]


@pytest.mark.parametrize("mmu", MODES)
def test_smp_four_vcpus_in_every_mode(mmu):
    # A short quantum: the vCPUs wait for each other in every round, and a
    # waiting vCPU spins away the rest of its slice.
    r = run_smp(mmu, 4, 1000)
    smp_ok(r, 4)
    oracle = run_smp("qemu", 4, 1000)
    assert r.console == oracle.console
    for reason in ("IO_INSTRUCTION", "HLT", "VMCALL"):     # exits in every mode
        assert r.exits[reason] == oracle.exits[reason], reason
    if mmu == "shadow":
        # Every vCPU's INVLPG is an exit; vCPU 0's PTE writes are emulated.
        assert r.exits["INVLPG"] == 4 * SMP_ROUNDS


@pytest.mark.parametrize("vcpus, quantum", [(2, 1), (3, 1), (3, 7), (5, 13), (8, 7), (8, 100)])
def test_smp_is_correct_in_any_interleaving(vcpus, quantum):
    # Tiny quanta switch vCPUs in the middle of the barrier, the IPI and the
    # checks: the protocol needs no atomic instruction.
    smp_ok(run_smp("native", vcpus, quantum), vcpus)


def test_smp_with_vcpus_is_deterministic():
    assert (hv.run("smp", mmu="native", vcpus=4, quantum=1000).to_json()
            == run_smp("native", 4, 1000).to_json())


# -- multiboot ---------------------------------------------------------------------------

def multiboot_console(vcpus: int) -> str:
    """What guests/multiboot.s prints with `vcpus` vCPUs."""
    lines = ["32-bit protected mode, paging off, eax = 0x2badb002",
             'long mode; loaded by hv, command line "multiboot"',
             "3 APIC timer interrupts, vector 31"]
    if vcpus > 1:
        lines.append(f"INIT and SIPI to {vcpus - 1} other vcpus, trampoline at 0x8000")
        lines += [f"vcpu {i}: real mode, protected mode, long mode" for i in range(1, vcpus)]
    lines.append(f"ok ({vcpus} vcpus, 3 timer interrupts)")
    return "".join(f"multiboot: {line}\n" for line in lines)


@functools.cache
def run_multiboot(mmu: str, vcpus: int) -> hv.Result:
    return hv.run("multiboot", mmu=mmu, vcpus=vcpus)


def test_multiboot_is_a_kernel_by_its_header():
    _name, kernel = hv.load_guest("multiboot")
    assert isinstance(kernel, Kernel)
    # Loaded where it was assembled, entered at its 32-bit entry, with its
    # BSS (page tables, stacks) zeroed past the image.
    (segment,) = kernel.segments
    assert segment.paddr == 0x100000 and kernel.entry == kernel.symbols["entry32"]
    assert segment.memsz > len(segment.data) and kernel.header_flags == 1 << 16


@pytest.mark.parametrize("mmu", MODES)
@pytest.mark.parametrize("vcpus", [2, 3])
def test_multiboot_starts_its_other_vcpus_in_every_mode(mmu, vcpus):
    r = run_multiboot(mmu, vcpus)
    assert (r.reason, r.exit_code) == ("exit", 0), f"{r.detail}\n{r.console}"
    assert r.console == multiboot_console(vcpus)
    # The BSP took the timer's interrupts, each waking its HLT; every AP
    # halted at its end, in long mode, after reporting.
    assert r.counters["interrupts"] == r.vcpus[0]["counters"]["interrupts"] == 3
    assert r.vcpus[0]["counters"]["halt_exits"] == 3
    assert [c["where"] for c in r.vcpus[1:]] == [".Lap_halt+0x1"] * (vcpus - 1)
    assert all(c["halted"] for c in r.vcpus[1:])
    # Each AP ran in the round its start-up IPI came (Machine._schedule):
    # the BSP, waiting for it, spun far less than a quantum (10^6).
    assert r.vcpus[0]["counters"]["insns"] < 20_000
    # The same guest, architecturally, as in the oracle.
    oracle = run_multiboot("qemu", vcpus)
    assert r.counters["insns"] == oracle.counters["insns"]
    assert r.exits["IO_INSTRUCTION"] == oracle.exits["IO_INSTRUCTION"]


@pytest.mark.parametrize("mmu", MODES)
def test_multiboot_counts_the_same_twice(mmu):
    assert hv.run("multiboot", mmu=mmu, vcpus=2).to_json() == run_multiboot(mmu, 2).to_json()


def test_multiboot_switches_modes_as_a_vmm_sees_it():
    """Under a VMM its own way to long mode exits: CR4, CR3 and CR0 loads,
    and EFER by WRMSR, on each vCPU; the APIC is MMIO (EPT_MISCONFIG)."""
    r = run_multiboot("ept", 2)
    for cpu in r.vcpus:
        assert cpu["exits"]["MSR_READ"] == cpu["exits"]["MSR_WRITE"] == 1     # EFER.LME
        assert cpu["counters"]["mmio_exits"] > 0
    assert r.exits["EPT_MISCONFIG"] == r.counters["mmio_exits"]
    shadow = run_multiboot("shadow", 2)
    for cpu in shadow.vcpus:
        assert cpu["counters"]["cr3_loads"] == 1       # long_mode_on's


def test_multiboot_checks_the_boot_magic():
    _name, kernel = hv.load_guest("multiboot")
    vm = VM(kernel, Config())
    vm.vcpus[0].engine.set_reg("rax", 0x1BADB002)       # the header's magic, not eax's
    vm.run()
    assert (vm.reason, vm.exit_code, bytes(vm.console)) == ("exit", 1, b"")


def test_a_sipi_starts_the_ap_at_the_page_its_vector_names():
    """Real mode at V:0, CS's base V x 0x1000 (the register API leaves the
    base of CS alone: Engine.enter_real_mode sets it)."""
    vm = VM(b"\xf4", Config(vcpus=2))     # vCPU 0 halts at once
    # mov al, N; out 0xf4, al (the same bytes in 16-bit code)
    vm.guest.write(0x8000, bytes.fromhex("b0 42 e6 f4"))       # the SIPI's page: exit 0x42
    vm.guest.write(0x0000, bytes.fromhex("b0 11 e6 f4"))       # linear 0: exit 0x11
    vm.vcpus[1].wait_for_sipi()
    vm.vcpus[1].start_up(0x08)                                  # as VM.send_ipi does
    vm.run()
    assert (vm.reason, vm.exit_code) == ("exit", 0x42)


# A flat source with a multiboot header (flags bit 16: where it loads and
# where it is entered) is a kernel: entered in 32-bit protected mode,
# paging off, eax = the boot magic, ebx = the MBI; its image's bytes as a
# .bin boot the same. It reports eax == magic and ebx in one exit code.
TINY_KERNEL = """
header:
    .long 0x1BADB002, 1 << 16, -(0x1BADB002 + (1 << 16))
    .long header, header, end, end + 0x1000, entry
.code32
entry:
    cmp eax, 0x2BADB002
    sete al
    movzx eax, al
    shl ebx, 8
    or eax, ebx
    out 0xf4, eax
end:
"""


@pytest.mark.parametrize("mmu", MODES)
def test_a_source_with_a_multiboot_header_boots_as_a_kernel(tmp_path, mmu):
    src = tmp_path / "tiny.s"
    src.write_text(TINY_KERNEL)
    r = hv.run(src, mmu=mmu)
    assert (r.reason, r.exit_code) == ("exit", MBI_ADDR << 8 | 1), r.detail
    image = tmp_path / "tiny.bin"
    image.write_bytes(assemble_source(TINY_KERNEL).code)
    assert hv.run(image, mmu=mmu).exit_code == r.exit_code
    assert hv.run("tiny", mmu=mmu, image=image.read_bytes()).exit_code == r.exit_code


def test_a_multiboot_header_without_load_addresses_is_refused(tmp_path):
    src = tmp_path / "noaout.s"
    src.write_text(".long 0x1BADB002, 0, -0x1BADB002\nhlt\n")
    with pytest.raises(hv.HvError, match=r"noaout.s has a multiboot header \(at offset 0x0\) "
                                         r"without load addresses"):
        hv.run(src)


def test_a_flat_image_without_a_header_keeps_the_boot_abi():
    # 64-bit, at 0x100000, rdi = the vCPU's index: as before multiboot
    r = run_src("lea rax, [rip]\nadd rax, rdi\nshr rax, 8\nout 0xf4, eax")
    assert r.exit_code == 0x1000


# -- ptemod and ctxswitch: shadow paging against EPT -------------------------------------

# What they do (guests/ptemod.s, guests/ctxswitch.s): their constants and marks.
PTEMOD_ROUNDS = 2000    # PTE rewritten, INVLPG, page read back
SPACES = 8              # ctxswitch's address spaces ...
CTX_SWITCHES = 2000     # ... switched to round-robin
PRIV_PAGES = 2          # each space's private pages, touched after every switch
SHADOW_TABLES = 4       # a space's own tables: its PML4 and 3 for its private pages
START, DONE, FIRST_CYCLE = 1, 2, 3      # ctxswitch's mark 3 lies between 1 and 2


def test_ptemod_invalidates_every_round():
    r = run("ptemod", "native")
    rounds = r.between(START, DONE)
    assert rounds["invlpg"] == PTEMOD_ROUNDS
    # Each INVLPG drops the page: the read after it misses and walks 4 levels.
    assert rounds["tlb.misses"] >= PTEMOD_ROUNDS
    assert rounds["tlb.walk_refs"] >= 4 * PTEMOD_ROUNDS
    assert r.counters["invlpg"] == PTEMOD_ROUNDS
    for name in ("cr3_loads", "pf_guest", "io_exits"):
        assert rounds[name] == 0, name


def test_ptemod_costs_three_exits_a_round_with_shadow_paging():
    rounds = run("ptemod", "shadow").between(START, DONE)
    # The PTE write traps and is emulated (it zaps the shadow PTE) ...
    assert rounds["mmu_pte_write"] >= PTEMOD_ROUNDS
    assert rounds["exit.INVLPG"] == PTEMOD_ROUNDS
    # ... and the read after the INVLPG is a hidden fault that builds it again.
    assert rounds["pf_fixed"] >= PTEMOD_ROUNDS
    assert rounds["exit.EXCEPTION_NMI"] >= 2 * PTEMOD_ROUNDS
    # The table is walked between two writes: it stays shadowed.
    assert rounds["mmu_flooded"] == 0
    assert rounds["pf_guest"] == 0


@pytest.mark.parametrize("guest", ["ptemod", "ctxswitch"])
def test_ept_takes_no_paging_exits(guest):
    r = run(guest, "ept")
    for reason in ("EXCEPTION_NMI", "CR_ACCESS", "INVLPG"):
        assert reason not in r.exits, reason
    # Between the marks, nothing but the mark itself is an exit.
    assert set(r.between(START, DONE).exits) == {"VMCALL"}


def test_ctxswitch_loads_cr3_every_switch():
    r = hv.run("ctxswitch", mmu="native", cpu="-pcid")
    assert "no PCID: every switch flushed the TLB" in r.console
    switches = r.between(START, DONE)
    assert switches["cr3_loads"] == CTX_SWITCHES
    assert switches["tlb_flush"] >= CTX_SWITCHES
    # Each switch flushes the TLB: the space's pages miss again.
    assert switches["tlb.misses"] >= PRIV_PAGES * CTX_SWITCHES
    for name in ("invlpg", "pf_guest", "io_exits"):
        assert switches[name] == 0, name


@pytest.mark.parametrize("mmu", ["native", "ept", "shadow"])
def test_ctxswitch_with_pcid_keeps_every_space_s_tlb_entries(mmu):
    """Space s runs with PCID s + 1 and is switched to with CR3 bit 63 set:
    after the first cycle no switch flushes, and (8 spaces, within the TLB's
    12 ways) the pages after a switch hit: a space's pages miss at most once
    more (under shadow paging the first cycle's write-protection flushes
    took every PCID's entries), not after every switch. Under shadow paging
    every switch still exits; only the flush goes."""
    r = run("ctxswitch", mmu)
    assert "PCID: space s switched to with PCID s + 1" in r.console
    steady = r.between(FIRST_CYCLE, DONE)
    assert steady["cr3_loads"] == CTX_SWITCHES - SPACES and steady["tlb_flush"] == 0
    assert steady["tlb.misses"] <= (PRIV_PAGES + 2) * SPACES
    assert steady["exit.CR_ACCESS"] == (CTX_SWITCHES - SPACES if mmu == "shadow" else 0)


def test_ctxswitch_finds_every_space_again_with_shadow_paging():
    r = run("ctxswitch", "shadow")
    switches = r.between(START, DONE)
    assert switches["exit.CR_ACCESS"] == CTX_SWITCHES
    # The first cycle builds each space's own shadow tables; the kernel's,
    # which every space shares, were built before it.
    assert r.between(START, FIRST_CYCLE)["mmu_cache_miss"] == SHADOW_TABLES * SPACES
    # After it every space is found again, whole: no shadow page is built
    # and no hidden fault taken.
    steady = r.between(FIRST_CYCLE, DONE)
    assert steady["exit.CR_ACCESS"] == CTX_SWITCHES - SPACES
    for name in ("mmu_cache_miss", "mmu_shadow_zapped", "pf_fixed", "exit.EXCEPTION_NMI"):
        assert steady[name] == 0, name


# -- the asm/ library ------------------------------------------------------------------


@pytest.mark.parametrize("mmu", MODES)
def test_serial_number_formats(mmu):
    values = [0, 9, 10, 255, 4096, 2**63, 2**64 - 1]
    body = "".join(f"""
    mov rax, {v:#x}
    call put_dec
    mov al, ' '
    call putc
    mov rax, {v:#x}
    call put_hex
    call newline""" for v in values)
    r = run_src(f"""
    jmp main
.include "serial.s"
main:{body}
    lea rsi, [rip + text]
    call puts
    mov al, 3
    call exit
text:
    .asciz "done\\n"
""", mmu)
    assert (r.reason, r.exit_code) == ("exit", 3)
    assert r.console == "".join(f"{v} {v:#x}\n" for v in values) + "done\n"


@pytest.mark.parametrize("mmu", MODES)
def test_panic_prints_and_exits_0xed(mmu):
    r = run_src("""
    jmp main
.include "serial.s"
main:
    lea rsi, [rip + why]
    call panic
why:
    .asciz "out of tea"
""", mmu)
    assert (r.exit_code, r.console) == (0xED, "panic: out of tea\n")




@pytest.mark.parametrize("mmu", MODES)
def test_default_handler_reports_an_unexpected_exception(mmu):
    src = LIB + """
boom:
    ud2
"""
    rip = assemble_source(src, name="<test>").symbols["boom"]
    r = run_src(src, mmu)
    assert r.exit_code == 0xEE
    assert r.console == f"unexpected exception 6 at rip={rip:#x} err=0x0 cr2=0x0\n"


@pytest.mark.parametrize("mmu", MODES)
def test_handler_sees_the_frame_and_resumes(mmu):
    # A #GP from loading a selector past the GDT's limit (gdt.s has 5
    # descriptor slots): the handler checks the frame, sets rax in it and
    # resumes after the faulting instruction.
    r = run_src(LIB + """
    mov edi, 13
    lea rsi, [rip + on_gp]
    call idt_set_handler
    mov eax, 0x28
    mov r15, 0x1234
boom:
    mov ds, ax
resume:
    cmp rax, 77                 ; set by the handler
    jne bad
    cmp r15, 0x1234             ; every register restored
    jne bad
    mov al, 0
    call exit
bad:
    mov al, 1
    call exit
on_gp:
    cmp qword ptr [rdi + FRAME_VECTOR], 13
    jne bad
    cmp qword ptr [rdi + FRAME_ERROR], 0x28     ; the selector
    jne bad
    cmp qword ptr [rdi + FRAME_CS], 0x08
    jne bad
    lea rax, [rip + boom]
    cmp qword ptr [rdi + FRAME_RIP], rax
    jne bad
    mov qword ptr [rdi + FRAME_RAX], 77
    lea rax, [rip + resume]
    mov qword ptr [rdi + FRAME_RIP], rax
    xor r15d, r15d              ; handlers may clobber anything
    ret
""", mmu)
    assert (r.reason, r.exit_code, r.counters["exceptions"]) == ("exit", 0, 1)


@pytest.mark.parametrize("mmu", MODES)
def test_non_canonical_access_is_gp(mmu):
    r = run_src(LIB + """
    mov rbx, 0x8000000000000000
boom:
    mov rax, qword ptr [rbx]
""", mmu)
    assert r.console.startswith("unexpected exception 13 at ")
    assert (r.counters["exceptions"], r.counters["pf_guest"]) == (1, 0)


@pytest.mark.parametrize("mmu", MODES)
def test_double_fault_runs_on_ist1(mmu):
    # A #PF whose frame cannot be pushed (RSP points at unmapped memory)
    # becomes #DF, delivered on the TSS's IST1 stack to the default handler.
    r = run_src(LIB + """
    mov rsp, 0x40000000
    mov rax, qword ptr [rsp]
""", mmu)
    assert r.exit_code == 0xEE
    assert r.console.startswith("unexpected exception 8 at rip=")


@pytest.mark.parametrize("mmu", MODES)
def test_page_table_helpers(mmu):
    # Map, look up and unmap in the boot tables' address space (CR3 = 0x2000).
    r = run_src(LIB + """
    mov rdi, cr3
    mov rsi, 0x40001000
    mov edx, 0x900000
    mov ecx, PTE_P | PTE_RW
    call pt_map_4k
    mov r12, rax                        ; the PTE
    mov qword ptr [rsi], 42             ; through the new mapping ...
    mov eax, 0x900000
    cmp qword ptr [rax], 42             ; ... into the frame
    jne bad
    call pt_lookup
    cmp rax, r12
    jne bad
    cmp edx, 1
    jne bad
    mov rsi, 0x200000                   ; a 2 MiB page of the boot map
    call pt_lookup
    cmp edx, 2
    jne bad
    test qword ptr [rax], PTE_PS
    jz bad
    mov rsi, 0x40001000
    call pt_unmap_4k
    mov rdx, 0x900000 | PTE_P | PTE_RW | PTE_A | PTE_D
    cmp rax, rdx
    jne bad
    mov rsi, 0x7000000000               ; no table maps it
    call pt_lookup
    test rax, rax
    jnz bad
    mov al, 0
    call exit
bad:
    mov al, 1
    call exit
""", mmu)
    assert (r.reason, r.exit_code, r.console) == ("exit", 0, "")


@pytest.mark.parametrize("mmu", MODES)
def test_page_free_list_and_pt_free_tables(mmu):
    # A pool of 8 pages: a freed page is handed out again (zeroed), and
    # pt_free_tables gives back every table of an address space but not the
    # pages its leaves map, nor a 2 MiB page.
    r = run_src(LIB + """
    mov edi, 0x900000
    mov esi, 0x908000
    call pt_pool_init
    call page_avail
    cmp rax, 8
    jne bad
    call page_alloc
    mov r12, rax                        ; the first page, 0x900000
    cmp r12, 0x900000
    jne bad
    mov qword ptr [r12 + 8], -1         ; dirty it, then give it back
    mov rdi, r12
    call page_free
    call page_avail
    cmp rax, 8
    jne bad
    call page_alloc                     ; the same page again, zeroed
    cmp rax, r12
    jne bad
    cmp qword ptr [r12], 0              ; (the free list's link is gone too)
    jne bad
    cmp qword ptr [r12 + 8], 0
    jne bad
    call pt_new_root                    ; 0x901000
    mov r13, rax
    mov rdi, rax
    mov rsi, 0x40001000
    mov edx, 0x800000
    mov ecx, PTE_P | PTE_RW
    call pt_map_4k                      ; a PDPT, a PD and a PT
    mov rsi, 0x40200000
    mov edx, 0x600000
    call pt_map_2m                      ; a 2 MiB leaf in the same PD
    call page_avail
    cmp rax, 3                          ; 8 - the page - 4 tables
    jne bad
    call pt_free_tables
    call page_avail
    cmp rax, 7                          ; the 4 tables are back
    jne bad
    call page_alloc                     ; the last one freed: the root
    cmp rax, r13
    jne bad
    mov eax, 0x800000                   ; the leaf's page was not freed (no link)
    cmp qword ptr [rax], 0
    jne bad
    mov al, 0
    call exit
bad:
    mov al, 1
    call exit
""", mmu)
    assert (r.reason, r.exit_code, r.console) == ("exit", 0, "")


@pytest.mark.parametrize("mmu", MODES)
@pytest.mark.parametrize("quantum", [1, 5, 1000])
def test_barrier_holds_every_vcpu(mmu, quantum):
    # 3 vCPUs, 20 barriers: after barrier p every vCPU has announced phase p,
    # and none can be past phase p + 1 (it would have to pass barrier p + 1).
    r = run_src("""
    jmp main
.include "serial.s"
.include "sync.s"
PHASES = 20
main:
    mov r12, rdi
    mov r13, rsi
    xor r14d, r14d                      ; the phase
    lea rbx, [rip + phase]
next:
    inc r14
    mov qword ptr [rbx + r12*8], r14
    mov rdi, r12
    mov rsi, r13
    call smp_barrier
    xor ecx, ecx
look:
    mov rax, qword ptr [rbx + rcx*8]
    cmp rax, r14
    jb bad
    lea rdx, [r14 + 1]
    cmp rax, rdx
    ja bad
    inc ecx
    cmp rcx, r13
    jb look
    cmp r14, PHASES
    jb next
    lea rdx, [rip + done]
    mov qword ptr [rdx + r12*8], 1
    test r12, r12
    jnz park
    xor ecx, ecx
wait:
    lea rdi, [rdx + rcx*8]
    mov esi, 1
    call smp_wait
    inc ecx
    cmp rcx, r13
    jb wait
    mov al, 0
    call exit
bad:
    mov al, 1
    call exit
park:
    hlt
    jmp park
.align 4096
phase:
    .zero 8 * 16
done:
    .zero 8 * 16
.align 4096
""", mmu, vcpus=3, quantum=quantum)
    assert (r.reason, r.exit_code, r.console) == ("exit", 0, "")


@pytest.mark.parametrize("mmu", MODES)
def test_putf_formats_and_preserves_registers(mmu):
    r = run_src("""
    jmp main
.include "serial.s"
main:
    lea rsi, [rip + fmt]
    mov edx, 512
    mov ecx, 255
    lea r8, [rip + word]
    mov r9, -1
    call putf
    cmp rdx, 512
    jne bad
    cmp rcx, 255
    jne bad
    cmp r9, -1
    jne bad
    lea rax, [rip + fmt]
    cmp rsi, rax
    jne bad
    lea rsi, [rip + plain]
    call putf
    mov al, 0
    call exit
bad:
    mov al, 1
    call exit
fmt:
    .asciz "%d %x %s %x: 100%%\\n"
word:
    .asciz "tea"
plain:
    .asciz "no conversions\\n"
""", mmu)
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert r.console == "512 0xff tea 0xffffffffffffffff: 100%\nno conversions\n"


@pytest.mark.parametrize("fmt, printed, why", [
    ("%d %d %d %d %d", "1 2 3 4 ", "more than four arguments"),
    ("%d%q", "1", "a conversion other than %d, %x, %s or %%"),
    ("%", "", "a conversion other than %d, %x, %s or %%"),
])
def test_putf_panics_on_a_bad_format(fmt, printed, why):
    r = run_src(f"""
    jmp main
.include "serial.s"
main:
    lea rsi, [rip + fmt]
    mov edx, 1
    mov ecx, 2
    mov r8d, 3
    mov r9d, 4
    call putf
    mov al, 0
    call exit
fmt:
    .asciz "{fmt}"
""")
    assert (r.exit_code, r.console) == (0xED, f"{printed}panic: putf: {why}\n")


CHECK_SRC = LIB + """
    mov r12d, {fail}            ; checks that fail: got i, expected 0, at 0x1000 + i
fail:
    test r12d, r12d
    jz passing
    mov eax, r12d
    xor edx, edx
    lea rdi, [rax + 0x1000]
    lea rsi, [rip + what]
    call check
    dec r12d
    jmp fail
passing:
    mov eax, 5                  ; one that passes
    mov edx, 5
    call check
    mov eax, 3                  ; three made elsewhere, {tallied} of them failed
    mov edx, {tallied}
    call check_tally
    lea rsi, [rip + mid]
    call say
    lea rsi, [rip + ok]
    mov rdx, qword ptr [rip + check_count]
    mov rcx, qword ptr [rip + check_failures]
    call check_verdict
.include "check.s"
check_prefix:
    .asciz "t: "
what:
    .asciz "thing"
mid:
    .asciz "checked\\n"
ok:
    .asciz "ok (%d checks, %d failed)\\n"
"""


@pytest.mark.parametrize("mmu", MODES)
def test_check_reports_failures_and_the_verdict_ends_the_vm(mmu):
    r = run_src(CHECK_SRC.format(fail=12, tallied=1), mmu)
    assert (r.reason, r.exit_code) == ("exit", 1)
    # The first ten failures are reported as they happen, then the verdict.
    assert r.console == "".join(
        f"t: FAIL thing at {0x1000 + i:#x}: got {i:#x}, expected 0x0\n" for i in range(12, 2, -1)
    ) + "t: checked\nt: FAILED (13 of 16 checks)\n"


@pytest.mark.parametrize("mmu", MODES)
def test_check_verdict_prints_the_ok_line_when_all_passed(mmu):
    r = run_src(CHECK_SRC.format(fail=0, tallied=0), mmu)
    assert (r.reason, r.exit_code) == ("exit", 0)
    assert r.console == "t: checked\nt: ok (4 checks, 0 failed)\n"
