"""`hv compare`: the same guests in several MMU modes, side by side, priced
by a CPU profile (hv.cost).

One Case is a guest with its options (e.g. smp with 4 vCPUs); each runs in
every mode. The architectural results (console and exit code) of a case
must be the same in every mode; `same_output` says whether they were.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from . import api
from .cost import PARTS, Profile, cycles
from .errors import HvError
from .vmm.modes import BASELINE, COUNTING_MODES, MODES


@dataclass(frozen=True)
class Case:
    """A guest, its run options, and the window priced: the counts between
    two vmcall marks (the measured phase), or the whole run (None); `note`
    names the window where a guest has several."""
    guest: str
    options: dict = field(default_factory=dict)
    window: tuple[int, int] | None = None
    note: str = ""

    @property
    def label(self) -> str:
        vcpus = self.options.get("vcpus", 1)
        notes = ([f"{vcpus} vCPUs"] if vcpus > 1 else []) + (
            ["5-level paging"] if self.options.get("paging_levels") == 5 else []) + (
            ["5-level EPT"] if self.options.get("ept_levels") == 5 else []) + (
            ["host large pages"] if self.options.get("ept_large_pages") else []) + (
            [self.note] if self.note else [])
        return self.guest + (f" ({', '.join(notes)})" if notes else "")

    @property
    def run_key(self) -> tuple:
        """Cases with the same key price windows of the same runs."""
        return self.guest, tuple(sorted(self.options.items()))


# The sample suite: the costs Adams & Agesen (ASPLOS 2006) measured, TLB
# reach, then shootdowns as vCPUs grow. Each window is the guest's measured
# phase as its header comment defines it: boot, set-up, warm-up and the
# final report are left out.
SUITE = (
    Case("compute", window=(1, 2)),         # the loop
    Case("pgfault", window=(1, 2)),         # the write pass: one #PF per page
    Case("ptemod", window=(1, 2)),          # the PTE-update rounds
    # The CR3 switches, each flushing the TLB, then with PCID keeping it.
    Case("ctxswitch", {"cpu": "-pcid"}, window=(1, 2), note="no PCID"),
    Case("ctxswitch", window=(1, 2), note="PCID"),
    Case("forkwait", window=(1, 3)),        # every fork, use and teardown
    Case("tlbstress", window=(2, 3)),       # the steady-state passes
    Case("hugepages", window=(2, 3)),       # the same on 2 MiB pages
    Case("hugepages", {"ept_large_pages": True}, window=(2, 3)),   # and host large pages
    # A guest on 5-level paging: 29-reference walks on 4-level EPT, 35 on 5.
    Case("tlbstress", {"paging_levels": 5}, window=(2, 3)),
    Case("tlbstress", {"paging_levels": 5, "ept_levels": 5}, window=(2, 3)),
    # Churn and TLB-hostile reads, together and apart: all three phases,
    # then each (windows of the same runs).
    Case("phases", window=(1, 4), note="all phases"),
    Case("phases", window=(1, 2), note="A: churn and reads"),
    Case("phases", window=(2, 3), note="B: reads"),
    Case("phases", window=(3, 4), note="C: churn"),
    # The rounds, with a short time slice: a vCPU waiting at a barrier spins
    # until hv's round-robin runs the others, so a long slice would fill the
    # window with spinning.
    *(Case("smp", {"vcpus": n, "quantum": 100}, window=(1, 2)) for n in (1, 2, 4)),
)


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    for m in modes:
        if m not in COUNTING_MODES:
            hint = f" ({m} is the oracle: it counts nothing to compare)" if m in MODES else ""
            raise HvError(f"unknown mode {m!r} for compare: choose from "
                          f"{', '.join(COUNTING_MODES)}{hint}")
    if not modes or len(set(modes)) != len(modes):
        raise HvError(f"--mmu needs distinct modes, e.g. native,shadow,ept (not {text!r})")
    return modes


def runnable(modes: tuple[str, ...], profile: Profile) -> tuple[str, ...]:
    """The modes the profile's CPU can run (ept needs EPT); HvError if none."""
    run = tuple(m for m in modes if profile.ept or not MODES[m].needs_ept)
    if not run:
        raise HvError(f"profile {profile.name} ({profile.cpu}) has no EPT: --mmu "
                      f"{','.join(modes)} leaves nothing to run (add native or shadow, or "
                      f"choose a profile with EPT)")
    return run


