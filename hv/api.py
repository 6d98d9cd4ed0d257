"""The Python API: hv.run(guest, mmu=..., ...) -> Result."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from . import asm
from .errors import HvError
from .memory import parse_size
from .hw.walker import LEVEL_NAMES
from .paths import bundled_guests
from .stats import TLB_NAMES
from .stats import Stats
from .vmm.exits import Trace
from .vmm.modes import MODES
from .vmm.vm import MAX_VMS, VM, Config, Machine


@dataclass
class Result:
    """What a run produced. Every field is plain data (JSON-ready)."""
    guest: str
    mmu: str
    exit_code: int | None
    reason: str             # why the VM ended: exit, halted, triple_fault, max_insns, escape
    detail: str             # the same in a sentence
    console: str
    exits: dict[str, int]
    counters: dict[str, int]
    tlb: dict
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

    def between(self, a: int, b: int) -> dict[str, int]:
        """Counter differences from mark `a` to mark `b` (only non-zero ones)."""
        for m in (a, b):
            if m not in self.marks:
                raise KeyError(f"no mark {m} (the guest recorded {sorted(self.marks)})")
        ma, mb = self.marks[a], self.marks[b]
        diff = {k: mb.get(k, 0) - ma.get(k, 0) for k in sorted(set(ma) | set(mb))}
        return {k: v for k, v in diff.items() if v}

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["marks"] = {str(k): v for k, v in sorted(self.marks.items())}
        d["vms"] = [dict(vm, marks={str(k): v for k, v in sorted(vm["marks"].items())})
                    for vm in self.vms]
        return d


def load_guest(guest: str | Path) -> tuple[str, bytes]:
    """A path to a .s or .bin file, or the name of a bundled guest -> (name, image)."""
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
    if path.suffix == ".s":
        return path.stem, asm.assemble_file(path).code
    try:
        return path.stem, path.read_bytes()
    except OSError as e:
        raise HvError(f"cannot read {path}: {e.strerror}") from None


def _load_with_symbols(guest: str | Path) -> tuple[str, bytes, dict[str, int]]:
    """load_guest, and the labels of a .s guest (a .bin has none)."""
    name, code = load_guest(guest)
    path = Path(guest) if Path(guest).exists() else bundled_guests().get(str(guest))
    return name, code, asm.assemble_file(path).symbols if path.suffix == ".s" else {}


def run(guest: str | Path | list, mmu: str = "native", *, ram: int | str = "64M",
        image: bytes | None = None, symbols: dict[str, int] | None = None, on_console=None,
        vms: int = 1, trace=None, **options) -> Result:
    """Boot `guest` (a path or bundled name, a list of them for one VM each,
    or `image` bytes, with the `symbols` of its source if it has one) and run
    it to the end.

    `vms` runs that many VMs (the guests repeated) on one machine.
    `options` are the fields of hv.vmm.vm.Config: vcpus, tlb_entries,
    tlb_ways, max_insns, quantum, ept_large_pages, asid, pwc,
    check_invariants (the CLI's --check), timeout, memo (False: --no-memo).
    `on_console(vm, byte)` sees each byte a guest prints, as it is printed.
    `trace` sees every exit: a callable gets each as a dict, a text file
    gets each as a line, and a hv.vmm.exits.Trace picks the reasons.
    """
    if image is not None:
        guests = [(str(guest), image, symbols or {})]
    else:
        guests = [_load_with_symbols(g) for g in (guest if isinstance(guest, list) else [guest])]
    if trace is not None and not isinstance(trace, Trace):
        trace = Trace(trace)
    if not 1 <= vms <= MAX_VMS:
        raise HvError(f"--vms must be from 1 to {MAX_VMS}, not {vms}")
    unknown = set(options) - {f.name for f in fields(Config)}
    if unknown:
        raise HvError(f"unknown option {', '.join(sorted(unknown))} (options: "
                      f"{', '.join(f.name for f in fields(Config) if f.name != 'mmu')})")
    config = Config(mmu=mmu, ram=parse_size(ram) if isinstance(ram, str) else ram, trace=trace,
                    **options)
    machine = Machine(config)
    for i in range(max(vms, len(guests))):
        name, img, syms = guests[i % len(guests)]
        echo = None if on_console is None else (lambda b, i=i: on_console(i, b))
        VM(img, config, echo, machine=machine, name=name, symbols=syms)
    machine.run()
    return machine_result(machine)


def _figures(total: Stats, mode: str) -> tuple[dict, dict, dict]:
    """(exits, counters, tlb) of some counters, in the report's form."""
    snap = total.snapshot()
    counters = {k: v for k, v in snap.items() if not k.startswith(("tlb.", "exit."))}
    tlb = {n: snap[f"tlb.{n}"] for n in TLB_NAMES}
    tlb["walk_refs_hist"] = {str(k): v for k, v in sorted(total.walk_hist.items())}
    # "guest.PML4", "ept.PT", ...: by dimension (whose tables), then level.
    tlb["walk_refs_by_level"] = {f"{dim}.{LEVEL_NAMES[lv]}": n for (dim, lv), n in
                                 sorted(total.refs_by_tag.items(), key=lambda t: (t[0][0], -t[0][1]))}
    if not MODES[mode].tlb_model:
        tlb = {"modelled": False}
    return {r.name: n for r, n in sorted(total.exits.items())}, counters, tlb


def make_result(name: str, vm: VM) -> Result:
    exits, counters, tlb = _figures(vm.totals(), vm.mode.name)
    vcpus = []
    for cpu in vm.vcpus:
        e, c, t = _figures(cpu.stats, vm.mode.name)
        rip = cpu.engine.reg("rip")
        vcpus.append({"index": cpu.index, "exits": e, "counters": c, "tlb": t,
                      "halted": cpu.halted, "rip": rip, "where": vm.symbols.name(rip)})
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
