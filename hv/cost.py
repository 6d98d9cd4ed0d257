"""The cycle cost model: counts in, modelled cycles out.

    cycles = instructions x cpi                                    (guest work)
           + walk references x walk_ref + PWC hits x pwc_hit        (walks)
           + VM exits x (exit + handler) + VMM work                 (exits)

The exits priced are those memory virtualization causes; the guest's own
I/O, hypercalls and HLT exit alike in every virtualized mode and are left
out (UNPRICED_EXITS). A vCPU's own clock (CycleClock: its TSC and APIC
timer) uses the same weights with every exit priced.

A remote TLB flush (shadow paging, `remote_tlb_flush`) is priced as one
more exit, on the vCPU it kicks. VMM work is what an exit's handler does
beyond the simplest one: emulated
guest page-table writes (`mmu_pte_write`), shadow pages built
(`mmu_cache_miss`), agile paging's switches of a guest table or root
between shadow and nested (`agile.to_nested`, `agile.to_shadow`: each
priced as one shadow page built, an assumption: it rewrites the entries
that linked the table and zaps its shadow pages) and the VMM's own software
walks of guest tables (`vmm.guest_walk_refs`, priced like hardware walk
references).

Native runs have no VM exits: what hv counts there as IO or VMCALL "exits"
is an instruction on bare metal, already in `instructions`. Cycles add up
over every vCPU and VM (CPU time, not elapsed time).

The per-event costs come from a CPU profile, a TOML file (hv/profiles/, or
the user's own) whose every number cites its published source.
"""
from __future__ import annotations

import math
from operator import mul
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HvError
from .arch.vmx import ExitReason
from .vmm.modes import MODES

if sys.version_info >= (3, 11):
    import tomllib
else:                                   # pragma: no cover
    import tomli as tomllib

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
# The default: the first part with EPT and VPID, and the newest whose exit
# round trip was measured in the sources the profiles cite.
DEFAULT_PROFILE = "nehalem-2009"

# [cycles] keys: name -> what it prices (the README's profile reference).
CYCLE_KEYS = {
    "cpi": "cycles per guest instruction, walks and exits aside",
    "walk_ref": "one page-walk memory reference (a PTE or EPT entry read)",
    "pwc_hit": "one paging-structure-cache or nested-TLB hit (the references it skips are not counted)",
    "exit": "VM exit plus VM entry, the hardware world switch",
    "handler": "the VMM's work on the simplest exit (read the reason, dispatch, resume)",
    "pte_write": "emulating one guest page-table write (shadow), beyond the handler",
    "shadow_page": "building one shadow page table (shadow), or one switch of agile paging, "
                   "beyond the handler",
}
# The three parts of a run's cycles, in the order reports and plots show them.
PARTS = ("guest", "walks", "exits")


@dataclass(frozen=True)
class Profile:
    """A CPU's costs. `ept`/`vpid`: whether the part has them; without VPID
    every VM entry and exit flushes the TLB (hv runs with asid=False)."""
    name: str
    cpu: str
    year: int
    ept: bool
    vpid: bool
    cycles: dict[str, float] = field(default_factory=dict)
    path: str = ""
    ghz: float = 1.0        # the clock rate: what the ACPI PM timer runs against

    def to_json(self) -> dict:
        return dict(name=self.name, cpu=self.cpu, year=self.year, ept=self.ept,
                    vpid=self.vpid, ghz=self.ghz, cycles=dict(self.cycles), path=self.path)


def bundled_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.toml"))}


def load_profile(spec: str | Path) -> Profile:
    """A bundled profile's name or a path to a TOML file -> Profile."""
    path = Path(spec)
    if not path.exists():
        bundled = bundled_profiles()
        if str(spec) not in bundled:
            raise HvError(f"no profile {str(spec)!r}: not a file, nor a bundled profile "
                          f"({', '.join(bundled)})")
        path = bundled[str(spec)]
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise HvError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise HvError(f"{path}: {e}") from None

    def need(table: dict, key: str, kind, where: str):
        if key not in table:
            raise HvError(f"{path}: {where}{key} is missing")
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is float and value < 0):
            raise HvError(f"{path}: {where}{key} must be "
                          f"{'a number >= 0' if kind is float else kind.__name__}, not {value!r}")
        return value

    cycles = data.get("cycles")
    if not isinstance(cycles, dict):
        raise HvError(f"{path}: no [cycles] table")
    unknown = set(cycles) - set(CYCLE_KEYS)
    if unknown:
        raise HvError(f"{path}: unknown key cycles.{sorted(unknown)[0]} "
                      f"(keys: {', '.join(CYCLE_KEYS)})")
    return Profile(name=need(data, "name", str, ""), cpu=need(data, "cpu", str, ""),
                   year=need(data, "year", int, ""), ept=need(data, "ept", bool, ""),
                   vpid=need(data, "vpid", bool, ""),
                   cycles={k: need(cycles, k, float, "cycles.") for k in CYCLE_KEYS},
                   path=str(path),
                   ghz=_ghz(path, data))


