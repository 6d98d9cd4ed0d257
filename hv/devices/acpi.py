"""ACPI: the firmware tables a kernel finds (RSDP, RSDT, FADT) and the one
device they name, the power-management timer.

Source of truth: the ACPI specification 6.5, §5.2.5 (RSDP, found on a
16-byte boundary in the BIOS area 0xE0000-0xFFFFF), §5.2.7 (RSDT), §5.2.9
(FADT, revision 1 layout: PM_TMR_BLK at offset 76, PM_TMR_LEN at 91) and
§4.8.3.3 (the PM timer: a 24-bit count at 3.579545 MHz). The timer's port
is QEMU's PIIX4 one (PM base 0xB000 + 8).

The timer counts the vCPU's clock (its modelled cycles) at the profile's
clock rate, so it agrees with the TSC. No other ACPI table (no MADT, DSDT
or FACS): hv's kernels find CPUs through fw_cfg.
"""
from __future__ import annotations

import struct

from .bus import Device, Platform

RSDP_ADDR = 0xE0000
PM_TIMER_PORT = 0xB008
PM_TIMER_HZ = 3_579_545
_OEM = b"HV    "


def _checksummed(data: bytes, at: int) -> bytes:
    """`data` with byte `at` set so that all its bytes sum to 0 (mod 256)."""
    data = bytearray(data)
    data[at] = -sum(data) & 0xFF
    return bytes(data)


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = struct.pack("<4sIBB6s8sI4sI", signature, 36 + len(body), revision, 0, _OEM,
                         b"HV" + signature + b"  ", 1, b"HV  ", 1)
    return _checksummed(header + body, 9)


def tables(base: int = RSDP_ADDR) -> bytes:
    """RSDP at `base`, then the RSDT and the FADT: the bytes to place there."""
    rsdt_addr = base + 32
    fadt_addr = rsdt_addr + 64
    fadt = bytearray(116 - 36)              # revision 1: 116 bytes in all
    struct.pack_into("<I", fadt, 76 - 36, PM_TIMER_PORT)
    fadt[91 - 36] = 4                       # PM_TMR_LEN
    rsdp = _checksummed(struct.pack("<8sB6sBI", b"RSD PTR ", 0, _OEM, 0, rsdt_addr), 8)
    rsdt = _table(b"RSDT", 1, struct.pack("<I", fadt_addr))
    return (rsdp.ljust(32, b"\0") + rsdt.ljust(64, b"\0") + _table(b"FACP", 1, bytes(fadt)))


class PmTimer(Device):
    """The ACPI PM timer: reads return the count, writes are ignored."""

    def __init__(self, platform: Platform, ghz: float, port: int = PM_TIMER_PORT):
        self.name = f"pm-timer@{port:#x}"
        self.ports = range(port, port + 4)
        self._platform, self._base = platform, port
        self._cycles_per_sec = ghz * 1e9

    def read(self, port: int, size: int) -> int:
        ticks = int(self._platform.clock() * PM_TIMER_HZ / self._cycles_per_sec)
        return (ticks & 0xFF_FFFF) >> 8 * (port - self._base)
