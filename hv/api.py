"""The Python API: hv.run(guest, mmu=..., ...) -> Result."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from . import asm
from .errors import HvError
from .memory import parse_size
from .mmu.walker import LEVEL_NAMES
from .paths import bundled_guests
from .stats import TLB_NAMES
from .vm import VM, Config


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

    @property
    def ok(self) -> bool:
        """The guest ended by itself: exit code 0, or every vCPU halted."""
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


def run(guest: str | Path, mmu: str = "native", *, ram: int | str = "64M",
        image: bytes | None = None, on_console=None, **options) -> Result:
    """Boot `guest` (path or bundled name; or `image` bytes) and run it to the end.

    `options` are the fields of hv.vm.Config (vcpus, tlb_entries, tlb_ways,
    max_insns, quantum, ept_large_pages). `on_console(byte)` sees the guest's
    console output as it is written.
    """
    if image is None:
        name, image = load_guest(guest)
    else:
        name = str(guest)
    unknown = set(options) - {f.name for f in fields(Config)}
    if unknown:
        raise HvError(f"unknown option {', '.join(sorted(unknown))} (options: "
                      f"{', '.join(f.name for f in fields(Config) if f.name != 'mmu')})")
    config = Config(mmu=mmu, ram=parse_size(ram) if isinstance(ram, str) else ram, **options)
    vm = VM(image, config, on_console)
    vm.run()
    return make_result(name, vm)


def make_result(name: str, vm: VM) -> Result:
    total = vm.totals()
    snap = total.snapshot()
    counters = {k: v for k, v in snap.items() if not k.startswith(("tlb.", "exit."))}
    tlb = {n: snap[f"tlb.{n}"] for n in TLB_NAMES}
    tlb["walk_refs_hist"] = {str(k): v for k, v in sorted(total.walk_hist.items())}
    # "guest.PML4", "ept.PT", ...: by dimension (whose tables), then level.
    tlb["walk_refs_by_level"] = {f"{dim}.{LEVEL_NAMES[lv]}": n for (dim, lv), n in
                                 sorted(total.refs_by_tag.items(), key=lambda t: (t[0][0], -t[0][1]))}
    if vm.mmu_mode == "qemu":
        tlb = {"modelled": False}
    c = vm.config
    return Result(
        guest=name, mmu=vm.mmu_mode, exit_code=vm.exit_code, reason=vm.reason, detail=vm.detail,
        console=vm.console.decode("utf-8", "replace"),
        exits={r.name: n for r, n in sorted(total.exits.items())},
        counters=counters, tlb=tlb, marks=dict(vm.marks),
        config={f.name: getattr(c, f.name) for f in fields(c)})
