"""What the CPU does once an instruction has run, where Unicorn has no hook
after it: a code hook on the next instruction sets the instruction's result
registers (RDTSC, and RDMSR of an MSR QEMU does not have) or ends the slice
there (an APIC write that lets an interrupt in, taken at the next
instruction boundary). Hooks are never removed: one per site."""
from __future__ import annotations

from typing import Callable


def edx_eax(value: int) -> dict[str, int]:
    """A 64-bit result as RDTSC and RDMSR return it."""
    return {"rax": value & 0xFFFF_FFFF, "rdx": value >> 32 & 0xFFFF_FFFF}


class After:
    """`stop()` ends the slice before the instruction whose hook calls it
    runs (Engine.stop_before)."""

    def __init__(self, engine, stop: Callable[[], None]):
        self.engine, self.stop = engine, stop
        self._next: tuple[int, dict[str, int], bool] | None = None   # (RIP, registers, stop)
        self._hooks: set[int] = set()

    def set(self, rip: int, size: int, regs: dict[str, int] | None = None,
            stop: bool = False) -> None:
        """Once the instruction of `size` bytes at `rip` has run: load
        `regs`, and end the slice if `stop`."""
        nxt = rip + size
        if self._next is not None and self._next[0] == nxt:
            regs, stop = {**self._next[1], **(regs or {})}, stop or self._next[2]
        self._next = (nxt, regs or {}, stop)
        if nxt not in self._hooks:
            self._hooks.add(nxt)
            self.engine.hook_code_at(nxt, self._hooked)

    def cancel(self) -> None:
        """The next instruction will not run now (an exception)."""
        self._next = None

    def _hooked(self, rip: int) -> None:
        pending, self._next = self._next, None
        if pending is None or pending[0] != rip:
            return
        for name, value in pending[1].items():
            self.engine.set_reg(name, value)
        if pending[2]:
            self.stop()
