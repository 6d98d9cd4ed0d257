"""The CPU hv presents: what CPUID answers and what RDMSR/WRMSR do.

One `CpuModel` per VM (its features, from --cpu) and one `Msrs` per vCPU.
In native mode these are the physical CPU's answers; in the virtualized
modes CPUID, RDMSR and WRMSR exit and the VMM answers with the same model,
so a guest sees one CPU in every mode.
"""
from __future__ import annotations

import struct
from typing import Callable

from ..arch import cpuid as c
from ..arch.paging import is_canonical
from ..devices.lapic import base_msr_valid
from ..errors import HvError


def parse_cpu(spec: str) -> frozenset[str]:
    """QEMU's -cpu spelling, for the features hv has: "" or "max" (all of
    them), "host" likewise, then "+feat" / "-feat" / "feat=on|off" items:
    "max,-pdpe1gb". A model name QEMU knows (qemu64, IvyBridge) means hv's
    CPU; a feature hv does not implement is an error naming it."""
    features = set(c.IMPLEMENTED)
    for i, item in enumerate(filter(None, (s.strip() for s in spec.split(",")))):
        if i == 0 and item[0] not in "+-" and "=" not in item:
            continue        # the model: hv has one
        on, name = _feature_item(item)
        if name not in c.FEATURES:
            if not on:
                continue    # taking away what hv never had changes nothing
            raise HvError(f"--cpu: unknown CPU feature {name!r}")
        if name not in c.IMPLEMENTED:
            if on:
                raise HvError(f"--cpu: hv does not implement {name} yet")
            continue
        if not on and name in c.REQUIRED:
            raise HvError(f"--cpu: hv's CPU cannot be without {name}")
        (features.add if on else features.discard)(name)
    return frozenset(features)


def _feature_item(item: str) -> tuple[bool, str]:
    if item[0] in "+-":
        return item[0] == "+", item[1:].lower()
    name, _, value = item.partition("=")
    if value.lower() not in ("on", "off", "true", "false", "yes", "no", ""):
        raise HvError(f"--cpu: {item!r} is neither +feature, -feature nor feature=on|off")
    return value.lower() not in ("off", "false", "no"), name.lower()


class CpuModel:
    def __init__(self, features: frozenset[str] = c.IMPLEMENTED, vcpus: int = 1):
        self.features, self.vcpus = features, vcpus
        self.cr4_reserved = c.cr4_reserved(features)    # MOV to CR4 with these: #GP
        # What WRMSR, LGDT, LIDT, LLDT, LTR and INVPCID check addresses against.
        self.linear_bits = c.LINEAR_BITS_LA57 if "la57" in features else c.LINEAR_BITS
        self._regs: dict[tuple[int, str], int] = {}
        for name in features:
            leaf, reg, bit = c.FEATURES[name]
            self._regs[leaf, reg] = self._regs.get((leaf, reg), 0) | 1 << bit

    def cpuid(self, leaf: int, subleaf: int, apic_id: int,
              cr4: int = 0) -> tuple[int, int, int, int]:
        """EAX, EBX, ECX, EDX of CPUID (SDM Vol.2A "CPUID") on a vCPU with
        `cr4` (OSPKE is CR4.PKE); leaves hv has not are zeros."""
        leaf &= 0xFFFF_FFFF
        if leaf == 0:
            b, d, cx = struct.unpack("<3I", c.VENDOR)
            return c.MAX_BASIC_LEAF, b, cx, d
        if leaf == 1:
            # EBX: APIC ID, logical processors, CLFLUSH line size (8 x 8 bytes).
            ebx = apic_id << 24 | self.vcpus << 16 | 8 << 8
            return c.SIGNATURE, ebx, self._reg(1, "ecx"), self._reg(1, "edx")
        if leaf == 7:
            ospke = c.OSPKE if cr4 & c.CR4.PKE else 0
            return (0, self._reg(7, "ebx"), self._reg(7, "ecx") | ospke, 0) if subleaf == 0 \
                else (0,) * 4
        if leaf == 0x8000_0000:
            return c.MAX_EXT_LEAF, 0, 0, 0
        if leaf == 0x8000_0001:
            return 0, 0, self._reg(leaf, "ecx"), self._reg(leaf, "edx")
        if 0x8000_0002 <= leaf <= 0x8000_0004:
            part = c.BRAND.ljust(48, b"\0")[(leaf - 0x8000_0002) * 16:][:16]
            return struct.unpack("<4I", part)
        if leaf == 0x8000_0008:
            return c.MAXPHYADDR | self.linear_bits << 8, 0, 0, 0
        return 0, 0, 0, 0

    def _reg(self, leaf: int, reg: str) -> int:
        return self._regs.get((leaf, reg), 0)

    def has(self, name: str) -> bool:
        return name in self.features


class Msrs:
    """One vCPU's MSRs that are hv's (SDM Vol.4): read() gives None and
    write() False where the instruction is #GP. `engine` holds those QEMU
    keeps (hv.arch.cpuid.QEMU_MSRS), `tsc()` is the vCPU's clock and `apic`
    its local APIC (APIC_BASE)."""

    def __init__(self, engine, tsc: Callable[[], int], apic, linear_bits: int):
        self.engine, self.tsc, self.apic = engine, tsc, apic
        self.linear_bits = linear_bits      # of a canonical address (CpuModel.linear_bits)
        self.tsc_offset = 0
        self.tsc_adjust = 0
        self.pat = c.PAT_RESET

    def read(self, index: int) -> int | None:
        if index in c.QEMU_MSRS:
            return self.engine.msr(index)
        if index == c.MSR_TSC:
            return (self.tsc() + self.tsc_offset) & (2**64 - 1)
        if index == c.MSR_TSC_ADJUST:
            return self.tsc_adjust
        if index == c.MSR_APIC_BASE:
            return self.apic.base_msr
        if index == c.MSR_PAT:
            return self.pat
        return None

    def write(self, index: int, value: int) -> bool:
        """Whether the write is allowed; hv's own MSRs change here, QEMU's
        when QEMU runs the instruction after."""
        if index in c.CANONICAL_MSRS:
            return is_canonical(value, self.linear_bits)
        if index in c.QEMU_MSRS:
            return True
        if index == c.MSR_TSC:
            # SDM Vol.3A §17.17.3: writing the TSC moves TSC_ADJUST by as much.
            delta = value - self.read(c.MSR_TSC)
            self.tsc_offset += delta
            self.tsc_adjust = (self.tsc_adjust + delta) & (2**64 - 1)
            return True
        if index == c.MSR_TSC_ADJUST:
            self.tsc_offset += value - self.tsc_adjust
            self.tsc_adjust = value
            return True
        if index == c.MSR_APIC_BASE:
            if not base_msr_valid(value):
                return False
            self.apic.set_base_msr(value)
            return True
        if index == c.MSR_PAT:
            # Each byte a memory type: 0, 1, 4, 5, 6 or 7 (SDM Vol.3A §11.12.2).
            if any((value >> 8 * i) & 0xFF not in (0, 1, 4, 5, 6, 7) for i in range(8)):
                return False
            self.pat = value
            return True
        return False
