"""A PCI host bridge with nothing behind it.

Source of truth: PCI Local Bus Specification 3.0, §3.2.2.3.2 (configuration
mechanism #1).

CONFIG_ADDRESS (0xCF8) latches a 32-bit write and reads it back, with the
bits the spec reserves (30:24) or fixes (1:0) as 0. Other widths there are
ordinary I/O that nothing decodes (the spec), as QEMU does: reads all
ones, writes dropped. CONFIG_DATA (0xCFC-0xCFF) reads all ones whatever is
addressed: no function answers, so every vendor ID reads 0xFFFF.
"""
from __future__ import annotations

from .bus import Device, ones

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
ADDRESS_BITS = 0x80FF_FFFC  # enable (31), bus, device, function, register (23:2)


class PciHostNoDevices(Device):
    def __init__(self) -> None:
        self.name = "pci-host"
        self.ports = range(CONFIG_ADDRESS, CONFIG_DATA + 4)
        self.address = 0

    def read(self, port: int, size: int) -> int:
        if port == CONFIG_ADDRESS and size == 4:
            return self.address
        return ones(size)

    def write(self, port: int, size: int, value: int) -> None:
        if port == CONFIG_ADDRESS and size == 4:
            self.address = value & ADDRESS_BITS
