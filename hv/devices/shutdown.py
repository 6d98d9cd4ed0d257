"""The Bochs power-off port: writing "Shutdown" to it ends the VM.

Source of truth: Bochs iodev/unmapped.cc (port 0x8900); old QEMU's PC had
the same port (bochs_bios_write in hw/pc.c).

hv ends the VM when the last 8 bytes written (the low byte of each write)
spell "Shutdown". Bochs and old QEMU match the word with small state
machines that differ from this only when stray bytes precede or interrupt
it (old QEMU refuses "SShutdown"), which no guest writes. Reads float high.
"""
from __future__ import annotations

from .bus import Device, Platform

WORD = b"Shutdown"


class ShutdownPort(Device):
    def __init__(self, platform: Platform, port: int = 0x8900):
        self.name = f"shutdown@{port:#x}"
        self.ports = range(port, port + 1)
        self._platform = platform
        self._recent = b""

    def write(self, port: int, size: int, value: int) -> None:
        self._recent = (self._recent + bytes([value & 0xFF]))[-len(WORD):]
        if self._recent == WORD:
            self._platform.finish("shutdown", f"the guest wrote 'Shutdown' to port {port:#x}")
