"""Terminal reports of a run, with rich: exits laid out like
`perf kvm stat report`, then counters and the TLB model's figures.

What the guest or its source named (a crash report's instruction, a guest's
name) is shown as text, never read as rich markup: `[rsi + 8]` would be a
tag."""
from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .api import Result
from .compare import ending
from .cost import PARTS, UNPRICED_EXITS
from .stats import TLB_NAMES


class _Console(Console):
    """Leaves a broken pipe to hv's main, which ends quietly (rich exits 1)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def make_console(stderr: bool = False) -> Console:
    """A console for reports: on a terminal, its width; piped or redirected,
    no width limit (rich would fold tables into 80 columns, cutting
    numbers short)."""
    c = _Console(stderr=stderr)
    return c if c.is_terminal else _Console(stderr=stderr, width=1_000_000)


def _exits_table(r: Result) -> Table:
    vms = f", {len(r.vms)} VMs" if r.vms else ""
    t = Table(title=f"VM exits ({r.mmu}{vms})", title_justify="left", box=None, pad_edge=False)
    t.add_column("VM-EXIT", justify="right")
    t.add_column("Samples", justify="right")
    t.add_column("Samples%", justify="right")
    total = sum(r.exits.values())
    for name, n in sorted(r.exits.items(), key=lambda kv: (-kv[1], kv[0])):
        t.add_row(name, str(n), f"{100 * n / total:.2f}%")
    t.add_row("Total", str(total), "100.00%" if total else "-", style="bold")
    return t


def _counters_table(r: Result) -> Table:
    t = Table(title="Counters", title_justify="left", box=None, pad_edge=False)
    t.add_column("counter")
    t.add_column("value", justify="right")
    for name, n in r.counters.items():
        t.add_row(name, f"{n:,}")
    return t


def _tlb_table(r: Result) -> Table:
    t = Table(title="TLB model and page walks", title_justify="left", box=None, pad_edge=False)
    t.add_column("figure")
    t.add_column("value", justify="right")
    tlb = r.tlb
    for name in TLB_NAMES:
        t.add_row(name, f"{tlb[name]:,}")
    if tlb["walks"]:
        t.add_row("refs per walk", f"{tlb['walk_refs'] / tlb['walks']:.2f}")
    hist = ", ".join(f"{k} refs: {v:,}" for k, v in tlb["walk_refs_hist"].items())
    t.add_row("walks by refs", hist or "-")
    by_level = ", ".join(f"{k} {v:,}" for k, v in tlb["walk_refs_by_level"].items())
    t.add_row("refs by level", by_level or "-")
    return t


def _vms_table(r: Result) -> Table:
    t = Table(title="VMs", title_justify="left", box=None, pad_edge=False)
    for col in ("VM", "guest", "ended", "exit code", "exits", "TLB misses", "walk refs"):
        t.add_column(col, justify="left" if col in ("guest", "ended") else "right")
    for i, vm in enumerate(r.vms):
        ok = Result(**vm).ok
        t.add_row(str(i), escape(vm["guest"]), f"[{'green' if ok else 'red'}]{vm['reason']}[/]",
                  "-" if vm["exit_code"] is None else str(vm["exit_code"]),
                  f"{vm['counters']['exits']:,}", f"{vm['tlb'].get('misses', 0):,}",
                  f"{vm['tlb'].get('walk_refs', 0):,}")
    return t


def _vcpus_table(r: Result) -> Table:
    """A line per vCPU: what it ran, and where it was at the end."""
    t = Table(title="vCPUs", title_justify="left", box=None, pad_edge=False)
    several = bool(r.vms)
    for col in ("VM",) * several + ("vCPU", "insns", "exits", "TLB misses", "walk refs",
                                    "clock"):
        t.add_column(col, justify="right")
    t.add_column("at the end")
    for i, vm in enumerate(r.vms or [r.__dict__]):
        for cpu in vm["vcpus"]:
            where = f" <{cpu['where']}>" if cpu["where"] else ""
            state = "halted at" if cpu["halted"] else "rip"
            t.add_row(*(str(i),) * several, str(cpu["index"]), f"{cpu['counters']['insns']:,}",
                      f"{cpu['counters']['exits']:,}", _tlb_figure(cpu["tlb"], "misses"),
                      _tlb_figure(cpu["tlb"], "walk_refs"), f"{cpu['clock']:,}",
                      escape(f"{state} {cpu['rip']:#x}{where}"))
    return t


def _tlb_figure(tlb: dict, name: str) -> str:
    return f"{tlb[name]:,}" if tlb.get("modelled", True) else "-"


def _whose(r: Result) -> str:
    """Which VM's marks a result has: with several, the first that did not
    end well, or VM 0 (hv.api.machine_result)."""
    if not r.vms:
        return ""
    return f" (VM {next((i for i, vm in enumerate(r.vms) if not Result(**vm).ok), 0)})"


def _marks_table(r: Result) -> Table:
    """The VM's totals at each vmcall mark."""
    t = Table(title=f"Marks: the totals at each{_whose(r)}", title_justify="left", box=None,
              pad_edge=False)
    for col in ("mark", "insns", "exits", "TLB misses", "walk refs"):
        t.add_column(col, justify="right")
    modelled = r.tlb.get("modelled", True)
    for ident, snap in sorted(r.marks.items()):
        t.add_row(str(ident), f"{snap['insns']:,}", f"{snap['exits']:,}",
                  *((f"{snap['tlb.misses']:,}", f"{snap['tlb.walk_refs']:,}") if modelled
                    else ("-", "-")))
    return t


