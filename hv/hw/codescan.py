"""Code scanning: how the modelled CPU sees the instructions Unicorn runs
without a trap (MOV to CR, INVLPG, WRMSR, RDTSC, RDTSCP: hv.hw.intercept).

Every code page a vCPU fetches from is scanned, and each address where one
of those may start gets a code hook, which decodes the instruction and
hands it to the vCPU before it runs.

Invariant: while any alias may fetch from a code frame, none may write it.
A write fill to a code frame takes X from every alias that fetched from it
(`CodeFrames.written`); the next fetch finds the page changed, takes W from
every alias granted it, and scans the page again. Each side knows the
other's aliases, so a page that mixes code and data the guest writes costs
two fills and a look at what changed, not a flush of every TLB.

Bounds: a scan keeps the page's frame and hooked offsets for at most
MAX_PAGES virtual pages (the oldest goes first, and loses X), and a copy of
the page for the MAX_COPIES scanned last (a page scanned again compares
against it and looks only where the bytes changed). Code hooks are never
removed (deleting one re-enters Unicorn's TLB fill), so they and their
decodings grow with the intercept sites the guest's code holds, at every
alias it fetches them through.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from ..arch.paging import PAGE_SIZE
from .intercept import MAX_INSN, Intercepted, candidate_starts, decode, ends_open

MAX_PAGES = 4096
MAX_COPIES = 16


class _Page:
    """A scanned virtual code page."""
    __slots__ = ("frame", "hooked", "tail")

    def __init__(self, frame: int):
        self.frame = frame
        self.hooked: set[int] = set()   # offsets whose address is hooked
        self.tail = True                # an intercepted instruction may run into the next page


def changed_span(before: bytes, after: bytes) -> tuple[int, int] | None:
    """The first and last index where two equally long byte strings differ."""
    diff = int.from_bytes(before, "little") ^ int.from_bytes(after, "little")
    if not diff:
        return None
    return ((diff & -diff).bit_length() - 1) >> 3, (diff.bit_length() - 1) >> 3


class CodeFrames:
    """The VM's frames that hold code, and who may write them: shared by
    its vCPUs' scans."""

    def __init__(self, engines: list):
        self.engines = engines                    # every engine of the VM
        self.frames: set[int] = set()             # frames any vCPU fetched from
        self.scans: list[CodeScan] = []
        # frame -> (engine, virtual page) granted W since the frame's last scan
        self.writers: dict[int, set[tuple[object, int]]] = {}

    def written(self, frame: int, addr: int, length: int, by=None, vpage: int = 0) -> None:
        """Code frame `frame` may change at [addr, addr+length): every vCPU
        takes X from its aliases and scans it again at its next fetch, and
        every engine but `by` (whose own stores QEMU sees) drops the code it
        translated from there. `by` and `vpage`: a guest write fill, which
        grants W to that alias."""
        for scan in self.scans:
            scan.written(frame)
            if scan.engine is not by:
                scan.engine.invalidate_code(addr, length)
        if by is not None:
            self.writers.setdefault(frame, set()).add((by, vpage))

    def take_writes(self, frame: int) -> None:
        """Take W from every alias granted it since the frame's last scan."""
        for engine, vpage in self.writers.pop(frame, ()):
            engine.flush_page(vpage)


