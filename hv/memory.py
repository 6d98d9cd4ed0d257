"""Host physical memory: one anonymous mapping shared by a VM's engines.

Pages are allocated by the host kernel when first touched, so a VM's
resident size grows with the memory its guest uses, not with the RAM it is
configured with.
"""
from __future__ import annotations

import ctypes
import mmap
import re
from decimal import Decimal, InvalidOperation

from .errors import HvError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


class PhysMem:
    """`size` bytes of host physical memory, addressed from 0.

    Invariant: every access checks its range; nothing outside [0, size) is
    ever read or written on a guest's behalf.
    """

    def __init__(self, size: int):
        if size <= 0 or size % (2 * MiB):
            raise HvError(f"memory size must be a positive multiple of 2 MiB, "
                          f"not {format_size(size)}")
        self.size = size
        self._mm = mmap.mmap(-1, size)
        self._q = memoryview(self._mm).cast("Q")
        # word(addr >> 3): the aligned 8-byte word at addr (the walker's read).
        self.word = self._q.__getitem__
        self.host_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        # on_write(addr, length): told of every write the VMM makes (WalkMemo).
        self.on_write = None

    def contains(self, addr: int, length: int = 1) -> bool:
        return 0 <= addr and addr + length <= self.size

    def read_u64(self, addr: int) -> int:
        """An aligned 8-byte read (page-table entries are always aligned)."""
        return self._q[addr >> 3]

    def table(self, addr: int) -> list[int]:
        """The 512 entries of the (aligned) page table at `addr`, as they are now."""
        return self._q[addr >> 3:(addr >> 3) + 512].tolist()

    def write_u64(self, addr: int, value: int) -> None:
        self._q[addr >> 3] = value
        if self.on_write is not None:
            self.on_write(addr)

    def read(self, addr: int, length: int) -> bytes:
        if not self.contains(addr, length):
            raise HvError(f"physical read [{addr:#x}, +{length:#x}) outside memory")
        return self._mm[addr:addr + length]

    def write(self, addr: int, data: bytes) -> None:
        if not self.contains(addr, len(data)):
            raise HvError(f"physical write [{addr:#x}, +{len(data):#x}) outside memory")
        self._mm[addr:addr + len(data)] = data
        if self.on_write is not None and data:
            self.on_write(addr, len(data))


CHUNK = 2 * MiB     # guest memory is placed in host memory by 2 MiB chunks
# Where device pages (MMIO) live in host-physical space when guest RAM is
# scattered: above any host memory hv makes (MAX_RAM and the VMM areas),
# below MAXPHYADDR (40 bits).
MMIO_WINDOW = 1 << 39


