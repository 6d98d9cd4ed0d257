"""hv's benchmarks: hv against the ceiling, bare Unicorn on the same image.

    .venv/bin/python bench/bench.py [--repeat N] [--quick] [--json]   (or: make bench)

Each timed benchmark runs hv and its reference in the same process,
alternating, `--repeat` times, and reports medians, spreads (max/min) and
ratios of medians:

- throughput: guest instructions per second on `compute` and on a
  TLB-friendly memory loop, hv in each mode against the ceiling (hv's `qemu`
  VM started with a plain `emu_start`: Unicorn's own MMU, no hooks, no
  instruction count) and against the same with Unicorn counting
  instructions (`emu_start(count=...)`), which exact counts need;
- cost per exit: a guest that causes N events minus the same guest without
  them, over the events counted;
- cost per modelled TLB miss: a guest that misses on every access, in steady
  state (a run of 9 passes minus a run of 1, over the misses between), with
  walks replayed from the walk memo and with every walk done (memo off);
- scale: 16 VMs of 4 vCPUs running 10^8 instructions, a 4 GiB guest
  touching 16 MiB, and a run of 10^9 instructions and 10^6 exits, each in
  a fresh process: time, resident memory before, a fifth of the way in
  (sampled at each console byte) and at its peak.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hv
from hv.asm import assemble_source
from hv.vmm.vm import VM, Config

MODES = ("native", "shadow", "ept")
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
# A store to a fresh 4 KiB page each time (from 16 MiB on), or to the same one.
TOUCH_SETUP = "    mov rbx, 0x1000000\n"
TOUCH = "    mov qword ptr [rbx], rax\n    add rbx, 0x1000\n"
TOUCH_SAME = "    mov qword ptr [rbx], rax\n    add rbx, 0\n"
# A counter bumped every round, then a hypercall (the next instruction is
# looked up again): in the loop's own page, or in a page of its own.
MIXED = "    inc qword ptr [rip + counter]\n" + VMCALL
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


def tlb_misses(passes: int) -> str:
    """Every access misses the TLB: 4096 pages through 4 KiB guest pages,
    `passes` times."""
    return f"""
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
    mov r8, {passes}
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


