"""The walk memo (hv/hw/memo.py, WalkMemo) is a speed-up only: a run
with it and a run without give the same result, counter for counter."""
import pytest

import hv
from hv.arch.paging import A, D, P, RW
from hv.memory import PhysMem
from hv.hw.memo import WalkMemo
from hv.hw.walker import READ, WRITE, Walker
from hv.stats import Stats

from conftest import image
from test_hostile import (ALIASED_SRC, CYCLES_SRC, DATA, END, FLUSH, LIVE_SRC, MAP_H, PROLOGUE,
                          PT_H, invlpg, rd, setq, va, wr)

VIRTUALIZED = ("native", "shadow", "ept")


def same_with_and_without_memo(img: bytes, mmu: str, **kw) -> hv.Result:
    on = hv.run("g", mmu=mmu, image=img, **kw).to_json()
    off = hv.run("g", mmu=mmu, image=img, memo=False, **kw).to_json()
    assert on.pop("config") == dict(off.pop("config"), memo=True)
    assert on == off
    return on


# A/D bits and remapping, each probe twice so the second walk is replayed:
# a read walk (D clear) then a write walk (the walker sets D: the read's
# remembered walk must go), the guest clearing A and D through the identity
# map (its write must reach the memo), a remap to another frame.
AD_SRC = PROLOGUE + MAP_H + setq(PT_H, DATA | P | RW) + FLUSH + "".join(
    rd(va(0, 0, 0)) * 2 + wr(va(0, 0, 0, 8), 0x55) + rd(va(0, 0, 0, 8)) * 2
    + rd(PT_H) + setq(PT_H, DATA | P | RW) + invlpg(va(0, 0, 0)) + rd(va(0, 0, 0)) * 2
    + rd(PT_H) + setq(PT_H, (DATA + 0x1000) | P | RW) + invlpg(va(0, 0, 0))
    + rd(va(0, 0, 0)) * 2 + rd(PT_H)) + END


@pytest.mark.parametrize("mmu", VIRTUALIZED)
@pytest.mark.parametrize("src", [AD_SRC, CYCLES_SRC, ALIASED_SRC, LIVE_SRC],
                         ids=["a-d-bits", "cycles", "aliased", "live-tables"])
def test_hostile_tables_count_the_same_with_and_without_memo(src, mmu):
    r = same_with_and_without_memo(image(src), mmu)
    assert r["reason"] == "exit" and r["exit_code"] == 0


@pytest.mark.parametrize("mmu", VIRTUALIZED + ("qemu",))
def test_ad_guest_sees_the_bits_the_walks_set(mmu):
    entries = hv.run("g", mmu=mmu, image=image(AD_SRC)).console.splitlines()[5::3]
    assert entries == [f"{DATA | A | D | P | RW:#x}",        # after the write
                       f"{DATA | A | P | RW:#x}",            # cleared, then read
                       f"{DATA + 0x1000 | A | P | RW:#x}"]   # remapped, then read


@pytest.mark.parametrize("mmu", VIRTUALIZED)
@pytest.mark.parametrize("guest", ["pagetouch", "pgfault", "ptemod", "ctxswitch"])
def test_sample_guests_count_the_same_with_and_without_memo(guest, mmu):
    same_with_and_without_memo(hv.load_guest(guest)[1], mmu)


def test_smp_shootdown_counts_the_same_with_and_without_memo():
    same_with_and_without_memo(hv.load_guest("smp")[1], "native", vcpus=2, quantum=200)


# -- the memo itself -----------------------------------------------------------------
class Engine:
    def __init__(self):
        self.flushes = 0

    def flush_tlb(self):
        self.flushes += 1


def tables():
    mem = PhysMem(4 << 20)
    for level, (table, entry) in enumerate([(0x1000, 0x2000), (0x2000, 0x3000),
                                            (0x3000, 0x4000), (0x4000, 0x10000)]):
        mem.write_u64(table, entry | P | RW)
    return mem


def test_a_replayed_walk_counts_what_the_walk_counted():
    mem, stats = tables(), Stats()
    memo = WalkMemo([Engine()])
    mem.on_write = memo.written
    w = Walker(mem, stats, mem.size)
    w.memo = memo
    first = w.walk(0x1000, 0, READ, False, True, True)
    after_first = (dict(stats.counters), dict(stats.walk_hist), list(stats.refs["guest"]))
    assert w.walk(0x1000, 0, READ, False, True, True) is first       # replayed
    assert stats.counters["tlb.walks"] == 2 and stats.counters["tlb.walk_refs"] == 8
    assert stats.walk_hist == {4: 2} and stats.refs["guest"] == [0, 2, 2, 2, 2, 0]
    assert after_first[0]["tlb.ad_writes"] == stats.counters["tlb.ad_writes"]   # nothing set


def test_a_write_to_an_entry_read_forgets_the_walk_and_watching_flushes():
    mem, stats, engine = tables(), Stats(), Engine()
    memo = WalkMemo([engine])
    mem.on_write = memo.written
    w = Walker(mem, stats, mem.size)
    w.memo = memo
    w.walk(0x1000, 0, READ, False, True, True)
    assert engine.flushes == 1                  # four frames newly watched: once
    assert set(memo.frames) == {1, 2, 3, 4}
    w.walk(0x1000, 0, WRITE, False, True, True)     # sets D in the leaf: the read's walk goes
    assert len(memo.results) == 1
    tr = w.walk(0x1000, 0, READ, False, True, True)
    assert tr.dirty                              # walked again: D is set now
    mem.write_u64(0x4000, 0x11000 | P | RW | A | D)   # the VMM rewrites the leaf
    assert w.walk(0x1000, 0, READ, False, True, True).pbase == 0x11000
    memo.guest_writes(2)                        # the guest may write the PDPT now
    assert memo.results == {} and 2 not in memo.frames