# The window of each sample guest, which a guest named on the command line
# is measured over too (hugepages has the same window with large EPT pages;
# phases, its first: all phases).
SUITE_WINDOWS = {c.guest: c.window for c in reversed(SUITE)}     # a guest's first


def cases(guests: list[str], vcpus: list[int], options: dict,
          window: tuple[int, int] | None = None) -> list[Case]:
    """The suite when no guest is named, else each guest at each vCPU count,
    priced over `window`, or a sample guest's over its suite window, or the
    whole run; `options` (hv.vmm.vm.Config fields) apply to every run."""
    if not guests:
        if window:
            raise HvError("--between applies to the guests named: the sample suite prices "
                          "each guest over its own window (name guests to choose theirs)")
        return [_with(options, c) for c in SUITE]
    return [Case(g, {**options, "vcpus": n}, window or _suite_window(g))
            for g in guests for n in vcpus]


def _with(options: dict, case: Case) -> Case:
    """`case` with the run's options; its --cpu takes features from the
    run's CPU, not its place."""
    merged = {**options, **case.options}
    if "cpu" in case.options:
        merged["cpu"] = ",".join(filter(None, (options.get("cpu"), case.options["cpu"])))
    return replace(case, options=merged)


def _suite_window(guest: str) -> tuple[int, int] | None:
    """A sample guest's window, if `guest` names it (as hv.load_guest reads
    names: a file of that name comes first)."""
    return None if Path(guest).exists() else SUITE_WINDOWS.get(guest)


def figures(result: api.Result, window: tuple[int, int] | None) -> dict[str, int] | None:
    """Every count of the run, or of the window between two marks, as one
    flat dict (the marks' form: insns, exit.<REASON>, tlb.walk_refs, ...);
    None if the guest ended badly before it recorded the window's marks.
    HvError if a guest that ended well lacks them, or if the window runs
    backwards."""
    if window is None:
        return result.flat()
    if not result.ok and not all(m in result.marks for m in window):
        return None
    return result.between(*window).flat()


def ending(run: dict) -> str:
    """How a run ended, in a few words: "exit code 3", "halted", "triple_fault"."""
    return f"exit code {run['exit_code']}" if run["reason"] == "exit" else run["reason"]


def console_diff(consoles: dict[str, str]) -> dict | None:
    """Where the modes' consoles first differ: the line (from 1) and each
    mode's text of it (None: no such line). None if they are the same."""
    if len(set(consoles.values())) <= 1:
        return None
    lines = {m: c.splitlines(keepends=True) for m, c in consoles.items()}
    n = 0
    while len({tuple(ls[n:n + 1]) for ls in lines.values()}) == 1:
        n += 1
    return dict(line=n + 1, text={m: ls[n] if n < len(ls) else None for m, ls in lines.items()})


def _run_json(mode: str, profile: Profile, result: api.Result, window) -> dict:
    fig = figures(result, window)
    return dict(ok=result.ok, reason=result.reason, detail=result.detail,
                exit_code=result.exit_code, figures=fig,
                cycles=None if fig is None else cycles(profile, mode, fig))


