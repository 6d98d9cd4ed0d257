"""Terminal reports of a run, with rich: exits laid out like
`perf kvm stat report`, then counters and the TLB model's figures."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .api import Result
from .stats import TLB_NAMES


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
        t.add_row(str(i), vm["guest"], f"[{'green' if ok else 'red'}]{vm['reason']}[/]",
                  "-" if vm["exit_code"] is None else str(vm["exit_code"]),
                  f"{vm['counters']['exits']:,}", f"{vm['tlb'].get('misses', 0):,}",
                  f"{vm['tlb'].get('walk_refs', 0):,}")
    return t


def print_report(r: Result, console: Console) -> None:
    if r.vms:
        console.print(_vms_table(r))
    else:
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

