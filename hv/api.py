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
        image = path.read_bytes()
    except OSError as e:
        raise HvError(f"cannot read {path}: {e.strerror}") from None
    check_image(image, str(path))
    return path.stem, image


def check_image(image: bytes, what: str) -> None:
    """Refuse what is no flat image, saying what it is: run, it would fall
    through zeroed RAM to a triple fault."""
    if not image:
        raise HvError(f"{what} is empty: there is nothing to run")
    if image.startswith(b"\x7fELF"):
        raise HvError(f"{what} is an ELF file: hv runs flat images (.bin) and .s sources")
    try:
        text = image.decode()
    except UnicodeDecodeError:
        return
    if all(c.isprintable() or c.isspace() for c in text):
        raise HvError(f"{what} is text, not a flat image: hv assembles sources named .s "
                      "(Intel syntax, no preprocessor)")


def run(guest: str | Path | list, mmu: str = "native", *, ram: int | str = "64M",
        image: bytes | None = None, on_console=None, vms: int = 1, **options) -> Result:
    """Boot `guest` (a path or bundled name, a list of them for one VM each,
    or `image` bytes) and run it to the end.

    `vms` runs that many VMs (the guests repeated) on one machine.
    `options` are the fields of hv.vmm.vm.Config: vcpus, tlb_entries,
    tlb_ways, max_insns, quantum, ept_large_pages, asid, pwc,
    check_invariants (the CLI's --check), timeout, memo (False: --no-memo).
    `on_console(vm, byte)` sees each byte a guest prints, as it is printed.
    """
    if image is not None:
        check_image(image, f"the image of {str(guest)!r}")
        guests = [(str(guest), image)]
    else:
        guests = [load_guest(g) for g in (guest if isinstance(guest, list) else [guest])]
    if not 1 <= vms <= MAX_VMS:
        raise HvError(f"--vms must be from 1 to {MAX_VMS}, not {vms}")
    unknown = set(options) - {f.name for f in fields(Config)}
    if unknown:
        raise HvError(f"unknown option {', '.join(sorted(unknown))} (options: "
                      f"{', '.join(f.name for f in fields(Config) if f.name != 'mmu')})")
    config = Config(mmu=mmu, ram=parse_size(ram) if isinstance(ram, str) else ram, **options)
    machine = Machine(config)
    for i in range(max(vms, len(guests))):
        name, img = guests[i % len(guests)]
        echo = None if on_console is None else (lambda b, i=i: on_console(i, b))
        VM(img, config, echo, machine=machine, name=name)
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
        vcpus.append({"index": cpu.index, "exits": e, "counters": c, "tlb": t})
    c = vm.config
    return Result(
        guest=name, mmu=vm.mode.name, exit_code=vm.exit_code, reason=vm.reason, detail=vm.detail,
        console=vm.console.decode("utf-8", "replace"), exits=exits, counters=counters, tlb=tlb,
        marks=dict(vm.marks), config={f.name: getattr(c, f.name) for f in fields(c)},
        vcpus=vcpus)


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
        counters=counters, tlb=tlb, marks=first.marks, config=first.config,
        vms=[{k: v for k, v in r.__dict__.items() if k != "vms"} for r in results])