def compare(case_list: list[Case], modes: tuple[str, ...], profile: Profile,
            progress=None) -> dict:
    """Run every case in every mode -> one JSON-ready document.

    A mode the profile's CPU lacks (ept without EPT) is left out with a note;
    without VPID, virtualized modes run with asid=False. `progress(label,
    mode, done)` is called before each run, `done` runs into the whole.
    A run interrupted by Ctrl-C ends the comparison: the document holds the
    cases finished before it and says `interrupted`.
    """
    doc = dict(profile=profile.to_json(), modes=list(modes), notes=[], cases=[],
               interrupted=False)
    run = runnable(modes, profile)
    for m in modes:
        if m not in run:
            doc["notes"].append(f"{m} left out: the {profile.cpu} has no EPT")
    modes = run
    doc["modes"] = list(modes)
    if not profile.vpid:
        doc["notes"].append(f"no VPID on the {profile.cpu}: shadow and ept runs flush the "
                            "TLB at every VM entry and exit (asid=False)")
    done = 0
    results: dict[tuple, api.Result] = {}       # (run key, mode) -> its run
    for case in case_list:
        runs, outputs, consoles = {}, set(), {}
        for mode in modes:
            if progress:
                progress(case.label, mode, done)
            done += 1
            result = results.get((case.run_key, mode))
            if result is None:
                # The guest's clock runs on the profile that prices it.
                options = dict(case.options, profile=profile.path or profile.name)
                if MODES[mode].virtualized and not profile.vpid:
                    options["asid"] = False
                result = results[case.run_key, mode] = api.run(case.guest, mmu=mode, **options)
            if result.reason == "interrupted":
                doc["interrupted"] = True
                return doc
            runs[mode] = _run_json(mode, profile, result, case.window)
            outputs.add((result.console, result.exit_code, result.reason))
            consoles[mode] = result.console
        base = runs.get(BASELINE)
        for run in runs.values():
            # Priced against native whenever both have the window's counts;
            # the case's table says how each run ended.
            fair = base and base["cycles"] and run["cycles"] and base["cycles"]["total"]
            run["overhead_pct"] = (100 * (run["cycles"]["total"] / base["cycles"]["total"] - 1)
                                   if fair else None)
        doc["cases"].append(dict(guest=case.guest, label=case.label, options=case.options,
                                 window=case.window, same_output=len(outputs) == 1,
                                 console_diff=console_diff(consoles), runs=runs))
    return doc


def all_ok(doc: dict) -> bool:
    return all(c["same_output"] and all(r["ok"] for r in c["runs"].values())
               for c in doc["cases"])


def plot(doc: dict, path: str) -> None:
    """One panel per case, one bar per mode, each bar the modelled cycles
    split into PARTS, relative to the case's native total. Panels have their
    own scales, and say so: overheads range from none to a hundredfold."""
    import matplotlib
    matplotlib.use("Agg")               # headless: no display needed
    import matplotlib.pyplot as plt

    if not path.endswith((".png", ".svg")):
        raise HvError(f"--plot writes .png or .svg files, not {path!r}")
    modes, cases_ = doc["modes"], doc["cases"]
    if not cases_:
        raise HvError("no case finished: nothing to plot")
    base_mode = BASELINE if BASELINE in modes else modes[0]
    colours = dict(guest="#4c72b0", walks="#dd8452", exits="#c44e52")
    ncols = min(4, len(cases_))
    nrows = -(-len(cases_) // ncols)
    # Wide enough for the title and the legend however few the panels.
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.0, 3 * ncols), 2.6 * nrows + 1.2),
                             squeeze=False, layout="constrained")
    for ax, case in zip(axes.flat, cases_):
        runs = case["runs"]
        base = runs[base_mode]["cycles"]
        if not base or not base["total"]:
            ax.text(0.5, 0.5, f"no {base_mode} figures:\n{ending(runs[base_mode])}",
                    ha="center", va="center", fontsize=8, transform=ax.transAxes)
        else:
            bottoms = [0.0] * len(modes)
            for part in PARTS:
                heights = [runs[m]["cycles"][part] / base["total"] if runs[m]["cycles"] else 0
                           for m in modes]
                ax.bar(modes, heights, 0.6, bottom=bottoms, color=colours[part], label=part)
                bottoms = [b + h for b, h in zip(bottoms, heights)]
            for x, (mode, top) in enumerate(zip(modes, bottoms)):
                run = runs[mode]
                label = "\n".join(([f"{top:.2f}×"] if run["cycles"] else [])
                                  + ([] if run["ok"] else [ending(run)]))
                ax.text(x, top, label, ha="center", va="bottom", fontsize=7)
            ax.set_ylim(0, max(bottoms) * 1.25 or 1)
            ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(case["label"], fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(cases_):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"cycles / {base_mode}", fontsize=8)
    p = doc["profile"]
    scales = "each panel has its own scale" if len(cases_) > 1 else ""
    fig.suptitle(f"hv compare: modelled cycles on the {p['cpu']}\n(profile {p['name']}; "
                 f"bars relative to {base_mode}{'; ' + scales if scales else ''})",
                 fontsize=9)
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colours[part]) for part in PARTS],
               [f"cycles in {part}" for part in PARTS], loc="outside lower center",
               fontsize=8, ncol=len(PARTS))
    try:
        fig.savefig(path)
    except OSError as e:
        raise HvError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
