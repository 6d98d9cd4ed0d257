"""hv's benchmarks: hv against the ceiling, bare Unicorn on the same image.

    .venv/bin/python bench/bench.py [--repeat N] [--json]     (or: make bench)

Each benchmark runs hv and its reference in the same process, alternating,
`--repeat` times, and reports medians, spreads (max/min) and ratios of
medians. The ceiling is Unicorn itself running the same image with its own
MMU and none of hv's work: hv's mode `qemu` VM, started with a plain
`emu_start` (no instruction counting); only the final `out` to port 0xf4
reaches a hook.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import hv
from hv.asm import assemble_source
from hv.vm import VM, Config

EXIT = "xor eax, eax\nmov dx, 0xf4\nout dx, al\n"

COMPUTE = "compute"
# TLB-friendly memory traffic: 2 memory accesses per 5 instructions over 16 pages.
MEMLOOP = """
    mov r8, 400000
outer:
    mov rbx, 0x1000000
    mov rcx, 16
inner:
    mov rax, qword ptr [rbx]
    mov qword ptr [rbx + 8], rax
    add rbx, 0x1000
    dec rcx
    jnz inner
    dec r8
    jnz outer
""" + EXIT


def events(n: int, body: str, setup: str = "") -> str:
    """A guest that does `body` n times (r12 counts)."""
    return setup + f"""
    mov r12, {n}
again:
{body}
    dec r12
    jnz again
""" + EXIT


IO = "    mov dx, 0x80\n    out dx, al\n"
VMCALL = "    mov eax, 99\n    vmcall\n"
CR3 = "    mov rax, cr3\n    mov cr3, rax\n"
# A live 4 KiB page table at 0x500000 (PD entry 24) whose first PTE is rewritten.
PT_SETUP = """
    mov r14, 0x500000
    mov rax, 0x600003
    mov qword ptr [r14], rax
    mov rax, 0x500003
    mov qword ptr [0x4000 + 24 * 8], rax
    mov r15, 0x3000000
    mov rax, qword ptr [r15]
    mov rsi, 0x600003
"""
# Write the live PTE, then use the table (INVLPG and a read), so that the
# page stays shadowed (no write flooding); the baseline only uses it.
PTE_USE = "    invlpg [r15]\n    mov rdx, qword ptr [r15]\n"
PTE_WRITE = "    mov qword ptr [r14], rsi\n" + PTE_USE
# Every access misses the TLB: 4096 pages through 4 KiB guest pages.
TLB_MISSES = """
    mov rbx, 0x500000
    mov rax, 0x1000003
    mov rcx, 4096
map:
    mov qword ptr [rbx], rax
    add rbx, 8
    add rax, 0x1000
    loop map
    mov rax, 0x500003
    mov rdi, 0x4000 + 64 * 8
    mov rcx, 8
link:
    mov qword ptr [rdi], rax
    add rax, 0x1000
    add rdi, 8
    loop link
    mov r8, 4
pass:
    mov rbx, 0x8000000
    mov rcx, 4096
touch:
    mov rax, qword ptr [rbx]
    add rbx, 0x1000
    loop touch
    dec r8
    jnz pass