class CodeScan:
    """The scans of one vCPU. `read(paddr, n)` reads host memory; `peek` and
    `read_code` see through the vCPU's translations, uncounted; `on_insn(rip,
    insn)` is told of each intercepted instruction about to run; `counters`
    gets `code_rescans`."""

    def __init__(self, engine, code: CodeFrames, read: Callable[[int, int], bytes],
                 peek: Callable[[int], int | None], read_code: Callable[[int], bytes],
                 on_insn: Callable[[int, Intercepted], None], counters):
        self.engine, self.code, self.read, self.peek = engine, code, read, peek
        self.read_code, self.on_insn, self.counters = read_code, on_insn, counters
        self._pages: dict[int, _Page] = {}        # virtual page -> scan, oldest first
        self._aliases: dict[int, set[int]] = {}   # frame -> virtual pages scanned at it
        self._copies: OrderedDict[int, bytes] = OrderedDict()   # virtual page -> bytes scanned
        self._written: dict[int, bool] = {}       # frame -> written since this vCPU scanned it
        self._hooks: set[int] = set()             # addresses with a code hook
        # Decodings by the code size the CPU ran them at: 64, 32 or 16 bits.
        self._decoded: dict[int, dict[int, Intercepted | None]] = {64: {}, 32: {}, 16: {}}
        code.scans.append(self)

    def fetched(self, vpage: int, frame: int) -> None:
        """The vCPU fetches from virtual page `vpage`, at host `frame`: hook
        its intercepted instructions, unless they are hooked already."""
        page = self._pages.get(vpage)
        written = self._written.get(frame)
        # The bytes this vCPU scanned at the same frame: what may have changed.
        old = self._copies.pop(vpage, None) if written and page and page.frame == frame else None
        if written is None:
            # New to this vCPU: any alias on any vCPU may have W on it.
            for engine in self.code.engines:
                engine.flush_tlb()
        elif written:
            self.code.take_writes(frame)
            self.counters["code_rescans"] += 1
        elif page is not None and page.frame == frame and not page.tail:
            return      # unwritten since its scan, and whole without the next page
        self.code.frames.add(frame)
        self._written[frame] = False
        data = self.read(frame, PAGE_SIZE)
        nxt = self.peek(vpage + PAGE_SIZE)
        if nxt is not None:
            data += self.read(nxt, MAX_INSN)
        if page is None:
            page = self._page(vpage, frame)
        elif page.frame != frame:
            self._aliases[page.frame].discard(vpage)
            self._aliases.setdefault(frame, set()).add(vpage)
            page.frame = frame
        self._copies[vpage] = data
        if len(self._copies) > MAX_COPIES:
            self._copies.popitem(last=False)
        page.tail = ends_open(data, PAGE_SIZE)
        if old is not None and len(old) == len(data):     # the same next page, too
            span = changed_span(old, data)
            if span is not None:
                self._rescan(vpage, frame, page, data, *span)
            return
        if written:
            # What this engine translated from it before the writes goes
            # (QEMU missed such stores: test_fuzz.py,
            # test_regression_code_written_on_a_code_frame).
            self.engine.invalidate_code(frame, PAGE_SIZE, now=True)
        self._forget_decodings(vpage, page, 0, PAGE_SIZE)
        self._hook(vpage, page, candidate_starts(data, PAGE_SIZE))

    def _rescan(self, vpage: int, frame: int, page: _Page, data: bytes, lo: int,
                hi: int) -> None:
        """Bytes [lo, hi] of a scanned page changed: drop this engine's code
        and the decodings that overlap them, and hook what may start near
        them now (a candidate's bytes span at most MAX_INSN, its prefixes
        included)."""
        if lo < PAGE_SIZE:
            self.engine.invalidate_code(frame + lo, min(hi + 1, PAGE_SIZE) - lo, now=True)
        self._forget_decodings(vpage, page, lo - MAX_INSN + 1, hi + 1)
        base = max(0, lo - 2 * MAX_INSN)
        window = data[base:hi + 2 * MAX_INSN]
        self._hook(vpage, page, (base + off for off in candidate_starts(window, PAGE_SIZE - base)))

    def _hook(self, vpage: int, page: _Page, offsets) -> None:
        for off in offsets:
            page.hooked.add(off)
            if vpage + off not in self._hooks:
                # Hooks are only ever added: deleting one invalidates translated
                # blocks, which re-enters the fill callback. A hook left on bytes
                # that changed decodes them afresh and finds nothing to intercept.
                self._hooks.add(vpage + off)
                self.engine.hook_code_at(vpage + off, self._hooked)

    def _page(self, vpage: int, frame: int) -> _Page:
        page = self._pages[vpage] = _Page(frame)
        self._aliases.setdefault(frame, set()).add(vpage)
        if len(self._pages) > MAX_PAGES:
            oldest = next(iter(self._pages))
            gone = self._pages.pop(oldest)
            self._aliases[gone.frame].discard(oldest)
            self._copies.pop(oldest, None)
            self._forget_decodings(oldest, gone, 0, PAGE_SIZE)
            self.engine.flush_page(oldest)      # no X left where no scan is kept
        return page

    def written(self, frame: int) -> None:
        """Code frame `frame` may change (CodeFrames.written): take X from
        every alias this vCPU fetched it through, and scan it again."""
        if frame in self._written:
            self._written[frame] = True
            for vpage in self._aliases.get(frame, ()):
                self.engine.flush_page(vpage)

    def _forget_decodings(self, vpage: int, page: _Page, lo: int, hi: int) -> None:
        """Drop the decodings of hooked instructions starting in [lo, hi)."""
        for off in page.hooked:
            if lo <= off < hi:
                for decoded in self._decoded.values():
                    decoded.pop(vpage + off, None)

    def _hooked(self, rip: int) -> None:
        bits = self.engine.code_bits()
        decoded = self._decoded[bits]
        ins = decoded.get(rip, False)
        if ins is False:
            ins = decoded[rip] = decode(self.read_code(rip), rip, bits)
        if ins is not None:
            self.on_insn(rip, ins)
