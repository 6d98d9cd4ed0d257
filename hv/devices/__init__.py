"""The PC devices hv models: pure Python, behind one port table.

Each device is a small module citing its source of truth; the bus
(`PortBus`) maps every decoded port to its device once, and the VMM sends
each IN and OUT through it. `pc_platform` builds the standard set:

| ports           | device                                  | module       |
| --------------- | --------------------------------------- | ------------ |
| 0x020-0x021     | 8259A PIC, master                       | pic.py       |
| 0x0A0-0x0A1     | 8259A PIC, slave                        | pic.py       |
| 0x0F4-0x0F7     | isa-debug-exit: a write ends the VM     | debugexit.py |
| 0x3F8-0x3FF     | 16550 UART (COM1): the console          | uart.py      |
| 0x510-0x511     | fw_cfg: selector, data                  | fwcfg.py     |
| 0xCF8-0xCFF     | PCI host bridge, no device behind it    | pci.py       |
| 0x8900          | Bochs power-off ("Shutdown")            | shutdown.py  |
| 0xB008-0xB00B   | ACPI PM timer (its FADT: acpi.py)       | acpi.py      |
| any other port  | nothing: reads all ones, writes dropped | bus.py       |
"""
from .acpi import PmTimer
from .bus import Device, Platform, PortBus, pc_platform
from .debugexit import DebugExit
from .fwcfg import FwCfg
from .pci import PciHostNoDevices
from .pic import Pic8259, Pic8259Pair
from .shutdown import ShutdownPort
from .uart import Uart16550

__all__ = [
    "Device", "Platform", "PortBus", "pc_platform",
    "DebugExit", "FwCfg", "PciHostNoDevices", "Pic8259", "Pic8259Pair", "PmTimer",
    "ShutdownPort", "Uart16550",
]
