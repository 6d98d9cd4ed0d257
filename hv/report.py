"""Terminal reports of a run, with rich: exits laid out like
`perf kvm stat report`, then counters and the TLB model's figures."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .api import Result
from .stats import TLB_NAMES


def _exits_table(r: Result) -> Table:
    t = Table(title=f"VM exits ({r.mmu})", title_justify="left", box=None, pad_edge=False)
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


def print_report(r: Result, console: Console) -> None:
    style = "green" if r.ok else "red"
    code = "" if r.exit_code is None else f" with exit code {r.exit_code}"
    console.print(f"[{style}]VM ended ({r.reason}){code}:[/] {r.detail}", highlight=False)
    console.print()
    console.print(_exits_table(r))
    console.print()
    console.print(_counters_table(r))
    if r.tlb.get("modelled", True):
        console.print()
        console.print(_tlb_table(r))
    else:
        console.print("\n(mmu qemu: Unicorn's own MMU, no TLB model and no walks counted)")

