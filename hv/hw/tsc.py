"""The time-stamp counter: RDTSC and RDTSCP read the vCPU's clock, the
modelled cycles of what it ran up to and including them (hv.cost.CycleClock),
the same on every run (QEMU's would read the host's clock). Unicorn runs the
instruction; its result reaches EDX:EAX after it (hv.hw.after)."""
from __future__ import annotations

from typing import Callable

from ..arch.x86 import CR4
from .after import After, edx_eax

_TSD = int(CR4.TSD)


class Tsc:
    def __init__(self, engine, now: Callable[[], int], after: After):
        self.engine, self.now, self.after = engine, now, after

    def before(self, rip: int, size: int, cr4: int) -> None:
        """RDTSC or RDTSCP of `size` bytes at `rip` is about to run."""
        if self.engine.cpl() != 0 and cr4 & _TSD:
            return          # it will #GP (SDM Vol.2B "RDTSC")
        self.after.set(rip, size, edx_eax(self.now()))
