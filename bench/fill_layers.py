"""Where a TLB miss's time goes in hv's fill path, layer by layer.

    .venv/bin/python bench/fill_layers.py [native|shadow|ept]

Runs bench.py's every-access-misses guest once (so walks are remembered),
then calls each layer of the fill path directly for the same 4096 pages, 3
times, and prints the mean time per call. Unicorn is not involved: this is
the Python side of a replayed miss (bench.py measures the whole).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from hv.vmm.vm import VM, Config  # noqa: E402

PAGES = [0x8000000 + i * 4096 for i in range(4096)]


def per_call(fn, rounds: int = 3) -> float:
    t = time.perf_counter()
    for _ in range(rounds):
        for va in PAGES:
            fn(va)
    return (time.perf_counter() - t) / len(PAGES) / rounds * 1e6


def main(mode: str = "native") -> None:
    vm = VM(bench.image(bench.tlb_misses(1)), Config(mmu=mode))
    vm.run()
    cpu, hw = vm.vcpus[0], vm.vcpus[0].hw
    for va in PAGES:
        cpu._fill(va, 0)

    def walk(va):
        return hw.walker.walk(hw.cr3, va, 0, False, hw.wp, hw.nxe)
    translations = {va: walk(va) for va in PAGES}
    rows = [
        ("VCpu._fill (all of it)", lambda va: cpu._fill(va, 0)),
        ("hw.fill", lambda va: hw.fill(va, 0, False)),
        ("hw.walker.walk (a replayed walk)", walk),
        ("tlb.lookup (a miss)", lambda va: hw.tlb.lookup(hw.asid, va)),
        ("tlb.insert (evicting, with the flush)", lambda va: hw.tlb.insert(hw.asid, translations[va])),
        ("engine.flush_page", lambda va: cpu.engine.flush_page(va)),
    ]
    for label, fn in rows:
        print(f"{label:40s} {per_call(fn):6.2f} µs")


if __name__ == "__main__":
    main(*sys.argv[1:])