""" + EXIT


def image(guest: str) -> bytes:
    return hv.load_guest(guest)[1] if "\n" not in guest else assemble_source(guest).code


def time_hv(img: bytes, mmu: str, **kw) -> tuple[float, hv.Result]:
    t = time.perf_counter()
    r = hv.run("bench", mmu=mmu, image=img, **kw)
    dt = time.perf_counter() - t
    if not r.ok:
        raise SystemExit(f"bench guest failed in {mmu}: {r.detail}")
    return dt, r


def time_ceiling(img: bytes) -> float:
    vm = VM(img, Config(mmu="qemu"))
    uc = vm.vcpus[0].engine.uc
    t = time.perf_counter()
    uc.emu_start(vm.vcpus[0].engine.reg("rip"), 0)
    dt = time.perf_counter() - t
    assert vm.exit_code == 0, vm.detail
    return dt


def alternate(repeat: int, *runs):
    """Run each callable in turn, `repeat` rounds: lists of times per callable."""
    times = [[] for _ in runs]
    for _ in range(repeat):
        for i, run in enumerate(runs):
            times[i].append(run())
    return times


def summary(ts: list[float]) -> dict:
    return {"median_s": statistics.median(ts), "spread": max(ts) / min(ts)}


def throughput(repeat: int) -> list[dict]:
    rows = []
    for name, guest in (("compute", COMPUTE), ("memory loop", MEMLOOP)):
        img = image(guest)
        insns = hv.run("x", image=img).counters["insns"]
        modes = ("native", "shadow", "ept")
        times = alternate(repeat, lambda: time_ceiling(img),
                          *[(lambda m=m: time_hv(img, m)[0]) for m in modes])
        ceiling = statistics.median(times[0])
        for mode, ts in zip(("ceiling",) + modes, times):
            s = summary(ts)
            rows.append({"benchmark": f"throughput: {name}", "mode": mode, **s,
                         "minsn_per_s": insns / s["median_s"] / 1e6,
                         "vs_ceiling": ceiling / s["median_s"]})
    return rows


def per_event(repeat: int, n: int = 20000) -> list[dict]:
    """Cost of one exit or miss: (run with n events - run with none) / events."""
    # (name, mode, guest, baseline guest or None for the ceiling, what counts an event)
    cases = [
        ("IO_INSTRUCTION exit", "native", events(n, IO), events(n, ""), "io_exits"),
        ("VMCALL exit", "native", events(n, VMCALL), events(n, ""), "hypercalls"),
        ("CR_ACCESS exit (shadow)", "shadow", events(n, CR3), events(n, ""), "cr3_loads"),
        ("PTE write emulation (shadow)", "shadow", events(n, PTE_WRITE, PT_SETUP),
         events(n, PTE_USE, PT_SETUP), "mmu_pte_write"),
        ("TLB miss, 4-reference walk", "native", TLB_MISSES, None, "tlb.misses"),
        ("TLB miss, 24-reference walk", "ept", TLB_MISSES, None, "tlb.misses"),
    ]

    def count(r: hv.Result, what: str) -> int:
        return r.tlb["misses"] if what == "tlb.misses" else r.counters.get(what, 0)

    rows = []
    for name, mode, guest, base, what in cases:
        img = image(guest)
        base_img = image(base) if base else img
        base_run = (lambda: time_hv(base_img, mode)[0]) if base else (lambda: time_ceiling(img))
        times = alternate(repeat, lambda: time_hv(img, mode)[0], base_run)
        n_events = count(time_hv(img, mode)[1], what)
        if base:
            n_events -= count(time_hv(base_img, mode)[1], what)
        cost = (statistics.median(times[0]) - statistics.median(times[1])) / n_events
        rows.append({"benchmark": name, "mode": mode, "events": n_events,
                     "us_per_event": cost * 1e6, **summary(times[0])})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                          "processor": platform.processor() or platform.machine()},
              "repeat": args.repeat,
              "throughput": throughput(args.repeat),
              "per_event": per_event(args.repeat)}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table
    t = Table(title="Throughput (same-run medians)", title_justify="left")
    for col in ("benchmark", "mode", "median s", "spread", "M insn/s", "x ceiling"):
        t.add_column(col, justify="left" if col in ("benchmark", "mode") else "right")
    for r in result["throughput"]:
        t.add_row(r["benchmark"], r["mode"], f"{r['median_s']:.3f}", f"{r['spread']:.2f}",
                  f"{r['minsn_per_s']:.1f}", f"{r['vs_ceiling']:.2f}")
    e = Table(title="Cost per event (median difference / events)", title_justify="left")
    for col in ("benchmark", "mode", "events", "µs per event", "spread"):
        e.add_column(col, justify="left" if col in ("benchmark", "mode") else "right")
    for r in result["per_event"]:
        e.add_row(r["benchmark"], r["mode"], f"{r['events']:,}", f"{r['us_per_event']:.2f}",
                  f"{r['spread']:.2f}")
    c = Console()
    c.print(t)
    c.print(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