class GuestMemory:
    """Guest-physical memory [0, ram), placed in host memory chunk by chunk.

    `chunks[i]` is the host-physical base of guest chunk i. The identity
    placement is bare metal (native, qemu); `scattered` puts the chunks in
    reverse order above a VMM area, so that a mode that forgets to translate
    a guest-physical address cannot pass by accident.

    Invariant: hpa() answers None for every address outside [0, ram), and
    every host address it gives lies in a guest chunk, never in the VMM area.

    Device pages (`devices`: guest-physical page -> host page, `add_device`)
    lie outside RAM and outside host memory: where the placement is the
    identity, at their own address; else in the MMIO window.
    """

    def __init__(self, host: PhysMem, ram: int, chunks: list[int]):
        self.host, self.ram, self.chunks = host, ram, chunks
        self.devices: dict[int, int] = {}
        self._q = host._q
        self._chunk_words = [c >> 3 for c in chunks]
        self._bases = frozenset(chunks)

    @classmethod
    def identity(cls, ram: int) -> "GuestMemory":
        return cls(PhysMem(ram), ram, [i * CHUNK for i in range(ram // CHUNK)])

    @classmethod
    def scattered(cls, ram: int, vmm_size: int, block: int = CHUNK) -> "GuestMemory":
        """Guest RAM above a VMM area of `vmm_size` bytes, in blocks of
        `block` bytes placed in reverse order (chunks in order inside a
        block, so a block can be mapped by one large page)."""
        per, n = block // CHUNK, ram // CHUNK
        blocks = -(-n // per)
        host = PhysMem(vmm_size + blocks * block)
        return cls(host, ram, [vmm_size + (blocks - 1 - i // per) * block + (i % per) * CHUNK
                               for i in range(n)])

    def add_device(self, gpa: int) -> int:
        """Make guest-physical page `gpa` a device page; its host page."""
        identity = self.chunks == [i * CHUNK for i in range(len(self.chunks))]
        hpa = gpa if identity else MMIO_WINDOW + len(self.devices) * 4096
        self.devices[gpa] = hpa
        return hpa

    def owns(self, hpa: int, size: int) -> bool:
        """Whether host range [hpa, hpa+size) lies wholly in guest chunks."""
        bases = self._bases
        return all(((hpa + off) & ~(CHUNK - 1)) in bases for off in range(0, size, CHUNK)) \
            and ((hpa + size - 1) & ~(CHUNK - 1)) in bases

    def contiguous(self, gpa: int, size: int) -> bool:
        """Whether [gpa, gpa+size) is one host-contiguous, size-aligned run."""
        base = self.hpa(gpa)
        if base is None or base % size or gpa + size > self.ram:
            return False
        return all(self.hpa(gpa + k) == base + k for k in range(0, size, CHUNK))

    def hpa(self, gpa: int) -> int | None:
        if not 0 <= gpa < self.ram:
            return None
        return self.chunks[gpa >> 21] | (gpa & (CHUNK - 1))

    def read_u64(self, gpa: int) -> int:
        """An aligned read; the caller has checked gpa < ram (the walker does)."""
        return self._q[(self.chunks[gpa >> 21] | (gpa & (CHUNK - 1))) >> 3]

    def word(self, index: int) -> int:
        """The aligned word at guest-physical index * 8 (below ram)."""
        return self._q[self._chunk_words[index >> 18] | (index & 0x3FFFF)]

    def write_u64(self, gpa: int, value: int) -> None:
        self.host.write_u64(self.chunks[gpa >> 21] | (gpa & (CHUNK - 1)), value)

    def _pieces(self, gpa: int, length: int):
        if gpa < 0 or gpa + length > self.ram:
            raise HvError(f"guest-physical [{gpa:#x}, +{length:#x}) outside RAM")
        while length:
            n = min(length, CHUNK - (gpa & (CHUNK - 1)))
            yield self.hpa(gpa), n
            gpa, length = gpa + n, length - n

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(self.host.read(h, n) for h, n in self._pieces(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        done = 0
        for h, n in self._pieces(gpa, len(data)):
            self.host.write(h, data[done:done + n])
            done += n


class VmmFrames:
    """The VMM's own 4 KiB frames in host memory [base, base+size): shadow or
    EPT tables. The guest reaches none of them (GuestMemory places RAM above)."""

    def __init__(self, host: PhysMem, size: int, base: int = 0):
        self.host = host
        self._free = list(range(base + size - 4096, base - 1, -4096))

    def __len__(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise HvError("the VMM ran out of memory for its tables")
        hpa = self._free.pop()
        self.host.write(hpa, bytes(4096))
        return hpa

    def free(self, hpa: int) -> None:
        self._free.append(hpa)


# A number (0x hex, 0o, 0b or decimal) and a unit: K, M, G (then B or iB
# maybe), or B. A B right after hex digits is one of them.
_SIZE = re.compile(r"(0x[0-9a-f_]+|0o[0-7_]+|0b[01_]+|[0-9][0-9_]*)\s*([kmg](?:i?b)?|b)?", re.I)
_UNITS = {"k": KiB, "m": MiB, "g": GiB}


def parse_size(text: str) -> int:
    """'64M', '1G', '4096KiB', '0x4000000' -> bytes."""
    m = _SIZE.fullmatch(text.strip())
    try:
        if m is None:
            raise ValueError
        value = int(m[1], 0)        # refuses 010 (leading zeros)
    except ValueError:
        raise HvError(f"invalid size {text!r} (examples: 64M, 1G, 0x4000000)") from None
    return value * _UNITS.get((m[2] or "b")[0].lower(), 1)


MAX_COUNT = 10**18


def parse_count(text: str) -> int:
    """A whole number as --help prints them (5e8), or 1_000, 0x3e8, up to
    MAX_COUNT; ValueError (saying why) for anything else."""
    t = text.strip().replace("_", "")
    try:
        value = int(t, 0)
    except ValueError:
        try:
            exact = Decimal(t)
        except InvalidOperation:
            raise ValueError(f"not a number: {text!r}") from None
        # (adjusted: the exponent, checked before int() spells out 1e999999999)
        if not exact.is_finite() or exact.adjusted() > 18 or exact % 1:
            raise ValueError(f"not a whole number up to 1e18: {text!r}") from None
        value = int(exact)
    if value > MAX_COUNT:
        raise ValueError(f"not a whole number up to 1e18: {text!r}")
    return value


def format_size(size: int) -> str:
    """Bytes in the largest unit that holds them whole: '64 MiB', '3 bytes'."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"
