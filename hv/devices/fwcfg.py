"""QEMU's firmware configuration device, traditional I/O interface only.

Source of truth: QEMU docs/specs/fw_cfg.rst; access widths as QEMU's
hw/nvram/fw_cfg.c (fw_cfg_comb_* for the x86 ports).

A 16-bit write to the selector selects an item and rewinds it; each 8-bit
read of the data port returns its next byte, 0 past its end or for an item
hv does not have. As in QEMU, an 8-bit write is a data write, a no-op
since QEMU 2.4, so it selects nothing; wider data reads are refused and
read 0. The ID item has bit 0 only: no DMA interface, so port 0x514 stays
unmapped. QEMU selects the signature at reset; so does hv.
"""
from __future__ import annotations

from .bus import Device

SELECTOR, DATA = 0x510, 0x511

SIGNATURE = 0x0000
ID = 0x0001
RAM_SIZE = 0x0003
NB_CPUS = 0x0005
MAX_CPUS = 0x000F
FILE_DIR = 0x0019

ID_TRADITIONAL = 1


class FwCfg(Device):
    def __init__(self, *, cpus: int, ram: int):
        self.name = "fw_cfg"
        self.ports = range(SELECTOR, DATA + 1)
        self._items = {
            SIGNATURE: b"QEMU",
            ID: ID_TRADITIONAL.to_bytes(4, "little"),
            RAM_SIZE: ram.to_bytes(8, "little"),
            NB_CPUS: cpus.to_bytes(2, "little"),
            MAX_CPUS: cpus.to_bytes(2, "little"),   # no CPU hot-plug: as many as boot
            FILE_DIR: (0).to_bytes(4, "big"),       # a count of 0 files (big-endian, as the spec says)
        }
        self._select(SIGNATURE)

    def read(self, port: int, size: int) -> int:
        if size != 1 or self._offset >= len(self._item):
            return 0
        self._offset += 1
        return self._item[self._offset - 1]

    def write(self, port: int, size: int, value: int) -> None:
        if size == 2:
            self._select(value)

    def _select(self, key: int) -> None:
        self._item = self._items.get(key, b"")
        self._offset = 0
