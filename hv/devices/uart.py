"""A 16550 UART (COM1) whose transmitter is the VM's console.

Source of truth: National Semiconductor PC16550D datasheet (register map,
DLAB, LSR/IIR/MSR bits); reset values and the loopback wiring as QEMU's
hw/char/serial.c.

Minimal but consistent: the transmitter is always empty (a byte written
goes straight to the console), the receiver never has data (RBR reads 0),
and no interrupt is ever pending (hv raises no UART interrupt, whatever
IER enables). In loopback (MCR bit 4) a byte written is not transmitted, so
it does not reach the console, and MSR reflects MCR's outputs, which is
what probes (Linux's 8250 autoconfig) check.
"""
from __future__ import annotations

from .bus import Device, Platform

# Register offsets from the base port.
THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
MCR_LOOP = 0x10
FCR_FIFO_ENABLE = 0x01
IIR_NO_INTERRUPT = 0x01
IIR_FIFOS_ENABLED = 0xC0
LSR_IDLE = 0x60         # THRE and TEMT: transmitter empty; DR clear: nothing received
# DCD, DSR and CTS: QEMU's reset value, which it keeps when its chardev has
# no modem lines (stdio, a file, a socket): a line that is always ready.
MSR_READY = 0xB0
MCR_RESET = 0x08        # OUT2, QEMU's reset value
DIVISOR_RESET = 0x0C    # 9600 baud, QEMU's reset value


class Uart16550(Device):
    def __init__(self, platform: Platform, base: int = 0x3F8):
        self.name = f"uart16550@{base:#x}"
        self.ports = range(base, base + 8)
        self._platform = platform
        self._base = base
        self.divisor = DIVISOR_RESET
        self.ier = 0
        self.lcr = 0
        self.mcr = MCR_RESET
        self.scr = 0
        self.fifos = False

    def read(self, port: int, size: int) -> int:
        reg = port - self._base
        if reg == LSR:
            return LSR_IDLE
        if reg == RBR:
            return self.divisor & 0xFF if self.lcr & LCR_DLAB else 0
        if reg == IER:
            return self.divisor >> 8 if self.lcr & LCR_DLAB else self.ier
        if reg == IIR:
            return IIR_NO_INTERRUPT | (IIR_FIFOS_ENABLED if self.fifos else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == MSR:
            return self._loopback_msr() if self.mcr & MCR_LOOP else MSR_READY
        return self.scr

    def write(self, port: int, size: int, value: int) -> None:
        reg, value = port - self._base, value & 0xFF
        if reg == THR:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0xFF00) | value
            elif not self.mcr & MCR_LOOP:
                self._platform.console_write(value)
        elif reg == IER:
            if self.lcr & LCR_DLAB:
                self.divisor = (self.divisor & 0x00FF) | value << 8
            else:
                self.ier = value & 0x0F
        elif reg == FCR:
            self.fifos = bool(value & FCR_FIFO_ENABLE)
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
        elif reg == SCR:
            self.scr = value
        # LSR and MSR are read-only (a write to LSR is for factory test): dropped.

    def _loopback_msr(self) -> int:
        # Outputs wired to inputs: OUT2 -> DCD, OUT1 -> RI, RTS -> CTS, DTR -> DSR.
        m = self.mcr
        return (m & 0x0C) << 4 | (m & 0x02) << 3 | (m & 0x01) << 5