def _between_table(r: Result, a: int, b: int) -> Table:
    t = Table(title=f"Between marks {a} and {b}{_whose(r)}", title_justify="left", box=None,
              pad_edge=False)
    t.add_column("counter")
    t.add_column("difference", justify="right")
    for name, n in r.between(a, b).flat().items():
        if n:
            t.add_row(name, f"{n:,}")
    return t


def _crash(r: Result) -> list[str]:
    """The chain of events of a triple fault, and the registers at the end."""
    c = r.crash
    who = f"VM {c['vm']} vCPU {c['vcpu']}" if r.vms else f"vCPU {c['vcpu']}"
    width = max(len(s["name"]) for s in c["chain"]) if c["chain"] else 0
    lines = [f"Exception chain ({who}):"]
    lines += [f"  {s['name']:<{width}}  {s['why']}" for s in c["chain"]] + ["  shutdown", ""]
    regs = c["registers"]
    gprs = [f"{k:>3} {regs[k]:016x}" for k in
            "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15".split()]
    where = f" <{c['where']}>" if c["where"] else ""
    lines += [f"Registers at the end ({who}):"]
    lines += ["  " + "  ".join(gprs[i:i + 4]) for i in range(0, len(gprs), 4)]
    lines += [f"  rip {regs['rip']:#x}{where}  rflags {regs['rflags']:#x}  cs {regs['cs']:#x}  "
              f"ss {regs['ss']:#x}",
              "  " + "  ".join(f"{k} {regs[k]:#x}" for k in ("cr0", "cr2", "cr3", "cr4", "efer"))]
    return lines


def print_report(r: Result, console: Console, between: tuple[int, int] | None = None) -> None:
    """The report of `hv run`; `between`: also the differences between two
    marks (which the caller checked exist)."""
    if r.vms:
        console.print(_vms_table(r))
    else:
        style = "green" if r.ok else "red"
        code = "" if r.exit_code is None else f" with exit code {r.exit_code}"
        console.print(f"[{style}]VM ended ({r.reason}){code}:[/] {escape(r.detail)}",
                      highlight=False)
    if r.crash:
        console.print()
        for line in _crash(r):
            console.print(line, markup=False, highlight=False)
    console.print()
    console.print(_exits_table(r))
    console.print()
    console.print(_counters_table(r))
    if r.tlb.get("modelled", True):
        console.print()
        console.print(_tlb_table(r))
    else:
        console.print("\n(mmu qemu: Unicorn's own MMU, no TLB model and no walks counted)")
    console.print()
    console.print(_vcpus_table(r))
    if r.marks:
        console.print()
        console.print(_marks_table(r))
    if between is not None:
        console.print()
        console.print(_between_table(r, *between))



