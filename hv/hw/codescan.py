"""Code scanning: how the modelled CPU sees the instructions Unicorn runs
without a trap (MOV to CR, INVLPG, WRMSR, RDTSC, RDTSCP: hv.hw.intercept).

Every code page a vCPU fetches from is scanned, and each address where one
of those may start gets a code hook, which decodes the instruction and
hands it to the vCPU before it runs.

Invariant: while any alias may fetch from a code frame, none may write it:
a write first flushes Unicorn's TLB everywhere (VM.code_written), and the
next fetch finds the page changed and scans it again.

Bounds: a scan keeps the page's frame and hooked offsets, not its bytes, for
at most MAX_PAGES virtual pages (the oldest scan goes first: a page scanned
again hooks only what is not hooked yet). Code hooks are never removed
(deleting one re-enters Unicorn's TLB fill), so they and their decodings
grow with the intercept sites the guest's code holds, at every alias it
fetches them through.
"""
from __future__ import annotations

from typing import Callable

from ..arch.paging import PAGE_SIZE
from .intercept import MAX_INSN, Intercepted, candidate_starts, decode, ends_open

MAX_PAGES = 4096


class _Page:
    """A scanned virtual code page."""
    __slots__ = ("frame", "hooked", "tail")

    def __init__(self, frame: int):
        self.frame = frame
        self.hooked: set[int] = set()   # offsets whose address is hooked
        self.tail = True                # an intercepted instruction may run into the next page


class CodeScan:
    """The scans of one vCPU. `read(paddr, n)` reads host memory; `peek` and
    `read_code` see through the vCPU's translations, uncounted; `engines`
    are every engine of the VM, `code_frames` its frames that hold code;
    `on_insn(rip, insn)` is told of each intercepted instruction about to
    run."""

    def __init__(self, engine, read: Callable[[int, int], bytes],
                 peek: Callable[[int], int | None], read_code: Callable[[int], bytes],
                 engines: list, code_frames: set[int],
                 on_insn: Callable[[int, Intercepted], None]):
        self.engine, self.read, self.peek, self.read_code = engine, read, peek, read_code
        self.engines, self.code_frames, self.on_insn = engines, code_frames, on_insn
        self._pages: dict[int, _Page] = {}        # virtual page -> scan, oldest first
        self._written: dict[int, bool] = {}       # frame -> written since this vCPU scanned it
        self._hooks: set[int] = set()             # addresses with a code hook
        self._decoded: dict[int, Intercepted | None] = {}

    def fetched(self, vpage: int, frame: int) -> None:
        """The vCPU fetches from virtual page `vpage`, at host `frame`: hook
        its intercepted instructions, unless they are hooked already."""
        page = self._pages.get(vpage)
        written = self._written.get(frame)
        if written is not False:
            # New to this vCPU, or written since: no alias on any vCPU may
            # keep W on it now.
            for engine in self.engines:
                engine.flush_tlb()
        if written:
            # What this engine translated from it before the writes goes
            # (VM.code_written dropped the others'; QEMU missed such stores:
            # test_fuzz.py, test_regression_code_written_on_a_code_frame).
            self.engine.invalidate_code(frame, PAGE_SIZE, now=True)
        elif written is False and page is not None and page.frame == frame and not page.tail:
            return      # unwritten since its scan, and whole without the next page
        self.code_frames.add(frame)
        self._written[frame] = False
        data = self.read(frame, PAGE_SIZE)
        nxt = self.peek(vpage + PAGE_SIZE)
        if nxt is not None:
            data += self.read(nxt, MAX_INSN)
        if page is None:
            page = self._pages[vpage] = _Page(frame)
            if len(self._pages) > MAX_PAGES:
                self._forget(next(iter(self._pages)))
        page.frame, page.tail = frame, ends_open(data, PAGE_SIZE)
        self._forget_decodings(vpage, page)
        for off in candidate_starts(data, PAGE_SIZE):
            page.hooked.add(off)
            if vpage + off not in self._hooks:
                # Hooks are only ever added: deleting one invalidates translated
                # blocks, which re-enters the fill callback. A hook left on bytes
                # that changed decodes them afresh and finds nothing to intercept.
                self._hooks.add(vpage + off)
                self.engine.hook_code_at(vpage + off, self._hooked)

    def written(self, frame: int) -> None:
        """Code frame `frame` may have changed (VM.code_written): scan it again."""
        if frame in self._written:
            self._written[frame] = True

    def _forget(self, vpage: int) -> None:
        self._forget_decodings(vpage, self._pages.pop(vpage))

    def _forget_decodings(self, vpage: int, page: _Page) -> None:
        for off in page.hooked:
            self._decoded.pop(vpage + off, None)

    def _hooked(self, rip: int) -> None:
        ins = self._decoded.get(rip, False)
        if ins is False:
            ins = self._decoded[rip] = decode(self.read_code(rip), rip)
        if ins is not None:
            self.on_insn(rip, ins)