# Every vCPU of every VM: a register loop and a store to its own page, then HLT.
SCALE_LOOP = """
    mov rbx, rdi
    shl rbx, 12
    add rbx, 0x1000000
    mov rcx, {iterations}
spin:
    add rax, rcx
    mov qword ptr [rbx], rax
    dec rcx
    jnz spin
    hlt
"""
# Rounds of a register loop and three exits (port I/O to no device, an
# unknown hypercall, a mark under a new id); a console byte every 256th.
LONG_RUN = """
    xor r13, r13
    mov r12, {rounds}
round:
    mov rcx, {spin}
spin:
    add rax, rcx
    dec rcx
    jnz spin
    mov dx, 0x80
    out dx, al
    mov eax, 99
    vmcall
    xor eax, eax
    mov rbx, r13
    vmcall
    inc r13
    test r13, 255
    jnz next
    mov al, '.'
    mov dx, 0x3f8
    out dx, al
next:
    dec r12
    jnz round
""" + EXIT
# One store to each page of 16 MiB, then exit.
TOUCH_16M = """
    mov rbx, 0x1000000
    mov rcx, 4096
touch:
    mov qword ptr [rbx], rcx
    add rbx, 0x1000
    dec rcx
    jnz touch
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


def time_ceiling(img: bytes, count: int = 0) -> float:
    """Unicorn alone on the image (its own MMU, no hooks but the final
    `out`), counting instructions if `count`."""
    vm = VM(img, Config(mmu="qemu"))
    uc = vm.vcpus[0].engine.uc
    t = time.perf_counter()
    uc.emu_start(vm.vcpus[0].engine.reg("rip"), 0, count=count)
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


class Bench:
    def __init__(self, repeat: int, quick: bool, progress=None):
        self.repeat, self.quick = repeat, quick
        self.progress = progress or (lambda what: None)

    def throughput(self) -> list[dict]:
        rows = []
        loop = MEMLOOP.replace("400000", "4000") if self.quick else MEMLOOP
        for name, guest in (("compute", COMPUTE), ("memory loop", loop)):
            self.progress(f"throughput: {name}")
            img = image(guest)
            insns = hv.run("x", image=img).counters["insns"]
            labels = ("ceiling", "ceiling, counting") + MODES
            runs = [lambda: time_ceiling(img), lambda: time_ceiling(img, count=10**12)]
            runs += [(lambda m=m: time_hv(img, m)[0]) for m in MODES]
            times = alternate(self.repeat, *runs)
            ceiling, counting = (statistics.median(t) for t in times[:2])
            for label, ts in zip(labels, times):
                s = summary(ts)
                rows.append({"benchmark": name, "mode": label, "insns": insns, **s,
                             "minsn_per_s": insns / s["median_s"] / 1e6,
                             "vs_ceiling": ceiling / s["median_s"],
                             "vs_counting": counting / s["median_s"]})
        return rows

    def exits(self) -> list[dict]:
        """Cost of one exit: (run with n events - run without) / events."""
        n = 200 if self.quick else 20000
        pages = min(n, 4096)        # 16 MiB of fresh pages in the default 64 MiB
        cases = [  # (name, mode, guest, baseline guest, the counter of the events[, options of each])
            ("IO_INSTRUCTION exit", "native", events(n, IO), events(n, ""), "io_exits"),
            ("VMCALL exit", "native", events(n, VMCALL), events(n, ""), "hypercalls"),
            ("CR_ACCESS exit", "shadow", events(n, CR3), events(n, ""), "cr3_loads"),
            ("PTE write emulation", "shadow", events(n, PTE_WRITE, PT_SETUP),
             events(n, PTE_USE, PT_SETUP), "mmu_pte_write"),
            ("hidden page fault (a page's first touch)", "shadow", events(pages, TOUCH, TOUCH_SETUP),
             events(pages, TOUCH_SAME, TOUCH_SETUP), "pf_fixed"),
            ("EPT violation (a page's first touch)", "ept", events(pages, TOUCH, TOUCH_SETUP),
             events(pages, TOUCH_SAME, TOUCH_SETUP), "pages_4k"),
            ("code page written, then run (a rescan)", "native",
             events(n, MIXED) + "counter: .quad 0\n",
             events(n, MIXED) + ".align 4096\ncounter: .quad 0\n", "code_rescans"),
            # The same guest both times, started shadowed (rent=0): its PT goes nested at a write and,
            # tried back as shadow at the next VM entry, is shadowed again at
            # its next use (an INVLPG exit, a hidden fault, a shadow page);
            # the baseline leaves it nested.
            ("agile switch round trip (to nested and back)", "agile",
             events(n, PTE_WRITE + VMCALL, PT_SETUP), events(n, PTE_WRITE + VMCALL, PT_SETUP),
             "agile.to_shadow",
             *({"agile_policy": f"dynamic:rent=0,writes=1,window=1,trial={t}"} for t in (1, 0))),
        ]
        rows = []
        for name, mode, guest, base, what, *kws in cases:     # kws: the two runs' options
            self.progress(f"exits: {name}")
            kw, base_kw = kws or ({}, {})
            img, base_img = image(guest), image(base)
            times = alternate(self.repeat, lambda: time_hv(img, mode, **kw)[0],
                              lambda: time_hv(base_img, mode, **base_kw)[0])
            count = (time_hv(img, mode, **kw)[1].counters.get(what, 0)
                     - time_hv(base_img, mode, **base_kw)[1].counters.get(what, 0))
            cost = (statistics.median(times[0]) - statistics.median(times[1])) / count
            rows.append({"benchmark": name, "mode": mode, "events": count,
                         "us_per_event": cost * 1e6, **summary(times[0])})
        return rows

    def tlb_misses(self) -> list[dict]:
        """Steady-state cost of a modelled TLB miss: (9 passes - 1 pass) / misses."""
        few, many = (1, 2) if self.quick else (1, 9)
        one, more = image(tlb_misses(few)), image(tlb_misses(many))
        rows = []
        for mode, refs in (("native", 4), ("shadow", 4), ("ept", 24)):
            for memo in (True, False):
                how = "replayed" if memo else "walked"
                self.progress(f"TLB misses: {mode}, {how}")
                times = alternate(self.repeat, lambda: time_hv(more, mode, memo=memo)[0],
                                  lambda: time_hv(one, mode, memo=memo)[0])
                misses = (time_hv(more, mode, memo=memo)[1].tlb["misses"]
                          - time_hv(one, mode, memo=memo)[1].tlb["misses"])
                cost = (statistics.median(times[0]) - statistics.median(times[1])) / misses
                rows.append({"benchmark": f"TLB miss, {refs}-reference walk {how}", "mode": mode,
                             "events": misses, "us_per_event": cost * 1e6, **summary(times[0])})
        return rows

    def scale(self) -> list[dict]:
        """Each in a fresh process, so its resident memory is its own."""
        iterations = 10**8 // (16 * 4 * 4)
        cases = [("16 VMs x 4 vCPUs, 1e8 insns", "native",
                  dict(guest=SCALE_LOOP.format(iterations=iterations // (100 if self.quick else 1)),
                       vms=16, vcpus=4, ram="32M"))]
        cases += [("4 GiB guest touching 16 MiB", mode, dict(guest=TOUCH_16M, ram="4G"))
                  for mode in MODES]
        rounds = 3_334 if self.quick else 333_334      # 10^6 exits, 10^9 instructions
        cases.append(("1e9 insns, 1e6 exits", "native",
                      dict(guest=LONG_RUN.format(rounds=rounds, spin=998), max_insns=10**10)))
        rows = []
        for name, mode, kw in cases:
            self.progress(f"scale: {name}, {mode}")
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps([mode, kw])],
                                 capture_output=True, text=True, check=True).stdout
            rows.append({"benchmark": name, "mode": mode, **json.loads(out)})
        return rows


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def child(arg: str) -> None:
    """One scale case, run in this fresh process: time and memory as JSON."""
    mode, kw = json.loads(arg)
    img = image(kw.pop("guest"))
    before = _rss_mib()
    peak = [before]
    dt, r = time_hv(img, mode, on_console=lambda vm, byte: peak.append(_rss_mib()), **kw)
    peak.append(_rss_mib())
    json.dump({"seconds": dt, "insns": r.counters["insns"], "exits": r.counters["exits"],
               "rss_before_mib": before, "rss_fifth_mib": peak[len(peak) // 5],
               "rss_peak_mib": max(peak)}, sys.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    from rich.table import Table

    from hv.report import make_console
    err = make_console(stderr=True)
    with err.status("") as status:
        b = Bench(args.repeat, args.quick, lambda what: status.update(f"bench: {what}"))
        result = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                              "processor": platform.processor() or platform.machine()},
                  "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
                  "repeat": args.repeat, "quick": args.quick,
                  "throughput": b.throughput(), "exits": b.exits(),
                  "tlb_misses": b.tlb_misses(), "scale": b.scale()}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    out = make_console()      # piped (make bench > file): as wide as the tables, no cut numbers

    def table(title, columns, rows):
        t = Table(title=title, title_justify="left")
        for col in columns:
            t.add_column(col, justify="left" if col in ("benchmark", "mode") else "right")
        for row in rows:
            t.add_row(*row)
        out.print(t)

    table("Throughput (same-run medians)",
          ("benchmark", "mode", "median s", "spread", "M insn/s", "x ceiling", "x counting"),
          [(r["benchmark"], r["mode"], f"{r['median_s']:.3f}", f"{r['spread']:.2f}",
            f"{r['minsn_per_s']:.1f}", f"{r['vs_ceiling']:.2f}", f"{r['vs_counting']:.2f}")
           for r in result["throughput"]])
    table("Cost per event (median difference / events)",
          ("benchmark", "mode", "events", "µs per event", "spread"),
          [(r["benchmark"], r["mode"], f"{r['events']:,}", f"{r['us_per_event']:.2f}",
            f"{r['spread']:.2f}") for r in result["exits"] + result["tlb_misses"]])
    table("Scale (each in a fresh process)",
          ("benchmark", "mode", "seconds", "M insn/s", "exits", "RSS MiB: before", "a fifth in",
           "peak"),
          [(r["benchmark"], r["mode"], f"{r['seconds']:.2f}", f"{r['insns'] / r['seconds'] / 1e6:.1f}",
            f"{r['exits']:,}", f"{r['rss_before_mib']:.0f}", f"{r['rss_fifth_mib']:.0f}",
            f"{r['rss_peak_mib']:.0f}") for r in result["scale"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
