"""An instruction's results that QEMU does not produce (RDTSC, and RDMSR of
an MSR QEMU does not have): Unicorn has no hook after an instruction, so a
code hook on the next one sets them. Hooks are never removed: one per site.
Set from the instruction's own code hook, where a new hook takes effect at
once (tests/test_engine.py)."""
from __future__ import annotations


def edx_eax(value: int) -> dict[str, int]:
    """A 64-bit result as RDTSC and RDMSR return it."""
    return {"rax": value & 0xFFFF_FFFF, "rdx": value >> 32 & 0xFFFF_FFFF}


class After:
    def __init__(self, engine):
        self.engine = engine
        self._next: tuple[int, dict[str, int]] | None = None   # (RIP, registers)
        self._hooks: set[int] = set()

    def set(self, rip: int, size: int, regs: dict[str, int]) -> None:
        """Load `regs` once the instruction of `size` bytes at `rip` has run."""
        nxt = rip + size
        self._next = (nxt, regs)
        if nxt not in self._hooks:
            self._hooks.add(nxt)
            self.engine.hook_code_at(nxt, self._hooked)

    def cancel(self) -> None:
        """The next instruction will not run now (an exception)."""
        self._next = None

    def _hooked(self, rip: int) -> None:
        pending, self._next = self._next, None
        if pending is not None and pending[0] == rip:
            for name, value in pending[1].items():
                self.engine.set_reg(name, value)
