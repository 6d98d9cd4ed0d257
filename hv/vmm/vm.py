"""A VM: guest memory, the boot state of the boot ABI, its vCPUs, and the
deterministic round-robin loop that runs them.

Boot ABI (README.md, "Guest boot ABI"): the image is loaded at GPA
0x100000 and entered at its first byte in 64-bit mode at CPL 0 with
interrupts off; CR3 points at an identity map of all RAM built below
0x100000; a GDT with a flat code segment at 0x08 and data at 0x10; each
vCPU has a 16 KiB stack below 0xA0000; rdi = vCPU index, rsi = vCPU count.

A multiboot kernel (hv.loader) is entered as a multiboot loader leaves
the CPU (Multiboot Specification 0.6.96, §3.2): 32-bit protected mode,
paging off, flat 32-bit CS and DS, EAX = 0x2BADB002, EBX = the boot
information. vCPUs other than the first wait for INIT and SIPI, as
application processors do.

The platform is a PC's few devices (hv.devices): ports behind one table
(`ports`), and a local APIC per vCPU at its xAPIC page.
"""
from __future__ import annotations

import signal
import struct
import time
from dataclasses import dataclass

from .. import asm, loader
from ..arch.paging import P, PS, RW
from ..arch.x86 import CR0, CR4, EFER, GDT_CODE64, GDT_DATA, MSR_EFER, RFLAGS
from ..cost import DEFAULT_PROFILE, check_modes, load_profile
from ..errors import GuestEscape, HvError, InvariantError
from ..devices import acpi, pc_platform
from ..devices import lapic
from ..devices.lapic import APIC_DEFAULT_BASE
from ..hw.codescan import CodeFrames
from ..hw.cpu import CpuModel, parse_cpu
from ..hw.engine import EngineError
from ..hw.memo import WalkMemo
from ..hw.pwc import WalkCache
from ..hw.tlb import TLB
from ..memory import GiB, MiB, format_size
from ..stats import Stats
from .exits import Trace
from .agile import parse_policy
from .modes import MODES
from .vcpu import VCpu

