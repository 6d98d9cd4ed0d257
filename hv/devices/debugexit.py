"""QEMU's isa-debug-exit: a write ends the VM with the value as exit code.

Source of truth: QEMU hw/misc/debugexit.c, configured as kvm-unit-tests'
x86/run does (`-device isa-debug-exit,iobase=0xf4,iosize=0x4`).

A write of any width to any of its ports ends the VM. hv reports the value
written itself as the exit code, not QEMU's process status (value << 1) | 1.
Reads return 0, as QEMU's do (the one way a guest can tell it is there).
"""
from __future__ import annotations

from .bus import Device, Platform


class DebugExit(Device):
    def __init__(self, platform: Platform, port: int = 0xF4, iosize: int = 4):
        self.name = f"isa-debug-exit@{port:#x}"
        self.ports = range(port, port + iosize)
        self._platform = platform

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        self._platform.finish("exit", f"the guest wrote {value} to port {port:#x}",
                              exit_code=value)
