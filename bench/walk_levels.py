"""The page walker alone, on one process: 256 pages of 4 KiB, each walked
200 times, without the walk memo ("walked") and replayed from it; the best
of 5. Run with PYTHONPATH at two checkouts to compare them (BENCHMARKS.md).
"""
import time, sys
from hv.memory import PhysMem
from hv.stats import Stats
from hv.hw.walker import Walker, READ
from hv.hw.memo import WalkMemo
P, RW, US = 1, 2, 4
mem = PhysMem(4 << 20)
CR3 = 0x1000; nxt = [0x2000]
def alloc():
    p = nxt[0]; nxt[0] += 0x1000; return p
VAS = [0x7F12_3456_7000 + i * 0x1000 for i in range(256)]
for va in VAS:
    table = CR3
    for lv in range(4, 1, -1):
        addr = table + ((va >> (12 + 9 * (lv - 1))) & 0x1FF) * 8
        e = mem.read_u64(addr)
        if not e & P:
            e = alloc() | P | RW | US; mem.write_u64(addr, e)
        table = e & ~0xFFF
    mem.write_u64(table + ((va >> 12) & 0x1FF) * 8, 0x30_0000 | P | RW)
def run(memo):
    w = Walker(mem, Stats(), 4 << 20)
    if memo: w.memo = WalkMemo([])
    t = time.perf_counter()
    for _ in range(200):
        for va in VAS:
            w.walk(CR3, va, READ, False, True, True)
    return (time.perf_counter() - t) / (200 * len(VAS)) * 1e6
best = {m: min(run(m) for _ in range(5)) for m in (False, True)}
label = sys.argv[1] if len(sys.argv) > 1 else "walker:"
print(label, f"walked {best[False]:.3f} us, replayed {best[True]:.3f} us")
