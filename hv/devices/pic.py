"""The PC's two cascaded 8259A interrupt controllers, without interrupts.

Source of truth: Intel 8259A datasheet (ICW1-ICW4, OCW1-OCW3); reset values
as QEMU's hw/intc/i8259_common.c.

hv raises no PIC interrupt, so what a guest can observe is small: the
initialisation sequence is accepted (ICW2's vector base is kept), the
interrupt mask (OCW1) reads back, and IRR and ISR, whichever OCW3 selects,
read 0, as does the poll word after an OCW3 poll command (no request).
The mask is 0 at power-on (QEMU's reset value) and after ICW1 (the
datasheet: ICW1 clears the IMR).
"""
from __future__ import annotations

from .bus import Device

MASTER, SLAVE = 0x20, 0xA0

ICW1 = 0x10         # on the command port: start initialisation
OCW3 = 0x08         # on the command port, without ICW1: OCW3, else OCW2
ICW1_NEED_ICW4 = 0x01
ICW1_SINGLE = 0x02  # no slave/master: no ICW3
OCW3_POLL = 0x04


class Pic8259:
    """One 8259A: offset 0 is the command port, offset 1 the data port."""

    def __init__(self) -> None:
        self.imr = 0
        self.vector_base = 0
        self._pending_icws: list[int] = []
        self._poll = False

    def read(self, offset: int) -> int:
        if self._poll:
            self._poll = False
            return 0    # poll word: bit 7 clear, no interrupt requested
        return self.imr if offset else 0   # IRR or ISR: never a bit set

    def write(self, offset: int, value: int) -> None:
        if offset:
            self._write_data(value)
        elif value & ICW1:
            self.imr = 0
            self._pending_icws = [2] + ([] if value & ICW1_SINGLE else [3]) + \
                ([4] if value & ICW1_NEED_ICW4 else [])
        elif value & OCW3:
            self._poll = bool(value & OCW3_POLL)
        # OCW2 (EOI, rotation) acts on in-service bits, and none is ever set.

    def _write_data(self, value: int) -> None:
        if not self._pending_icws:
            self.imr = value    # OCW1
            return
        if self._pending_icws.pop(0) == 2:
            self.vector_base = value & 0xF8
        # ICW3 (cascade wiring) and ICW4 (modes) change nothing without interrupts.


class Pic8259Pair(Device):
    def __init__(self) -> None:
        self.name = "pic8259"
        self.ports = (MASTER, MASTER + 1, SLAVE, SLAVE + 1)
        self.master, self.slave = Pic8259(), Pic8259()

    def read(self, port: int, size: int) -> int:
        return self._chip(port).read(port & 1)

    def write(self, port: int, size: int, value: int) -> None:
        self._chip(port).write(port & 1, value & 0xFF)

    def _chip(self, port: int) -> Pic8259:
        return self.master if port < SLAVE else self.slave