LOAD_ADDR = 0x10_0000
GDT_ADDR = 0x1000
PML4_ADDR = 0x2000
PDPT_ADDR = 0x3000
PD_ADDR = 0x4000            # one page directory per GiB of RAM
PML5_ADDR = 0x5_0000        # --paging-levels 5: a PML5 whose entry 0 is the PML4
STACK_TOP = 0xA_0000
STACK_SIZE = 0x4000
MAX_VCPUS = 16
MAX_VMS = 1024          # VPIDs 1..1024 (the TLB model's tags have room for 65535)
# What a guest can make the VMM keep, so that no guest grows host memory
# without bound: its console output, and marks with distinct ids.
MAX_CONSOLE = 8 << 20
MAX_MARKS = 1024
MAX_RAM = 64 * GiB
# A kernel's RAM ends below the PC's hole under 4 GiB (its device pages):
# hv models no RAM above it.
MAX_KERNEL_RAM = 3 * GiB
CODE_SEL, DATA_SEL = 0x08, 0x10
# The GDT a kernel is entered with (it loads its own first): flat 32-bit
# code at 0x08 and data at 0x10.
GDT32 = (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
KERNEL_CR0 = int(CR0.PE | CR0.ET)     # Engine.leave_long_mode leaves it so

BOOT_CR0 = int(CR0.PE | CR0.MP | CR0.ET | CR0.NE | CR0.WP | CR0.PG)
BOOT_CR4 = int(CR4.PAE | CR4.OSFXSR | CR4.OSXMMEXCPT)
BOOT_EFER = int(EFER.SCE | EFER.LME | EFER.LMA | EFER.NXE)


@dataclass(frozen=True)
class Config:
    """A run's options: each is hv.run's keyword and `hv run`'s option of
    the same name (tlb_entries: --tlb-entries; memo=False: --no-memo)."""
    mmu: str = "native"
    ram: int = 64 * MiB
    vcpus: int = 1
    tlb_entries: int = 1536
    tlb_ways: int = 12
    max_insns: int = 500_000_000
    quantum: int = 1_000_000
    ept_large_pages: bool = False   # host large pages: EPT's and the shadow tables' (README)
    ept_levels: int = 4         # EPT's levels: 4, or 5 (5-level EPT)
    paging_levels: int = 4      # the boot ABI's paging: 4, or 5 (CR4.LA57; needs la57)
    asid: bool = True           # tag TLB entries by VM (VPID); False: flush at every entry/exit
    pwc: bool = False           # page-walk caches and a nested TLB (hv/hw/pwc.py)
    check_invariants: bool = False  # check the VMM's invariants after every exit (slow)
    timeout: float = 0          # wall-clock seconds before the run is stopped (0: none)
    memo: bool = True           # replay unchanged walks (speed only: the counts are the same)
    agile_policy: str = "dynamic"  # agile: when subtrees go nested (hv/vmm/agile.py)
    cpu: str = ""               # the CPU's features, QEMU's -cpu spelling (hv.hw.cpu.parse_cpu)
    append: str = ""            # a kernel's command line after its name (--append)
    profile: str = DEFAULT_PROFILE  # the CPU whose costs the guest's clock counts (hv.cost)
    trace: Trace | None = None  # where exits are traced (--trace); no count depends on it

    def check(self) -> None:
        if self.mmu not in MODES:
            raise HvError(f"unknown MMU mode {self.mmu!r} (choose from {', '.join(MODES)})")
        parse_policy(self.agile_policy)
        features = parse_cpu(self.cpu)
        if self.ept_levels not in (4, 5) or self.paging_levels not in (4, 5):
            raise HvError(f"paging has 4 or 5 levels, not --ept-levels {self.ept_levels} "
                          f"--paging-levels {self.paging_levels}")
        if self.paging_levels == 5 and "la57" not in features:
            raise HvError("--paging-levels 5 needs a CPU with la57 (--cpu +la57)")
        check_modes(load_profile(self.profile), (self.mmu,))
        if not 4 * MiB <= self.ram <= MAX_RAM or self.ram % (2 * MiB):
            raise HvError(f"RAM must be a multiple of 2 MiB from 4 MiB to 64 GiB, "
                          f"not {format_size(self.ram)}")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise HvError(f"a VM has 1 to {MAX_VCPUS} vCPUs, not {self.vcpus}")
        if self.tlb_entries < 1 or self.tlb_ways < 1 or self.tlb_entries % self.tlb_ways:
            raise HvError(f"a TLB of {self.tlb_entries} entries cannot have {self.tlb_ways} ways")
        if self.max_insns < 1 or self.quantum < 1:
            raise HvError("--max-insns and --quantum must be positive")
        if self.timeout < 0:
            raise HvError("--timeout must not be negative")
        if self.trace is not None and not isinstance(self.trace, Trace):
            raise HvError(f"trace must be a hv.vmm.exits.Trace, not {self.trace!r}")


class VM:
    """`image`: a flat image's bytes (the boot ABI), or a multiboot kernel
    (hv.loader.Kernel) with its `modules` ((name, bytes) each)."""

    def __init__(self, image: "bytes | loader.Kernel", config: Config = Config(),
                 on_console=None, machine: "Machine | None" = None, name: str = "guest",
                 symbols: dict[str, int] | None = None, modules=()):
        config.check()
        self.config, self.name = config, name
        self.kernel = image if isinstance(image, loader.Kernel) else None
        # The guest's labels (an assembled .s's, a kernel's ELF symbols), to
        # name the RIPs hv reports.
        if self.kernel is not None:
            if config.ram > MAX_KERNEL_RAM:
                raise HvError(f"a kernel gets at most {format_size(MAX_KERNEL_RAM)} of RAM "
                              "(hv models no RAM above the PC's hole below 4 GiB)")
            if config.paging_levels != 4:
                raise HvError("--paging-levels is the boot ABI's: a multiboot kernel starts "
                              "with paging off and chooses its own (CR4.LA57)")
            boot_info = loader.build_boot_info(self.kernel, config.ram,
                                               f"{name} {config.append}".strip(), modules)
            self.symbols = asm.Symbols(self.kernel.symbols, self.kernel.segments[0].paddr,
                                       self.kernel.end)
        else:
            self.symbols = asm.Symbols(symbols or {}, LOAD_ADDR, LOAD_ADDR + len(image))
        self.machine = machine if machine is not None else Machine(config)
        self.index = len(self.machine.vms)
        if self.index >= MAX_VMS:
            raise HvError(f"a machine runs at most {MAX_VMS} VMs")
        cpus = len(self.machine.tlbs)
        if config.vcpus > cpus:
            # vCPU j runs on physical CPU j (Machine).
            raise HvError(f"a VM of {config.vcpus} vCPUs on a machine of {cpus} physical CPUs "
                          f"(give its Config vcpus={config.vcpus})")
        self.machine.vms.append(self)
        # The VPID: 0 is the host's; without tags every VM shares it.
        self.asid = self.index + 1 if config.asid else 0
        self.mode = MODES[config.mmu]
        self.profile = load_profile(config.profile)
        if self.kernel is None and LOAD_ADDR + len(image) > config.ram:
            raise HvError(f"a guest of {len(image)} bytes does not fit in "
                          f"{format_size(config.ram)} of RAM at {LOAD_ADDR:#x}")
        # Guest RAM placed in host memory, and the VM's MMU state (shadow
        # pages, EPT), as the mode has them.
        self.guest, self.mmu = self.mode.memory(config)
        # Host-physical memory: what the engines map and the VMM addresses
        # with the host-physical addresses its MMU hands out.
        self.mem = self.guest.host
        if self.kernel is not None:
            self._load_kernel(boot_info)
        else:
            self.guest.write(LOAD_ADDR, image)
            self._build_boot_tables()
        # The platform: the CPU model, the port devices, the local APICs'
        # page (where RAM leaves room for it).
        self.cpu = CpuModel(parse_cpu(config.cpu), config.vcpus)
        self.ports = pc_platform(self, cpus=config.vcpus, ram=config.ram, ghz=self.profile.ghz)
        self.apic_hpa = (self.guest.add_device(APIC_DEFAULT_BASE)
                         if config.ram <= APIC_DEFAULT_BASE else None)
        self.engines: list = []         # every vCPU's (VCpu adds its own)
        # Walk results replayed until a table they read is written.
        self.memo = WalkMemo(self.engines) if config.memo and self.mode.tlb_model else None
        # The frames any vCPU fetched code from, and who may write them.
        self.code = CodeFrames(self.engines)
        self.vcpus: list[VCpu] = []
        self.mem.on_write = self._vmm_wrote
        self.console = bytearray()
        self.on_console = on_console    # called with each byte the guest prints
        self.marks: dict[int, dict[str, int]] = {}
        self.ended = False
        self.reason = self.detail = ""
        self.exit_code: int | None = None
        self.budget = config.max_insns      # instructions left (--max-insns)
        self.vcpus.extend(VCpu(self, i) for i in range(config.vcpus))
        for cpu in self.vcpus:
            if self.kernel is None:
                self._boot(cpu)
            elif cpu.index == 0:
                self._boot_kernel(cpu, boot_info.mbi_addr)
            else:
                cpu.wait_for_sipi()

    def _load_kernel(self, boot_info) -> None:
        """The kernel's segments (RAM is fresh, zeroed: BSS needs no
        writing), its boot information, and the GDT it is entered with."""
        for seg in self.kernel.segments:
            self.guest.write(seg.paddr, seg.data)
        for addr, data in boot_info.blobs:
            self.guest.write(addr, data)
        for addr, data, what in ((GDT_ADDR, struct.pack(f"<{len(GDT32)}Q", *GDT32),
                                  "the GDT it enters kernels with"),
                                 (acpi.RSDP_ADDR, acpi.tables(), "the ACPI tables")):
            if any(seg.paddr < addr + len(data) and addr < seg.paddr + seg.memsz
                   for seg in self.kernel.segments):
                raise HvError(f"{self.name} loads over {addr:#x}, where hv puts {what}")
            self.guest.write(addr, data)

    def _boot_kernel(self, cpu: VCpu, mbi: int) -> None:
        """The machine state a multiboot loader leaves (this module's docstring)."""
        e = cpu.engine
        e.set_gdtr(GDT_ADDR, 8 * len(GDT32) - 1)
        e.leave_long_mode()
        e.set_reg("cr3", 0)
        cpu.mmu.boot(KERNEL_CR0, 0, 0, 0)
        e.load_segments(CODE_SEL, DATA_SEL, struct.pack(f"<{len(GDT32)}Q", *GDT32))
        e.set_reg("rflags", RFLAGS.FIXED)
        e.set_reg("rax", loader.MULTIBOOT_BOOT_MAGIC)
        e.set_reg("rbx", mbi)
        e.set_reg("rip", self.kernel.entry)

    def _build_boot_tables(self) -> None:
        m = self.guest
        m.write(GDT_ADDR, struct.pack("<QQQ", 0, GDT_CODE64, GDT_DATA))
        npd = -(-self.config.ram // GiB)
        m.write_u64(PML4_ADDR, PDPT_ADDR | P | RW)
        for i in range(npd):
            m.write_u64(PDPT_ADDR + 8 * i, (PD_ADDR + i * 0x1000) | P | RW)
        for page in range(self.config.ram >> 21):
            m.write_u64(PD_ADDR + 8 * page, (page << 21) | P | RW | PS)
        if self.config.paging_levels == 5:
            m.write_u64(PML5_ADDR, PML4_ADDR | P | RW)

    def _boot(self, cpu: VCpu) -> None:
        e = cpu.engine
        e.set_gdtr(GDT_ADDR, 3 * 8 - 1)
        e.set_msr(MSR_EFER, BOOT_EFER)
        cr3, cr4 = (PML5_ADDR, BOOT_CR4 | int(CR4.LA57)) if self.config.paging_levels == 5 else (
            PML4_ADDR, BOOT_CR4)
        e.set_reg("cr4", cr4)
        e.set_reg("cr3", cr3)
        e.set_reg("cr0", BOOT_CR0)
        cpu.mmu.boot(BOOT_CR0, cr3, cr4, BOOT_EFER)
        e.set_reg("cs", CODE_SEL)
        for seg in ("ss", "ds", "es"):
            e.set_reg(seg, DATA_SEL)
        e.set_reg("rflags", RFLAGS.FIXED)
        e.set_reg("rsp", STACK_TOP - cpu.index * STACK_SIZE)
        e.set_reg("rdi", cpu.index)
        e.set_reg("rsi", self.config.vcpus)
        e.set_reg("rip", LOAD_ADDR)

    def _vmm_wrote(self, addr: int, length: int = 8) -> None:
        """The VMM wrote host memory [addr, addr+length) (PhysMem.on_write).
        Code there is stale in every engine (QEMU sees only guest stores);
        under `qemu` no fetch is seen, so any write may be to code."""
        if self.memo is not None:
            self.memo.written(addr, length)
        if not self.mode.tlb_model:
            for cpu in self.vcpus:
                cpu.engine.invalidate_code(addr, length)
        elif self.code.frames:
            for frame in range(addr & ~0xFFF, addr + length, 0x1000):
                if frame in self.code.frames:
                    self.code.written(frame, addr, length)

    # -- events from vCPUs ---------------------------------------------------
    def finish(self, reason: str, detail: str, exit_code: int | None = None) -> None:
        if not self.ended:
            self.ended, self.reason, self.detail, self.exit_code = True, reason, detail, exit_code

    def send_ipi(self, ipi: lapic.Ipi) -> None:
        """An ICR write of a vCPU's APIC, delivered to its destinations (by
        physical APIC ID = vCPU index, or a shorthand)."""
        targets = {lapic.SH_SELF: lambda c: c.index == ipi.source,
                   lapic.SH_ALL: lambda c: True,
                   lapic.SH_OTHERS: lambda c: c.index != ipi.source}.get(
            ipi.shorthand, lambda c: ipi.dest in (c.index, 0xFF))
        for cpu in filter(targets, self.vcpus):
            if ipi.mode in (lapic.DM_FIXED, lapic.DM_LOWEST):
                cpu.apic.accept(ipi.vector)     # taken at its next VM entry
            elif ipi.mode == lapic.DM_INIT:
                cpu.apic.reset()
                cpu.wait_for_sipi()
            elif ipi.mode == lapic.DM_STARTUP:
                cpu.start_up(ipi.vector)

    def console_write(self, byte: int) -> None:
        """A byte the guest printed: kept up to MAX_CONSOLE bytes (then
        counted in console_dropped), always passed to on_console."""
        if len(self.console) < MAX_CONSOLE:
            self.console.append(byte)
        else:
            self.vcpus[0].stats.counters["console_dropped"] += 1
        if self.on_console is not None:
            self.on_console(byte)

    def clock(self) -> int:
        """The time of the vCPU running now, as the chipset's timers see it."""
        return self.machine.current.clock()

    def mark(self, ident: int, vcpu: VCpu) -> bool:
        """Hypercall MARK from `vcpu`, mid-slice: its instructions so far
        count. False (nothing recorded) for a new id beyond MAX_MARKS."""
        if ident not in self.marks and len(self.marks) >= MAX_MARKS:
            return False
        snap = self.totals().snapshot()
        snap["insns"] += vcpu.engine.started()
        self.marks[ident] = snap
        return True

    def totals(self) -> Stats:
        """The counters of all vCPUs added up."""
        total = Stats()
        for cpu in self.vcpus:
            total.add(cpu.stats)
        return total

    def run(self) -> None:
        """Run this VM's machine until every VM on it has ended."""
        self.machine.run()

    def check_invariants(self) -> None:
        """Isolation (--check-invariants): every TLB entry of this VM maps its
        own guest memory or one of its device pages; its shadow or EPT tables
        keep their invariants. (Each VM has its own host memory, which only
        its engines map, so no translation of one VM can reach another's.)
        Raises InvariantError."""
        if self.mode.tlb_model:
            devices = set(self.guest.devices.values())
            for cpu in self.vcpus:
                for tr in cpu.hw.tlb.held(self.asid):
                    if not (self.guest.owns(tr.pbase, 1 << tr.shift)
                            or tr.shift == 12 and tr.pbase in devices):
                        raise InvariantError(f"a TLB entry maps {tr.vbase:#x} to host "
                                             f"{tr.pbase:#x}, outside the VM's memory")
        self.mode.check(self)

    def run_slice(self, cpu: VCpu) -> int:
        """One quantum of `cpu`: the cycles it took on its clock, which the
        halted vCPUs' clocks run on by (0 if none is halted); the VM ends on
        a runaway, escape or error."""
        if self.budget <= 0:
            self.finish("max_insns", f"the guest ran {self.config.max_insns} instructions "
                        "(--max-insns)")
            return 0
        try:
            start = cpu.clock() if any(c.halted for c in self.vcpus) else None
            cpu.enter()
            budget = cpu.take_interrupt(min(self.config.quantum, self.budget))
            # A slice that only delivers faults runs no instruction; it still
            # spends budget, so a fault loop ends too.
            self.budget -= max(1, cpu.run(budget))
            return 0 if start is None else cpu.clock() - start
        except GuestEscape as e:
            self.finish("escape", str(e))
        except EngineError as e:
            # With Unicorn's own MMU (mode qemu) a guest mapping beyond its
            # RAM ends here: Unicorn refuses the unmapped physical access.
            self.finish("escape" if "UNMAPPED" in str(e) else "error", str(e))
        except InvariantError as e:
            self.finish("invariant", f"hv bug: {e}")
        return 0

    def runnable(self) -> list[VCpu]:
        """The vCPUs that run this round: those not halted, and the halted
        ones an interrupt wakes."""
        for cpu in self.vcpus:
            if cpu.halted and cpu.can_wake():
                cpu.halted = False
        return [cpu for cpu in self.vcpus if not cpu.halted]

    def pass_time(self, cycles: int, cpus: list[VCpu] | None = None) -> None:
        """Halted vCPUs' clocks (those of `cpus`, default all halted now) run
        on while others ran `cycles`."""
        for cpu in self.vcpus if cpus is None else cpus:
            if cpu.halted:
                cpu.idle += cycles

    def sleep_to_timer(self) -> bool:
        """Every vCPU is halted: skip to the first APIC timer deadline that
        would wake one, if any."""
        waits = [d - cpu.clock() for cpu in self.vcpus
                 if (d := cpu.timer_deadline()) is not None]
        if not waits:
            return False
        self.pass_time(max(0, min(waits)))
        return True


class Machine:
    """The physical machine: physical CPU j runs vCPU j of every VM and has
    one TLB model that those vCPUs share, tagged by VM (VPID) unless
    `config.asid` is off. VMs and vCPUs run round-robin in instruction
    quanta, deterministically."""

    def __init__(self, config: Config):
        config.check()
        self.config = config
        self.tlbs = [TLB(config.tlb_entries, config.tlb_ways) for _ in range(config.vcpus)]
        if config.pwc:
            for tlb in self.tlbs:
                tlb.walk_cache = WalkCache()
        self.vms: list[VM] = []
        self.interrupted = ""           # the signal that interrupted the run: Ctrl-C, SIGTERM
        self.current: VCpu | None = None   # the vCPU of the current slice

    def run(self) -> None:
        """Run until every VM ended. Ctrl-C or --timeout end the VMs still
        running, with what they counted so far."""
        deadline = time.monotonic() + self.config.timeout if self.config.timeout else None
        previous = self._catch_signals()
        try:
            self._schedule(deadline)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _catch_signals(self) -> dict:
        """Handle Ctrl-C (and SIGTERM, where the CLI makes it one) while the
        machine runs: the KeyboardInterrupt of Python's handler may be
        raised in a ctypes callback (a TLB fill), which swallows it. Not
        over SIG_IGN or SIG_DFL, and not outside the main thread
        (signal.signal refuses). The handlers to restore, by signal."""
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if not callable(handler) or (signum == signal.SIGTERM
                                         and handler is not signal.default_int_handler):
                continue        # SIGTERM is Ctrl-C only where the CLI made it so
            try:
                signal.signal(signum, self._interrupt)
            except ValueError:
                break
            previous[signum] = handler
        return previous

    def _interrupt(self, signum, frame) -> None:
        """Recorded, and the running slice stopped; the scheduler ends the
        VMs before the next slice. Raises nothing (see _catch_signals)."""
        self.interrupted = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.current is not None:
            self.current.interrupt(frame)

    def _stop_all(self, reason: str, detail: str) -> None:
        for vm in self.vms:
            vm.finish(reason, detail)

    def _schedule(self, deadline: float | None) -> None:
        while True:
            live = [vm for vm in self.vms if not vm.ended]
            if not live:
                return
            if deadline is not None and time.monotonic() > deadline:
                self._stop_all("timeout", f"still running after {self.config.timeout} s "
                               "(--timeout)")
                return
            for vm in live:
                runnable = vm.runnable()
                if not runnable:
                    if not vm.sleep_to_timer():
                        vm.finish("halted", "every vCPU ran HLT")
                    continue
                longest, idle = 0, [cpu for cpu in vm.vcpus if cpu.halted]
                for cpu in runnable:        # grows: a vCPU woken this round runs in it
                    if self.interrupted:
                        self._stop_all("interrupted", f"by {self.interrupted}")
                        return
                    if vm.ended or cpu.halted:
                        continue
                    self.current = cpu
                    took = vm.run_slice(cpu)
                    longest = max(longest, took)
                    for woken in [c for c in idle if not c.halted or c.can_wake()]:
                        # An IPI woke it (a start-up IPI, `VCpu.start_up`, already
                        # did): it slept through this slice, and runs next.
                        vm.pass_time(took, [woken])
                        idle.remove(woken)
                        woken.halted = False
                        runnable.append(woken)
                vm.pass_time(longest, idle)
