"""Multiboot v1 kernels: load an ELF image and lay out its boot information.

hv boots third-party kernels (KVM's kvm-unit-tests) by the contract GRUB
and QEMU honour: Multiboot Specification 0.6.96, §3.1 (header), §3.2
(machine state), §3.3 (boot information).

- §3.1 (header): the kernel carries a 12-byte header (magic 0x1BADB002,
  flags, checksum; the three sum to 0 mod 2^32), 4-byte aligned and wholly
  within the first 8 KiB of the file. Flags bits 0-15 are requirements a
  loader must refuse if it cannot meet them.
- §3.1.3 (the a.out kludge, flags bit 16): five more fields, header_addr,
  load_addr, load_end_addr, bss_end_addr, entry_addr, say where the file's
  bytes go and where the kernel is entered. A flat image (no ELF: an
  assembled `.s`, a `.bin`) is a multiboot kernel only by them
  (`load_flat`), as GRUB and QEMU load one. An ELF is loaded by its own
  headers and its bit 16 is ignored, as GRUB Legacy does (GRUB 2 and QEMU
  would load by the header's addresses).
- §3.2 (machine state): the kernel is entered at its ELF entry point in
  32-bit protected mode with paging off, EFLAGS.IF and VM clear, A20 on,
  flat 4 GiB CS and DS/ES/FS/GS/SS, EAX = 0x2BADB002 and EBX = the
  physical address of the multiboot information (MBI); ESP, GDTR and IDTR
  are the kernel's to set. The caller sets that machine state up: this
  module only says what goes where.
- §3.3 (boot information): the MBI, an 88-byte structure whose flags say
  which fields are valid, and what it points to (command line, modules,
  memory map, boot loader name).

Pure: bytes in, guest-physical addresses and bytes out. Nothing here
touches a VM.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.descriptions import describe_e_machine
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from .errors import HvError

MULTIBOOT_MAGIC = 0x1BADB002        # in the kernel's header (§3.1.1)
MULTIBOOT_BOOT_MAGIC = 0x2BADB002   # in EAX at entry (§3.2)

_PAGE = 0x1000
_MiB = 1 << 20
_4GiB = 1 << 32
_SEARCH = 8192                      # §3.1: the header lies within the first 8 KiB
_HEADER = struct.Struct("<III")     # magic, flags, checksum

# Header flags bits 0-15 are requirements (§3.1.2). hv always page-aligns
# modules (bit 0) and always gives memory information (bit 1); bit 2 (a
# video mode table) it ignores, as QEMU does: hv has no display. Bit 16
# (the a.out kludge's load addresses) is optional and unused for an ELF,
# as GRUB Legacy does (GRUB 2 and QEMU would load by those addresses).
_REQUIRED = 0xFFFF
_UNDERSTOOD = 0b111

_X86 = ("EM_386", "EM_X86_64")
_SYMBOL_TYPES = ("STT_FUNC", "STT_NOTYPE", "STT_OBJECT")
# The ELF header after e_ident, by EI_CLASS (1: ELF32, 2: ELF64).
_ELF_HEADERS = {1: struct.Struct("<16xHHIIIIIHHHHHH"), 2: struct.Struct("<16xHHIQQQIHHHHHH")}
_NOT_EXEC = {"ET_REL": "a relocatable object", "ET_DYN": "a shared object or PIE program",
             "ET_CORE": "a core dump"}
# What pyelftools (and its vendored construct) raise on malformed input:
# every one of them is the file's fault, never hv's.
_PARSE_ERRORS = (ELFError, ConstructError, struct.error, ValueError,
                 IndexError, KeyError, ZeroDivisionError, OverflowError)

# MBI flags (§3.3): which fields hv fills in.
_MBI_MEM = 1 << 0
_MBI_CMDLINE = 1 << 2
_MBI_MODS = 1 << 3
_MBI_MMAP = 1 << 6                  # kvm-unit-tests reads the map only if set
_MBI_LOADER_NAME = 1 << 9
_MBI_SIZE = 88
MBI_ADDR, MMAP_ADDR = 0x9500, 0x9000    # QEMU's (hw/i386/multiboot.c)
_MEM_LOWER_KIB = 639                # conventional memory below the EBDA
# The PC memory map below 1 MiB (QEMU's e820): RAM, the EBDA, the BIOS.
_LOW_MAP = ((0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2))
_MMAP_ENTRY = struct.Struct("<IQQI")  # size (= 20, excluding itself), base, length, type


@dataclass(frozen=True)
class Segment:
    """Bytes to copy to guest-physical `paddr`; the `memsz - len(data)`
    bytes after them (an ELF's BSS) are to be zeroed."""
    paddr: int
    data: bytes = field(repr=False)
    memsz: int


@dataclass(frozen=True)
class Kernel:
    """A multiboot kernel, ready to be copied into guest RAM."""
    name: str
    entry: int
    segments: tuple[Segment, ...]
    symbols: dict[str, int] = field(repr=False)   # for traces; empty if stripped
    header_flags: int

    @property
    def end(self) -> int:
        """The first byte past the kernel: its boot information goes above."""
        return max(s.paddr + s.memsz for s in self.segments)


@dataclass(frozen=True)
class BootInfo:
    """The MBI and what it points to: write each (guest-physical address,
    bytes) blob into guest RAM, then enter with EBX = `mbi_addr`."""
    mbi_addr: int
    blobs: tuple[tuple[int, bytes], ...]


_AOUT_KLUDGE = 1 << 16
_AOUT = struct.Struct("<IIIII")     # header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr


def is_elf(data: bytes) -> bool:
    """Whether `data` starts like an ELF file (the caller picks a loader)."""
    return data[:4] == b"\x7fELF"


def load_multiboot(data: bytes, what: str) -> Kernel:
    """The multiboot kernel in `data` (an ELF32 or ELF64 x86 executable);
    HvError, naming `what`, if it is anything else."""
    if not is_elf(data):
        raise HvError(f"{what} is not an ELF file: hv boots multiboot v1 kernels "
                      f"(ELF32 or ELF64 with the header in its first 8 KiB)")
    entry, loads, symbols = _read_elf(data, what)
    # a truncated file is that, whatever it lost (its multiboot header too)
    segments = tuple(_segment(data, ph, what) for ph in loads if ph["p_memsz"])
    flags = _header_flags(data, what)
    _check_layout(segments, entry, what)
    return Kernel(what, entry, segments, symbols, flags)


def _read_elf(data: bytes, what: str) -> tuple[int, list[Mapping[str, int]], dict[str, int]]:
    """Entry, PT_LOAD headers and symbols, with pyelftools' errors turned
    into one line about the file."""
    try:
        elf = ELFFile(io.BytesIO(data))
        _check_kind(elf, what)
        loads = [s.header for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        sections = list(elf.iter_sections())
        _check_extents(data, [s.header for s in sections], what)
        return elf["e_entry"], loads, _symbols(sections)
    except _PARSE_ERRORS as e:
        kind = "truncated" if _truncated_tables(data) else "corrupt"
        raise HvError(f"{what} is a {kind} ELF file ({_first_line(e)})") from None


def _check_kind(elf: ELFFile, what: str) -> None:
    """Only x86 executables: anything else would run as garbage."""
    machine = elf["e_machine"]
    if machine not in _X86:
        name = describe_e_machine(machine)
        # pyelftools describes some machines only by their EM_ name
        name = f"machine {machine}" if name == "<unknown>" or name.startswith("EM_") else name
        raise HvError(f"{what} is an ELF for {name} (not x86)")
    if not elf.little_endian:
        raise HvError(f"{what} is a big-endian ELF file (x86 is little-endian)")
    if elf["e_type"] != "ET_EXEC":
        kind = _NOT_EXEC.get(elf["e_type"], f"an ELF of type {elf['e_type']}")
        raise HvError(f"{what} is {kind}, not a kernel: hv boots multiboot kernels "
                      "(ELF executables with a multiboot header)")


def _check_extents(data: bytes, sections: list, what: str) -> None:
    """Every section's bytes lie in the file (pyelftools would read short)."""
    for sh in sections:
        if sh["sh_type"] != "SHT_NOBITS" and sh["sh_offset"] + sh["sh_size"] > len(data):
            raise HvError(f"{what} is a truncated ELF file ({len(data)} bytes; a section "
                          f"ends at {sh['sh_offset'] + sh['sh_size']})")


def _symbols(sections: list) -> dict[str, int]:
    """Name -> address of the named code and data symbols. A symtab lists
    locals before globals, so a global wins a name clash."""
    return {sym.name: sym["st_value"]
            for sec in sections
            if isinstance(sec, SymbolTableSection) and sec["sh_type"] == "SHT_SYMTAB"
            for sym in sec.iter_symbols()
            if sym.name and sym["st_value"] and sym["st_info"]["type"] in _SYMBOL_TYPES}


def _truncated_tables(data: bytes) -> bool:
    """Whether the ELF header, or a table it points to, runs past the end
    of the file: then a parse error means truncated, not corrupt."""
    layout = _ELF_HEADERS.get(data[4] if len(data) > 4 else 0)
    if layout is None:
        return False
    if len(data) < layout.size:
        return True
    f = layout.unpack_from(data)    # [4:6] e_phoff, e_shoff; [8:12] their sizes and counts
    phoff, shoff, phentsize, phnum, shentsize, shnum = f[4], f[5], f[8], f[9], f[10], f[11]
    return phoff + phentsize * phnum > len(data) or shoff + shentsize * shnum > len(data)


def _first_line(e: Exception) -> str:
    """A parser's message, on one line (or the exception's name)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _magic_offsets(data: bytes) -> list[int]:
    """Where the multiboot magic number lies, 4-byte aligned, with a whole
    12-byte header in the first 8 KiB (§3.1)."""
    return [off for off in range(0, min(len(data), _SEARCH) - _HEADER.size + 1, 4)
            if _HEADER.unpack_from(data, off)[0] == MULTIBOOT_MAGIC]


def find_header(data: bytes) -> int | None:
    """The offset of the multiboot header in `data`, or None. As GRUB does,
    a magic number with a bad checksum is no header."""
    for off in _magic_offsets(data):
        magic, flags, checksum = _HEADER.unpack_from(data, off)
        if (magic + flags + checksum) % _4GiB == 0:
            return off
    return None


def _header_flags(data: bytes, what: str) -> int:
    """The flags of the multiboot header (§3.1), if hv can honour them."""
    off = find_header(data)
    if off is not None:
        return _check_flags(_HEADER.unpack_from(data, off)[1], what)
    found = _magic_offsets(data)
    if found:
        raise HvError(f"{what} has a multiboot magic number at offset {found[0]:#x} but a bad "
                      f"checksum (magic + flags + checksum must be 0 mod 2^32)")
    raise HvError(f"{what} is an ELF file without a multiboot header: hv boots multiboot v1 "
                  f"kernels (ELF32 or ELF64 with the header in its first 8 KiB)")


def _check_flags(flags: int, what: str) -> int:
    """`flags`, unless it requires something hv does not do."""
    unknown = flags & _REQUIRED & ~_UNDERSTOOD
    if unknown:
        raise HvError(f"{what} requires multiboot features hv does not provide "
                      f"(header flags {flags:#x}: unknown required bits {unknown:#x})")
    return flags


def load_flat(data: bytes, what: str, symbols: Mapping[str, int] | None = None) -> Kernel | None:
    """The multiboot kernel a flat image is by its header's a.out kludge
    (§3.1.3), or None if `data` has no multiboot header (it is then no
    kernel: hv's own boot ABI runs it). HvError, naming `what`, for a
    header without the kludge or with addresses that cannot be loaded."""
    off = find_header(data)
    if off is None:
        return None
    flags = _check_flags(_HEADER.unpack_from(data, off)[1], what)
    if not flags & _AOUT_KLUDGE:
        raise HvError(f"{what} has a multiboot header (at offset {off:#x}) without load "
                      "addresses: a kernel that is no ELF needs the a.out kludge (flags bit 16)")
    if off + _HEADER.size + _AOUT.size > len(data):
        raise HvError(f"{what}'s multiboot header at offset {off:#x} is cut short: flags bit 16 "
                      f"needs its 5 address fields")
    header, load, load_end, bss_end, entry = _AOUT.unpack_from(data, off + _HEADER.size)
    if load > header:
        raise HvError(f"{what}'s multiboot header has load_addr {load:#x} above header_addr "
                      f"{header:#x}: the header must be loaded")
    start = off - (header - load)           # the file offset loaded at load_addr
    if start < 0:
        raise HvError(f"{what}'s multiboot header puts load_addr {load:#x} {-start} bytes "
                      f"before the file's first byte (header_addr {header:#x}, at offset {off:#x})")
    end = load + len(data) - start if load_end == 0 else load_end
    if end <= header:
        raise HvError(f"{what}'s multiboot header has load_end_addr {end:#x} at or below "
                      f"header_addr {header:#x}: the header must be loaded")
    if end - load > len(data) - start:
        raise HvError(f"{what}'s multiboot header has load_end_addr {end:#x} past the file's end "
                      f"({end - load} bytes from load_addr; the file has {len(data) - start})")
    top = end if bss_end == 0 else bss_end
    if top < end:
        raise HvError(f"{what}'s multiboot header has bss_end_addr {bss_end:#x} below "
                      f"load_end_addr {end:#x}")
    if not load <= entry < end:
        raise HvError(f"{what}'s multiboot header has entry_addr {entry:#x} outside the "
                      f"loaded bytes [{load:#x}, {end:#x})")
    segment = Segment(load, data[start:start + end - load], top - load)
    _check_layout((segment,), entry, what)
    return Kernel(what, entry, (segment,), dict(symbols or {}), flags)


def _segment(data: bytes, ph: Mapping[str, int], what: str) -> Segment:
    """One PT_LOAD: its file bytes, for its physical address (the kernel
    starts with paging off)."""
    start, filesz, memsz, paddr = ph["p_offset"], ph["p_filesz"], ph["p_memsz"], ph["p_paddr"]
    if filesz > memsz:
        raise HvError(f"{what} is a corrupt ELF file (a segment's file size {filesz:#x} "
                      f"exceeds its memory size {memsz:#x})")
    if start + filesz > len(data):
        raise HvError(f"{what} is a truncated ELF file ({len(data)} bytes; the segment "
                      f"at {paddr:#x} needs {start + filesz})")
    return Segment(paddr, data[start:start + filesz], memsz)


def _check_layout(segments: tuple[Segment, ...], entry: int, what: str) -> None:
    """Segments that can all be loaded below 4 GiB, and an entry point
    among them."""
    if not segments:
        raise HvError(f"{what} has no loadable segment (no PT_LOAD with a size)")
    top = max(segments, key=lambda s: s.paddr + s.memsz)
    if top.paddr + top.memsz > _4GiB:
        raise HvError(f"{what} loads above 4 GiB (a segment at {top.paddr:#x}.."
                      f"{top.paddr + top.memsz:#x}): a multiboot kernel starts with paging off")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if a.paddr + a.memsz > b.paddr:
            raise HvError(f"{what} has overlapping segments: {a.paddr:#x}..{a.paddr + a.memsz:#x} "
                          f"and {b.paddr:#x}..{b.paddr + b.memsz:#x}")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in segments):
        raise HvError(f"{what} enters at {entry:#x}, outside every loaded segment")


class _Arena:
    """A bump allocator over guest-physical addresses: the boot information
    is laid out once, in order, upwards, and never freed."""

    def __init__(self, start: int):
        self.end = start
        self.blobs: list[tuple[int, bytes]] = []

    def reserve(self, size: int, align: int = 8) -> int:
        """Room for `size` bytes written later (the MBI, which points at
        everything after it)."""
        addr = _align(self.end, align)
        self.end = addr + size
        return addr

    def put(self, data: bytes, align: int = 8) -> int:
        """Where `data` goes, recorded as a blob."""
        addr = self.reserve(len(data), align)
        self.blobs.append((addr, bytes(data)))
        return addr


def build_boot_info(kernel: Kernel, ram: int, cmdline: str,
                    modules: Sequence[tuple[str, bytes]]) -> BootInfo:
    """The MBI (§3.3) and what it points to, where QEMU puts them: the MBI
    and the memory map below 1 MiB (0x9500, 0x9000), the command line and
    modules from the first page after the kernel. (Right after the kernel
    the MBI would lie where kvm-unit-tests' page allocator starts, which
    writes over it before reading the memory map.) HvError if it all does
    not fit in `ram` bytes of guest RAM, or the kernel loads over them."""
    low = (MMAP_ADDR, MBI_ADDR + _MBI_SIZE)
    if any(seg.paddr < low[1] and low[0] < seg.paddr + seg.memsz for seg in kernel.segments):
        raise HvError(f"{kernel.name} loads over [{low[0]:#x}, {low[1]:#x}), where a multiboot "
                      "loader puts the boot information")
    arena = _Arena(_align(kernel.end, _PAGE))
    cmd = arena.put(_cstr(cmdline, "the command line"))
    names = [arena.put(_cstr(name, "a module name")) for name, _ in modules]
    # §3.1.2 bit 0: modules on page boundaries (hv always does it).
    starts = [arena.put(body, _PAGE) for _, body in modules]
    mods = arena.put(b"".join(struct.pack("<IIII", start, start + len(body), name, 0)
                              for start, (_, body), name in zip(starts, modules, names)))
    mmap = _memory_map(ram)
    loader = arena.put(b"hv\0")
    _check_fits(kernel.name, arena.end, ram)
    fields = struct.pack(
        "<18I", _MBI_MEM | _MBI_CMDLINE | _MBI_MODS | _MBI_MMAP | _MBI_LOADER_NAME,
        _MEM_LOWER_KIB, (ram - _MiB) // 1024, 0, cmd, len(modules), mods,
        0, 0, 0, 0, len(mmap), MMAP_ADDR, 0, 0, 0, loader, 0)
    # The VBE fields (+72..+87) stay 0: flags bit 11 is clear.
    return BootInfo(MBI_ADDR, ((MBI_ADDR, fields.ljust(_MBI_SIZE, b"\0")), (MMAP_ADDR, mmap),
                               *arena.blobs))


def _memory_map(ram: int) -> bytes:
    """The memory map (§3.3, flags bit 6): a PC's, with RAM from 1 MiB up."""
    regions = (*_LOW_MAP, (_MiB, ram - _MiB, 1))
    return b"".join(_MMAP_ENTRY.pack(_MMAP_ENTRY.size - 4, base, length, kind)
                    for base, length, kind in regions if length > 0)


def _check_fits(name: str, end: int, ram: int) -> None:
    """The kernel and its boot information lie in guest RAM (at least the
    first MiB, whose map is fixed) and below 4 GiB (the MBI's are 32-bit
    addresses)."""
    if end > _4GiB:
        raise HvError(f"{name}'s boot information would end at {end:#x}, above 4 GiB: "
                      f"its modules are too large")
    need = max(end, _MiB)
    if need > ram:
        mib = -(-need // _MiB)
        # --ram takes a multiple of 2 MiB
        raise HvError(f"{name} needs {mib} MiB of RAM (its image and boot information end "
                      f"at {end:#x}), more than the {ram / _MiB:g} MiB given: "
                      f"--ram {mib + mib % 2}M would fit it")


def _cstr(text: str, what: str) -> bytes:
    """`text` as a NUL-terminated C string."""
    if "\0" in text:
        raise HvError(f"{what} cannot hold a NUL character: {text!r}")
    return text.encode() + b"\0"


def _align(n: int, to: int) -> int:
    """`n` rounded up to a multiple of `to`."""
    return -(-n // to) * to