def check_modes(profile: Profile, modes) -> None:
    """HvError unless the profile's CPU can run every one of `modes`."""
    lacking = [m for m in modes if MODES[m].needs_ept and not profile.ept]
    if lacking:
        raise HvError(f"profile {profile.name} ({profile.cpu}) has no EPT: --mmu "
                      f"{','.join(lacking)} cannot run on it")


def _ghz(path: Path, data: dict) -> float:
    ghz = data.get("ghz", Profile.ghz)
    if isinstance(ghz, bool) or not isinstance(ghz, (int, float)) or ghz <= 0:
        raise HvError(f"{path}: ghz must be a number > 0, not {ghz!r}")
    return float(ghz)


# Exits the guest's own interface causes (console output, hypercall marks,
# HLT, CPUID, RDMSR, INVD, interrupts (lowering CR8, the interrupt window),
# and device memory: `mmio_exits` of any reason): the
# same in every virtualized mode and no part of what memory virtualization
# costs, so `hv compare` counts them but does not price them. The guest's
# own clock (CycleClock) prices them: a guest timing CPUID sees its exit.
UNPRICED_EXITS = ("IO_INSTRUCTION", "VMCALL", "HLT", "CPUID", "MSR_READ",
                  "TPR_BELOW_THRESHOLD", "INTERRUPT_WINDOW", "INVD")


def priced_exits(figures: dict) -> int:
    return sum(n for k, n in figures.items()
               if k.startswith("exit.") and k[5:] not in UNPRICED_EXITS) \
        - figures.get("mmio_exits", 0)


def weights(profile: Profile, mode: str, every_exit: bool = False) -> dict[str, dict[str, float]]:
    """Cycles per count, by part (PARTS): figure name -> cycles, the names
    of hv.api.Result's marks (insns, exit.<REASON>, tlb.walk_refs, ...).
    `every_exit`: price the guest's interface exits too (UNPRICED_EXITS)."""
    c = profile.cycles
    # An emulated write's instruction is counted twice in insns (at the
    # fault and when re-run): once is guest work.
    parts = dict(guest={"insns": c["cpi"], "insn_emulation": -c["cpi"]},
                 walks={"tlb.walk_refs": c["walk_ref"], "pwc.hits": c["pwc_hit"],
                        "pwc.ntlb_hits": c["pwc_hit"]},
                 exits={})
    if MODES[mode].virtualized:
        trip = c["exit"] + c["handler"]
        exits = parts["exits"]
        exits.update((f"exit.{r.name}", trip) for r in ExitReason
                     if every_exit or r.name not in UNPRICED_EXITS)
        if not every_exit:
            exits["mmio_exits"] = -trip
        # A remote TLB flush kicks another vCPU out of guest mode: an IPI
        # and an exit there (KVM's kvm_flush_remote_tlbs).
        exits.update({"remote_tlb_flush": trip, "mmu_pte_write": c["pte_write"],
                      "mmu_cache_miss": c["shadow_page"], "agile.to_nested": c["shadow_page"],
                      "agile.to_shadow": c["shadow_page"], "vmm.guest_walk_refs": c["walk_ref"]})
    return parts


def cycles(profile: Profile, mode: str, figures: dict) -> dict[str, float]:
    """Modelled cycles by part (PARTS) and in `total`, from `figures`: every
    counter as one flat dict, the form of hv.api.Result's marks (insns,
    exit.<REASON>, tlb.walk_refs, mmu_pte_write, ...)."""
    parts = {part: sum(w * figures.get(k, 0) for k, w in ws.items())
             for part, ws in weights(profile, mode).items()}
    parts["total"] = sum(parts.values())
    return parts


class CycleClock:
    """A vCPU's modelled cycles so far, every exit priced: the time its
    TSC and APIC timer count (`now(insns)`, given the instructions it
    started; `stats` is its hv.stats.Stats)."""

    def __init__(self, profile: Profile, mode: str, stats):
        flat = {k: w for ws in weights(profile, mode, every_exit=True).values()
                for k, w in ws.items()}
        self.cpi = flat.pop("insns")
        counters = {k: w for k, w in flat.items() if not k.startswith("exit.")}
        self._keys, self._weights = tuple(counters), tuple(counters.values())
        self._zeros = (0,) * len(counters)
        self._exit = {r: flat[f"exit.{r.name}"] for r in ExitReason if f"exit.{r.name}" in flat}
        self.stats = stats

    def now(self, insns: int) -> int:
        # map and sum: this runs at every slice and RDTSC.
        counters, exits = self.stats.counters, self.stats.exits
        cycles = insns * self.cpi + sum(map(mul, self._weights,
                                            map(counters.get, self._keys, self._zeros)))
        if self._exit:
            cycles += sum(map(mul, map(self._exit.__getitem__, exits), exits.values()))
        return int(cycles)

    def instructions(self, cycles: int) -> int:
        """The fewest instructions that take `cycles` or more (at least 1)."""
        return max(1, math.ceil(cycles / self.cpi)) if self.cpi > 0 else max(1, cycles)
