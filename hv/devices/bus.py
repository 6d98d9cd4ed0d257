"""The port bus: one table from I/O port to device, built once.

Every IN and OUT the guest executes lands here, so a lookup is one dict
access. An access of 2 or 4 bytes goes whole to the device that decodes its
first port (as QEMU's portio hands a wide access to a device that takes
wide accesses); a device that is byte-wide uses the low byte. No device at
the first port: the bus floats high (reads all ones, writes dropped), as an
ISA bus with nothing driving it does.
"""
from __future__ import annotations

from typing import Collection, Iterable, Protocol

_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


def ones(size: int) -> int:
    """All ones for an access of `size` bytes: what a floating bus reads."""
    return _ONES[size]


class Platform(Protocol):
    """What devices need from the VM (the VMM implements it)."""

    def console_write(self, byte: int) -> None: ...

    def finish(self, reason: str, detail: str, exit_code: int | None = None) -> None: ...

    def clock(self) -> int: ...


class Device:
    """A device on the port bus: its name, the ports it decodes (a range for
    all but the PIC pair), and what an access does. The base drives nothing:
    reads float high and writes are dropped; devices override what they use."""

    name: str
    ports: Collection[int]

    def read(self, port: int, size: int) -> int:
        return ones(size)

    def write(self, port: int, size: int, value: int) -> None:
        return None


class PortBus:
    """The one port table. Refuses two devices that decode the same port."""

    def __init__(self, devices: Iterable[Device]):
        self.devices = tuple(devices)
        self._by_port: dict[int, Device] = {}
        for dev in self.devices:
            for port in dev.ports:
                other = self._by_port.setdefault(port, dev)
                if other is not dev:
                    raise ValueError(f"{dev.name} and {other.name} both decode port {port:#x}")

    def device(self, port: int) -> Device | None:
        return self._by_port.get(port)

    def read(self, port: int, size: int) -> int:
        dev = self._by_port.get(port)
        if dev is None:
            return _ONES[size]
        return dev.read(port, size) & _ONES[size]

    def write(self, port: int, size: int, value: int) -> None:
        dev = self._by_port.get(port)
        if dev is not None:
            dev.write(port, size, value & _ONES[size])


def pc_platform(platform: Platform, *, cpus: int, ram: int, ghz: float) -> PortBus:
    """The PC's ports that hv models (the table in hv.devices); `ghz`: the
    CPU's clock rate, which the PM timer runs against."""
    # Imported here: the device modules import Device from this one.
    from .acpi import PmTimer
    from .debugexit import DebugExit
    from .fwcfg import FwCfg
    from .pci import PciHostNoDevices
    from .pic import Pic8259Pair
    from .shutdown import ShutdownPort
    from .uart import Uart16550
    return PortBus([
        Pic8259Pair(),
        DebugExit(platform),
        Uart16550(platform),
        FwCfg(cpus=cpus, ram=ram),
        PciHostNoDevices(),
        ShutdownPort(platform),
        PmTimer(platform, ghz),
    ])
