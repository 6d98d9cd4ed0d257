"""The time-stamp counter: RDTSC and RDTSCP read the instructions the vCPU
started before them, the same on every run (QEMU's would read the host's
clock). Unicorn runs the instruction; a code hook on the next one sets
EDX:EAX (code scanning reports the RDTSC before it runs). RDMSR's result
goes the same way (`result`)."""
from __future__ import annotations

from typing import Callable

from ..arch.x86 import CR4

_TSD = int(CR4.TSD)


class Tsc:
    def __init__(self, engine, now: Callable[[], int]):
        self.engine, self.now = engine, now
        self._after: tuple[int, int] | None = None    # (next RIP, TSC) of an RDTSC
        self._hooks: set[int] = set()

    def before(self, rip: int, size: int, cr4: int) -> None:
        """RDTSC or RDTSCP of `size` bytes at `rip` is about to run."""
        e = self.engine
        if e.cpl() != 0 and cr4 & _TSD:
            return          # it will #GP (SDM Vol.2B "RDTSC")
        self.result(rip, size, self.now())

    def result(self, rip: int, size: int, value: int) -> None:
        """EDX:EAX = `value` once the instruction of `size` bytes at `rip`
        has run (RDTSC, or RDMSR of an MSR QEMU does not have)."""
        self._after = (rip + size, value)
        if rip + size not in self._hooks:
            self._hooks.add(rip + size)
            self.engine.hook_code_at(rip + size, self._set)

    def cancel(self) -> None:
        """The instruction after the RDTSC will not run now (an exception)."""
        self._after = None

    def _set(self, rip: int) -> None:
        if self._after is not None and self._after[0] == rip:
            tsc = self._after[1]
            self.engine.set_reg("rax", tsc & 0xFFFF_FFFF)
            self.engine.set_reg("rdx", tsc >> 32 & 0xFFFF_FFFF)
        self._after = None