def _mcycles(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def _ending(run: dict) -> str:
    return f"[{'green' if run['ok'] else 'red'}]{ending(run)}[/]"


def _case_table(case: dict, modes: list[str]) -> Table:
    runs = case["runs"]
    window = case["window"]
    span = f"marks {window[0]} to {window[1]}" if window else "the whole run"
    t = Table(title=f"{case['label']}: {span}", title_justify="left", title_style="bold",
              pad_edge=False)
    t.add_column("")
    for m in modes:
        t.add_column(m, justify="right")

    def row(name: str, value, style: str = "") -> None:
        t.add_row(name, *("-" if runs[m]["figures"] is None else value(runs[m]["figures"], runs[m])
                          for m in modes), style=style)

    reasons = sorted({k for r in runs.values() for k in r["figures"] or ()
                      if k.startswith("exit.")})
    row("exits", lambda f, r: f"{sum(f.get(k, 0) for k in reasons):,}", "bold")
    for k in reasons:
        unpriced = " (not priced)" if k[5:] in UNPRICED_EXITS else ""
        row(f"  {k[5:]}{unpriced}", lambda f, r: f"{f.get(k, 0):,}")
    row("TLB misses", lambda f, r: f"{f['tlb.misses']:,}")
    row("walks", lambda f, r: f"{f['tlb.walks']:,}")
    row("walk references", lambda f, r: f"{f['tlb.walk_refs']:,}")
    row("refs per walk", lambda f, r: f"{f['tlb.walk_refs'] / f['tlb.walks']:.2f}"
        if f["tlb.walks"] else "-")
    for part in PARTS:
        row(f"Mcycles in {part}", lambda f, r: _mcycles(r["cycles"][part]))
    row("Mcycles total", lambda f, r: _mcycles(r["cycles"]["total"]), "bold")
    row("overhead vs native", lambda f, r: _pct(r["overhead_pct"]), "bold")
    if not case["same_output"] or not all(runs[m]["ok"] for m in modes):
        t.add_row("ended", *(_ending(runs[m]) for m in modes))
    return t


def _case_notes(case: dict) -> list[str]:
    """What the table cannot say: a run without the window's counts, and
    the first console line the modes differ on, with each mode's text."""
    notes = []
    missing = [m for m, r in case["runs"].items() if r["figures"] is None]
    if missing:
        a, b = case["window"]
        notes.append(f"{', '.join(missing)}: ended before recording marks {a} and {b}")
    diff = case["console_diff"]
    if diff:
        width = max(len(m) for m in diff["text"])
        notes.append(f"[red]console line {diff['line']} differs:[/]")
        for m, text in diff["text"].items():
            shown = "(no such line)" if text is None else json.dumps(
                text if len(text) <= 100 else text[:100] + "...")
            notes.append(f"  {m:<{width}}  {escape(shown)}")
    return notes


def _summary_table(doc: dict) -> Table:
    modes = doc["modes"]
    t = Table(title="Overhead against native (modelled cycles)", title_justify="left",
              title_style="bold", pad_edge=False)
    t.add_column("guest")
    for m in modes:
        t.add_column(m, justify="right")
    t.add_column("same output", justify="center")

    def cell(run: dict) -> str:
        pct = _pct(run["overhead_pct"])
        return pct if run["ok"] else f"{pct}\n[red]{ending(run)}[/]"

    for c in doc["cases"]:
        t.add_row(c["label"], *(cell(c["runs"][m]) for m in modes),
                  "[green]yes[/]" if c["same_output"] else "[red]NO[/]")
    return t


def print_compare(doc: dict, console: Console) -> None:
    p = doc["profile"]
    console.print(f"Profile [bold]{p['name']}[/]: {p['cpu']} ({p['path']})", highlight=False)
    for note in doc["notes"]:
        console.print(f"note: {note}", highlight=False)
    for case in doc["cases"]:
        console.print()
        console.print(_case_table(case, doc["modes"]))
        for note in _case_notes(case):
            console.print(note, highlight=False)
    console.print()
    console.print(_summary_table(doc))
