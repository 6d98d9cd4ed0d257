"""The TLB model: lookup by page size, tags, FIFO replacement, and architectural flushes."""
import pytest

from hv.hw.tlb import TLB, global_tag, tag
from hv.hw.walker import Translation


def tr(va, pa, shift=12, global_=False, writable=True):
    return Translation(va & ~((1 << shift) - 1), pa, shift, writable, False, False, global_, True)


def test_hit_covers_the_whole_page_of_each_size():
    t = TLB(64, 4)
    t.insert(0, tr(0x40_0000, 0x20_0000, shift=21))
    t.insert(0, tr(0x8000_0000, 0, shift=30))
    t.insert(0, tr(0x1000, 0x5000))
    assert t.lookup(0, 0x40_0000 + 0x1F_FFFF).pbase == 0x20_0000
    assert t.lookup(0, 0x8000_0000 + 0x3FFF_FFFF).shift == 30
    assert t.lookup(0, 0x1FFF).pbase == 0x5000
    assert t.lookup(0, 0x2000) is None


def test_entries_are_tagged_by_asid():
    t = TLB(64, 4)
    t.insert(tag(1), tr(0x1000, 0x5000))
    assert t.lookup(tag(2), 0x1000) is None and t.lookup(tag(1), 0x1000) is not None
    assert t.flush_asid(2) == 0 and len(t) == 1
    assert t.flush_asid(1) == 1 and len(t) == 0


def test_entries_are_tagged_by_pcid_and_global_ones_serve_every_pcid():
    """SDM Vol.3A §4.10.2.4: a global translation is used whatever the
    current PCID; others only under the PCID they were cached for."""
    t = TLB(64, 4)
    t.insert(tag(1, 5), tr(0x1000, 0x5000))
    t.insert(global_tag(tag(1, 5)), tr(0x2000, 0x6000, global_=True))
    assert t.lookup(tag(1, 5), 0x1000) is not None and t.lookup(tag(1, 6), 0x1000) is None
    assert t.lookup(tag(1, 6), 0x2000) is not None and t.lookup(tag(2, 5), 0x2000) is None


def test_flushes_by_pcid():
    """MOV to CR3 drops one PCID's non-global entries (flush_tag), INVVPID
    single-context retaining globals every PCID's (flush_nonglobal),
    single-context everything (flush_asid)."""
    t = TLB(64, 4)

    def fill():
        for pcid in (1, 2):
            t.insert(tag(1, pcid), tr(0x1000, 0x5000))
        t.insert(global_tag(tag(1)), tr(0x2000, 0x6000, global_=True))
        t.insert(tag(2, 1), tr(0x1000, 0x5000))
    fill()
    assert t.flush_tag(tag(1, 1)) == 1 and t.lookup(tag(1, 2), 0x1000) is not None
    assert t.flush_nonglobal(1) == 1 and t.lookup(tag(1, 2), 0x2000) is not None
    assert t.flush_asid(1) == 1 and len(t) == 1
    t.flush_all()
    fill()
    assert t.invlpg(tag(1, 1), 0x1000) == 1 and t.invlpg(tag(1, 1), 0x2000) == 1   # INVLPG
    fill()
    assert t.invlpg(tag(1, 1), 0x2000, globals_=False) == 0     # INVPCID individual-address
    assert t.invvpid_address(1, 0x1000) == 2 and t.lookup(tag(2, 1), 0x1000) is not None


def test_fifo_replacement_within_a_set_ignores_hits():
    """Hits must not change what is evicted: the model sees only the hits
    Unicorn's TLB lets through, which depend on the host."""
    t = TLB(4, 2)                       # 2 sets of 2 ways
    nsets = t.nsets
    a, b, c = (tr(i * nsets << 12, i << 12) for i in (1, 2, 3))   # all in one set
    assert not t.insert(0, a) and not t.insert(0, b)
    t.lookup(0, a.vbase)                # a hit: no effect on replacement
    assert t.insert(0, c)               # evicts a, the oldest
    assert t.lookup(0, a.vbase) is None
    assert t.lookup(0, b.vbase) is not None and t.lookup(0, c.vbase) is not None


def test_capacity_bounds_the_entries():
    t = TLB(16, 4)
    for i in range(100):
        t.insert(0, tr(i << 12, i << 12))
    assert len(t) == 16


def test_flush_nonglobal_keeps_global_entries():
    t = TLB(64, 4)
    t.insert(global_tag(0), tr(0x1000, 0x5000, global_=True))
    t.insert(0, tr(0x2000, 0x6000))
    assert t.flush_nonglobal(0) == 1
    assert t.lookup(0, 0x1000) is not None and t.lookup(0, 0x2000) is None
    assert t.flush_all() == 1 and len(t) == 0


def test_invlpg_drops_every_size_covering_the_address_even_global():
    t = TLB(64, 4)
    t.insert(global_tag(0), tr(0x20_0000, 0x40_0000, shift=21, global_=True))
    t.insert(0, tr(0x20_1000, 0x9000))
    t.insert(tag(1), tr(0x20_1000, 0x9000))
    assert t.invlpg(0, 0x20_1234) == 2
    assert t.lookup(0, 0x20_1000) is None and t.lookup(tag(1), 0x20_1000) is not None


class Engine:
    """What the TLB asks of an engine: drop a 4 KiB page, or everything."""

    def __init__(self):
        self.log = []

    def flush_page(self, vaddr):
        self.log.append(vaddr)

    def flush_tlb(self):
        self.log.append("all")


def test_engines_of_the_asid_forget_whatever_leaves():
    """Unicorn's TLB must never hold what the model dropped."""
    t = TLB(64, 4)
    mine, other = Engine(), Engine()
    t.attach(1, mine)
    t.attach(2, other)
    t.insert(tag(1), tr(0x1000, 0x5000, writable=False))
    t.insert(tag(1), tr(0x1000, 0x5000, writable=True))     # same frame, more rights: harmless
    assert mine.log == []
    t.insert(tag(1), tr(0x1000, 0x7000))                    # another frame: Unicorn must forget
    assert mine.log == [0x1000]
    t.insert(tag(1, 3), tr(0x20_0000, 0x40_0000, shift=21))
    t.invlpg(tag(1, 3), 0x20_0000)                          # a large page: everything
    assert mine.log == [0x1000, "all"]
    t.flush_nonglobal(1)
    assert mine.log == [0x1000, "all", "all"] and other.log == []


def test_eviction_makes_the_engine_forget_the_evicted_page():
    t = TLB(4, 2)
    e = Engine()
    t.attach(0, e)
    pages = [(i * t.nsets) << 12 for i in (1, 2, 3)]    # one set
    for va in pages:
        t.insert(0, tr(va, va))
    assert e.log == [pages[0]]


@pytest.mark.parametrize("entries,ways", [(0, 1), (10, 3), (8, 0)])
def test_bad_geometry_is_refused(entries, ways):
    with pytest.raises(ValueError):
        TLB(entries, ways)
