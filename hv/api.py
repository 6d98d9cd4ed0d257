"""The Python API: hv.run(guest, mmu=..., ...) -> Result."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from . import asm, loader
from .errors import HvError
from .memory import parse_size
from .hw.walker import LEVEL_NAMES
from .paths import bundled_guests
from .arch.vmx import ExitReason
from .stats import COUNTER_NAMES, OTHER_COUNTERS, TLB_NAMES, Stats
from .vmm.exits import Trace
from .vmm.modes import MODES
from .vmm.vm import MAX_VMS, VM, Config, Machine


class Counts(dict):
    """{name: count}, as JSON has it, that reads 0 for a name it knows but
    never counted (an exit reason, a counter) and KeyError for any other."""
    known: frozenset[str] = frozenset()
    what = "name"

    def __missing__(self, name):
        if name in self.known:
            return 0
        raise KeyError(f"no {self.what} {name!r}")


class Exits(Counts):
    known = frozenset(ExitReason.__members__)
    what = "exit reason"


class Counters(Counts):
    known = frozenset(COUNTER_NAMES + OTHER_COUNTERS)
    what = "counter"


class Figures:
    """What a whole run (Result) and a window of it (Window) both have:
    `exits` {reason: count}, `counters` {name: count}, `tlb` {figure: value}."""
    exits: Exits
    counters: Counters
    tlb: dict

    def flat(self) -> dict[str, int]:
        """Every count as one flat dict, the form marks record (insns,
        exit.<REASON>, tlb.walk_refs, ...): what hv.cost prices."""
        flat = dict(self.counters)
        flat.update((f"exit.{k}", n) for k, n in self.exits.items())
        flat.update((f"tlb.{k}", self.tlb[k]) for k in TLB_NAMES if k in self.tlb)
        return dict(sorted(flat.items()))


def _split(flat: dict[str, int], mode: str) -> tuple[Exits, Counters, dict]:
    """A flat dict of counts (a mark's form) -> (exits, counters, tlb)."""
    exits = Exits(sorted(((k[5:], n) for k, n in flat.items() if k.startswith("exit.")),
                         key=lambda kv: ExitReason[kv[0]]))       # by the SDM's number
    counters = Counters((k, n) for k, n in flat.items() if not k.startswith(("tlb.", "exit.")))
    tlb = ({n: flat.get(f"tlb.{n}", 0) for n in TLB_NAMES} if MODES[mode].tlb_model
           else {"modelled": False})
    return exits, counters, tlb


@dataclass
class Window(Figures):
    """What happened from mark `start` to mark `end` (Result.between): a
    Result's `exits` (those that occurred), `counters` and `tlb` (its
    counts; the walk histograms are the whole run's only)."""
    start: int
    end: int
    exits: Exits
    counters: Counters
    tlb: dict

    def __getitem__(self, name: str) -> int:
        """A count by its flat name (exit.CR_ACCESS, tlb.walks, pf_guest),
        the form between() returned before it had a Result's shape."""
        if name.startswith("exit."):
            return self.exits[name[5:]]
        if name.startswith("tlb."):
            return self.tlb[name[4:]]
        return self.counters[name]

    __iter__ = None     # not a dict: `name in window` would look a count up by 0, 1, ...


@dataclass
class Result(Figures):
    """What a run produced. Every field is plain data (JSON-ready); `exits`
    and `counters` read 0 for a reason or counter that never counted."""
    guest: str
    mmu: str
    exit_code: int | None
    reason: str             # why the VM ended: exit, halted, triple_fault, max_insns, escape
    detail: str             # the same in a sentence
    console: str
    exits: Exits
    counters: Counters
    tlb: dict               # walk_refs_hist: {references per walk: walks}
    marks: dict[int, dict[str, int]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    vcpus: list[dict] = field(default_factory=list)     # per vCPU: exits, counters, tlb
    vms: list[dict] = field(default_factory=list)       # with several VMs: each VM's result
    crash: dict | None = None   # a triple fault: vm, vcpu, rip, where, insn, chain, registers

    @property
    def ok(self) -> bool:
        """The guest ended by itself: exit code 0, or every vCPU halted (with
        several VMs: every VM did)."""
        if self.vms:
            return all(Result(**vm).ok for vm in self.vms)
        return (self.reason == "exit" and self.exit_code == 0) or self.reason == "halted"

    def between(self, a: int, b: int) -> Window:
        """What happened from mark `a` to mark `b`, shaped like a Result
        (`exits`, `counters`, `tlb`). HvError if the guest did not record
        both, or recorded `b` before `a`."""
        for m in (a, b):
            if m not in self.marks:
                raise HvError(f"{self.guest} ({self.mmu}) recorded no mark {m} "
                              f"(its marks: {', '.join(map(str, sorted(self.marks))) or 'none'})")
        ma, mb = self.marks[a], self.marks[b]
        # A VM's instruction count only grows, and a mark counts its vmcall.
        if mb["insns"] < ma["insns"]:
            raise HvError(f"{self.guest} ({self.mmu}) recorded mark {b} before mark {a}: "
                          f"a window runs from the earlier mark to the later")
        exits, counters, tlb = _split({k: mb.get(k, 0) - ma.get(k, 0)
                                       for k in sorted(set(ma) | set(mb))}, self.mmu)
        return Window(a, b, Exits((k, n) for k, n in exits.items() if n), counters, tlb)

    def to_json(self) -> dict:
        return _json(self.__dict__)


def _json(result: dict) -> dict:
    """A result's fields as JSON has them: mark ids and references per walk
    are strings there."""
    def tlb(t: dict) -> dict:
        if "walk_refs_hist" not in t:
            return t
        return dict(t, walk_refs_hist={str(k): n for k, n in t["walk_refs_hist"].items()})

    d = dict(result, tlb=tlb(result["tlb"]),
             marks={str(k): v for k, v in sorted(result["marks"].items())},
             vcpus=[dict(c, tlb=tlb(c["tlb"])) for c in result["vcpus"]])
    if "vms" in d:
        d["vms"] = [_json(vm) for vm in d["vms"]]
    return d


def load_guest(guest: str | Path) -> tuple[str, "bytes | loader.Kernel"]:
    """A path to a .s source, a flat image (.bin) or a multiboot kernel (an
    ELF, or a flat image with a multiboot header: hv.loader.load_flat), or
    the name of a bundled guest -> (name, image or Kernel)."""
    path = _guest_path(guest)
    if path.suffix == ".s":
        image = asm.assemble_file(path)
        return path.stem, flat_guest(image.code, str(path), image.symbols, image.base)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HvError(f"cannot read {path}: {e.strerror}") from None
    if loader.is_elf(data):
        return path.stem, loader.load_multiboot(data, str(path))
    check_image(data, str(path))
    return path.stem, flat_guest(data, str(path))


def flat_guest(image: bytes, what: str, symbols: dict[str, int] | None = None,
               base: int = asm.DEFAULT_BASE) -> "bytes | loader.Kernel":
    """A flat image as hv boots it: by the boot ABI (its bytes), or as a
    multiboot kernel if it has a multiboot header in its first 8 KiB (a
    Kernel; `symbols`, the labels of an image assembled at `base`, name
    its addresses if it is loaded there)."""
    kernel = loader.load_flat(image, what)
    if kernel is None:
        return image
    if symbols and kernel.segments[0].paddr == base:
        kernel = replace(kernel, symbols=dict(symbols))
    return kernel


def _guest_path(guest: str | Path) -> Path:
    path = Path(guest)
    if not path.exists():
        bundled = bundled_guests()
        if str(guest) in bundled:
            path = bundled[str(guest)]
        else:
            raise HvError(f"no guest {str(guest)!r}: not a file, nor a bundled guest "
                          f"({', '.join(bundled)})")
    if path.is_dir():
        raise HvError(f"{path} is a directory, not a guest")
    return path


def check_image(image: bytes, what: str) -> None:
    """Refuse what is no flat image, saying what it is: run, it would fall
    through zeroed RAM to a triple fault."""
    if not image:
        raise HvError(f"{what} is empty: there is nothing to run")
    if loader.is_elf(image):
        raise HvError(f"{what} is an ELF file: hv boots those from a file (a multiboot "
                      "kernel), not as image bytes")
    try:
        text = image.decode()
    except UnicodeDecodeError:
        return
    if all(c.isprintable() or c.isspace() for c in text):
        raise HvError(f"{what} is text, not a flat image: hv assembles sources named .s "
                      "(Intel syntax, no preprocessor)")


def _load_with_symbols(guest: str | Path) -> tuple[str, "bytes | loader.Kernel", dict[str, int]]:
    """load_guest, and the labels of a .s guest (a .bin has none; a
    kernel's are in its Kernel)."""
    name, code = load_guest(guest)
    path = _guest_path(guest)
    return name, code, asm.assemble_file(path).symbols if path.suffix == ".s" else {}


def _modules(paths) -> list[tuple[str, bytes]]:
    """--module files -> (name, bytes) each, for a kernel's boot information."""
    out = []
    for p in paths:
        try:
            out.append((str(p), Path(p).read_bytes()))
        except OSError as e:
            raise HvError(f"cannot read module {p}: {e.strerror}") from None
    return out


def run(guest: str | Path | list, mmu: str = "native", *, ram: int | str = "64M",
        vcpus: int = Config.vcpus, vms: int = 1, tlb_entries: int = Config.tlb_entries,
        tlb_ways: int = Config.tlb_ways, max_insns: int = Config.max_insns,
        quantum: int = Config.quantum, ept_large_pages: bool = Config.ept_large_pages,
        ept_levels: int = Config.ept_levels, paging_levels: int = Config.paging_levels,
        asid: bool = Config.asid, pwc: bool = Config.pwc,
        check_invariants: bool = Config.check_invariants, timeout: float = Config.timeout,
        memo: bool = Config.memo, agile_policy: str = Config.agile_policy,
        cpu: str = Config.cpu, append: str = Config.append, modules=(),
        profile: str = Config.profile,
        image: bytes | None = None, symbols: dict[str, int] | None = None, on_console=None,
        trace=None) -> Result:
    """Boot `guest` (a path or bundled name, a list of them for one VM each,
    or `image` bytes, with the `symbols` of its source if it has one) in MMU
    mode `mmu` and run it to the end.

    Each option is the `hv run` option of the same name (tlb_entries is
    --tlb-entries; one that is on by default is turned off by --no-...):

    ram               guest RAM: bytes, or a size such as "64M" or "1G"
    vcpus             vCPUs of each VM
    vms               VMs on the machine (the guests repeated)
    tlb_entries       the TLB model's capacity, and tlb_ways its associativity
    max_insns         stop the VM after this many instructions (reason max_insns)
    quantum           instructions per vCPU time slice
    ept_large_pages   the host backs guest memory with large pages: EPT maps 2 MiB
                      and 1 GiB pages where it can, shadow tables 2 MiB pages
                      where the guest has them and keeps no page table there
    ept_levels        EPT's levels: 4, or 5 (5-level EPT)
    paging_levels     the boot ABI's paging: 4, or 5 (5-level paging: CR4.LA57
                      and a PML5 at 0x50000; the CPU must have la57)
    asid              tag TLB entries with the VM's VPID (False: every VM entry
                      and exit flushes the TLB)
    pwc               page-walk caches and a nested TLB
    check_invariants  check the VMM's isolation invariants after every exit (slow)
    timeout           stop after this many wall-clock seconds (0: no limit)
    memo              replay walks whose tables did not change (False: walk every
                      TLB miss in full; slower, the counts are the same)
    agile_policy      agile: "dynamic" (nested until the 2-D walks have cost
                      `rent` references more than shadow walks would, then shadowed
                      but for the subtrees the guest writes; knobs: "dynamic:writes=2,
                      cr3=2,pcid=1,window=1048576,trial=8,rent=2048"),
                      "whole" (the whole VM instead: `--mmu adaptive`; the same knobs),
                      "shadow" (never: `shadow`'s counts), "nested" (everything:
                      `ept`'s counts); README, "Agile paging"
    cpu               the CPU's features in QEMU's -cpu spelling: "max", "+pdpe1gb",
                      "-rdtscp" (README, "Booting real kernels")
    append            a multiboot kernel's command line after its name
    profile           the CPU profile (hv.cost) whose modelled cycles the guest's
                      TSC and APIC timer count: a bundled name or a .toml path
    modules           paths of files given to a multiboot kernel as its modules
    image             the guest's bytes, instead of loading `guest` (then a name); with
                      a multiboot header they are a kernel, as in a .bin
    on_console        on_console(vm, byte) sees each byte a guest prints, as printed
    trace             sees every exit: a callable gets each as a dict, a text file
                      gets each as a line, and a hv.vmm.exits.Trace picks the reasons
    """
    if image is not None:
        check_image(image, f"the image of {str(guest)!r}")
        guests = [(str(guest), flat_guest(image, f"the image of {str(guest)!r}", symbols),
                   symbols or {})]
    else:
        guests = [_load_with_symbols(g) for g in (guest if isinstance(guest, list) else [guest])]
    if trace is not None and not isinstance(trace, Trace):
        trace = Trace(trace)
    if not 1 <= vms <= MAX_VMS:
        raise HvError(f"--vms must be from 1 to {MAX_VMS}, not {vms}")
    config = Config(mmu=mmu, ram=parse_size(ram) if isinstance(ram, str) else ram, vcpus=vcpus,
                    tlb_entries=tlb_entries, tlb_ways=tlb_ways, max_insns=max_insns,
                    quantum=quantum, ept_large_pages=ept_large_pages, ept_levels=ept_levels,
                    paging_levels=paging_levels, asid=asid, pwc=pwc,
                    check_invariants=check_invariants, timeout=timeout, memo=memo,
                    agile_policy=agile_policy, cpu=cpu, append=append, profile=profile,
                    trace=trace)
    mods = _modules(modules)
    machine = Machine(config)
    for i in range(max(vms, len(guests))):
        name, img, syms = guests[i % len(guests)]
        echo = None if on_console is None else (lambda b, i=i: on_console(i, b))
        VM(img, config, echo, machine=machine, name=name, symbols=syms, modules=mods)
    machine.run()
    return machine_result(machine)


def _figures(total: Stats, mode: str) -> tuple[Exits, Counters, dict]:
    """(exits, counters, tlb) of some counters, in the report's form."""
    exits, counters, tlb = _split(total.snapshot(), mode)
    if MODES[mode].tlb_model:
        tlb["walk_refs_hist"] = dict(sorted(total.walk_hist.items()))
        # "guest.PML4", "ept.PT", ...: by dimension (whose tables), then level.
        tlb["walk_refs_by_level"] = {
            f"{dim}.{LEVEL_NAMES[lv]}": n for (dim, lv), n in
            sorted(total.refs_by_tag.items(), key=lambda t: (t[0][0], -t[0][1]))}
    return exits, counters, tlb


def make_result(name: str, vm: VM) -> Result:
    exits, counters, tlb = _figures(vm.totals(), vm.mode.name)
    vcpus = []
    for cpu in vm.vcpus:
        e, c, t = _figures(cpu.stats, vm.mode.name)
        rip = cpu.engine.reg("rip")
        vcpus.append({"index": cpu.index, "exits": e, "counters": c, "tlb": t,
                      "clock": cpu.clock(), "halted": cpu.halted, "rip": rip,
                      "where": vm.symbols.name(rip)})
    c = vm.config
    crash = next((cpu.crash for cpu in vm.vcpus if cpu.crash is not None), None)
    return Result(
        guest=name, mmu=vm.mode.name, exit_code=vm.exit_code, reason=vm.reason, detail=vm.detail,
        console=vm.console.decode("utf-8", "replace"), exits=exits, counters=counters, tlb=tlb,
        marks=dict(vm.marks),
        config={f.name: getattr(c, f.name) for f in fields(c) if f.name != "trace"},
        vcpus=vcpus, crash=crash)


def machine_result(machine: Machine) -> Result:
    """One VM: its result. Several: the machine's totals, the first VM that
    did not end well (or VM 0) for the guest's own fields, and `vms`."""
    results = [make_result(vm.name, vm) for vm in machine.vms]
    if len(results) == 1:
        return results[0]
    total = Stats()
    for vm in machine.vms:
        total.add(vm.totals())
    exits, counters, tlb = _figures(total, machine.config.mmu)
    first = next((r for r in results if not r.ok), results[0])
    return Result(
        guest=",".join(r.guest for r in results), mmu=first.mmu, exit_code=first.exit_code,
        reason=first.reason, detail=first.detail, console=first.console, exits=exits,
        counters=counters, tlb=tlb, marks=first.marks, config=first.config, crash=first.crash,
        vms=[{k: v for k, v in r.__dict__.items() if k != "vms"} for r in results])
