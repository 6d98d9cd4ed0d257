"""hv.loader: multiboot v1 kernels from synthetic ELF files (built here with
struct, so each refusal is tested on the one defect it names) and from the
real kvm-unit-tests images."""
import random
import struct
from pathlib import Path

import pytest

from hv.errors import HvError
from hv.loader import (MULTIBOOT_BOOT_MAGIC, MULTIBOOT_MAGIC, BootInfo, Kernel, Segment,
                       build_boot_info, find_header, is_elf, load_flat, load_multiboot)

KUT = Path(__file__).resolve().parents[2] / "shared" / "kvm-unit-tests"
MiB = 1 << 20
PAGE = 0x1000

EM_386, EM_X86_64, EM_ARM = 3, 62, 40
ET_EXEC, ET_REL = 2, 1
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION = 0, 1, 2, 3
LOCAL, GLOBAL = 0, 1

# Per ELF class: header, program header, section header, symbol.
EHDR = {32: struct.Struct("<16sHHIIIIIHHHHHH"), 64: struct.Struct("<16sHHIQQQIHHHHHH")}
PHDR = {32: struct.Struct("<8I"), 64: struct.Struct("<IIQQQQQQ")}
SHDR = {32: struct.Struct("<10I"), 64: struct.Struct("<IIQQQQIIQQ")}
SYM = {32: struct.Struct("<IIIBBH"), 64: struct.Struct("<IBBHQQ")}


def mb_header(flags: int = 0, checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = -(MULTIBOOT_MAGIC + flags) % (1 << 32)
    return struct.pack("<III", MULTIBOOT_MAGIC, flags, checksum)


CODE = mb_header() + b"\xf4" * 20          # the header, then hlt


def phdr(bits: int, offset: int, paddr: int, filesz: int, memsz: int) -> bytes:
    if bits == 32:
        return PHDR[32].pack(1, offset, paddr, paddr, filesz, memsz, 7, PAGE)
    return PHDR[64].pack(1, 7, offset, paddr, paddr, filesz, memsz, PAGE)


def symtab(bits: int, symbols, at: int) -> tuple[bytes, bytes]:
    """(symtab + strtab bytes at file offset `at`, their section headers)."""
    strtab, syms = b"\0", SYM[bits].pack(*[0] * 6)
    for name, value, kind, bind in symbols:
        info = bind << 4 | kind
        fields = ((len(strtab), value, 4, info, 0, 1) if bits == 32
                  else (len(strtab), info, 0, 1, value, 4))
        syms += SYM[bits].pack(*fields)
        strtab += name.encode() + b"\0"
    # null; .symtab (SHT_SYMTAB, link = the strtab, info = first global); .strtab
    shdrs = (bytes(SHDR[bits].size)
             + SHDR[bits].pack(0, 2, 0, 0, at, len(syms), 2, 1, 8, SYM[bits].size)
             + SHDR[bits].pack(0, 3, 0, 0, at + len(syms), len(strtab), 0, 0, 1, 0))
    return syms + strtab, shdrs


def make_elf(segments=((0x100000, CODE, 0x3000),), *, bits=32, entry=0x100000, machine=None,
             e_type=ET_EXEC, symbols=()) -> bytes:
    """An x86 executable: `segments` are (paddr, file bytes, memsz), each
    one's bytes at a 16-byte aligned offset after the program headers."""
    ehdr = EHDR[bits]
    body = bytearray(ehdr.size + PHDR[bits].size * len(segments))
    phdrs = b""
    for paddr, data, memsz in segments:
        body += bytes(-len(body) % 16)
        phdrs += phdr(bits, len(body), paddr, len(data), memsz)
        body += data
    shoff = shnum = 0
    if symbols:
        body += bytes(-len(body) % 8)
        tables, shdrs = symtab(bits, symbols, len(body))
        body += tables
        shoff, shnum = len(body), 3
        body += shdrs
    ident = b"\x7fELF" + bytes([bits // 32, 1, 1]) + bytes(9)
    machine = machine if machine is not None else {32: EM_386, 64: EM_X86_64}[bits]
    body[:ehdr.size] = ehdr.pack(ident, e_type, machine, 1, entry, ehdr.size, shoff, 0,
                                 ehdr.size, PHDR[bits].size, len(segments),
                                 SHDR[bits].size, shnum, 0)
    body[ehdr.size:ehdr.size + len(phdrs)] = phdrs
    return bytes(body)


def refusal(data: bytes, what: str = "k.elf") -> str:
    """The message load_multiboot refuses `data` with: one line, naming it."""
    with pytest.raises(HvError) as e:
        load_multiboot(data, what)
    text = str(e.value)
    assert what in text and "\n" not in text
    return text


# --- load_multiboot on synthetic files ---------------------------------------

@pytest.mark.parametrize("bits", [32, 64])
def test_segments_entry_and_bss(bits):
    data = b"\x90" * 40
    k = load_multiboot(make_elf([(0x100000, CODE, len(CODE)), (0x102000, data, 0x5000)],
                                bits=bits, entry=0x10000c), "k.elf")
    assert k == Kernel("k.elf", 0x10000c, (Segment(0x100000, CODE, len(CODE)),
                                           Segment(0x102000, data, 0x5000)), {}, 0)
    assert k.end == 0x107000                 # the BSS counts, though not in the file


def test_is_elf():
    assert is_elf(make_elf()) and is_elf(make_elf(bits=64))
    assert not is_elf(b"") and not is_elf(b"\x7fEL") and not is_elf(CODE)


def test_the_magic_numbers():
    assert (MULTIBOOT_MAGIC, MULTIBOOT_BOOT_MAGIC) == (0x1BADB002, 0x2BADB002)


def test_no_header():
    assert refusal(make_elf([(0x100000, b"\xf4" * 64, 64)])) == (
        "k.elf is an ELF file without a multiboot header: hv boots multiboot v1 kernels "
        "(ELF32 or ELF64 with the header in its first 8 KiB)")


def test_bad_checksum():
    text = refusal(make_elf([(0x100000, mb_header(checksum=1) + b"\xf4", 13)]))
    assert "bad checksum" in text and "0x60" in text     # where the magic is


def test_a_bad_header_does_not_hide_a_good_one():
    # GRUB searches on past a magic number whose checksum is wrong
    k = load_multiboot(make_elf([(0x100000, mb_header(checksum=1) + mb_header(2), 24)]), "k")
    assert k.header_flags == 2


# The first segment's bytes start at file offset 0x60 (52 + 32, aligned).
@pytest.mark.parametrize("offset, found", [(8180, True), (8184, False), (9000, False),
                                           (0x62, False)])
def test_the_header_must_lie_aligned_in_the_first_8k(offset, found):
    data = bytes(offset - 0x60) + CODE
    elf = make_elf([(0x100000, data, len(data))])
    assert elf.find(CODE) == offset
    if found:
        assert load_multiboot(elf, "k").header_flags == 0
    else:
        assert "without a multiboot header" in refusal(elf)


def test_wrong_machine():
    assert refusal(make_elf(machine=EM_ARM)) == "k.elf is an ELF for ARM (not x86)"
    assert "machine 9999 (not x86)" in refusal(make_elf(machine=9999))


def test_not_an_executable():
    assert "is a relocatable object, not a kernel" in refusal(make_elf(e_type=ET_REL))


@pytest.mark.parametrize("cut", [20, 40, 70, 0x60 + 8])   # header, header, phdrs, segment
def test_truncated(cut):
    assert "is a truncated ELF file" in refusal(make_elf()[:cut])


@pytest.mark.parametrize("data", [b"", b"garbage", bytes(100), CODE * 10])
def test_not_elf(data):
    assert "is not an ELF file: hv boots multiboot v1 kernels" in refusal(data)


def test_corrupt():
    bad_class = bytearray(make_elf())
    bad_class[4] = 7                    # EI_CLASS neither ELF32 nor ELF64
    assert "is a corrupt ELF file" in refusal(bytes(bad_class))
    # a segment with more file bytes than memory
    assert "is a corrupt ELF file" in refusal(make_elf([(0x100000, CODE, 4)]))


def test_unknown_required_flag():
    text = refusal(make_elf([(0x100000, mb_header(1 << 3), 12)]))
    assert "requires multiboot features hv does not provide" in text and "0x8" in text


def test_understood_and_optional_flags():
    # bits 0-2 are honoured or ignored; 16 and up are optional (16 is the
    # a.out kludge: an ELF is loaded by its own headers)
    flags = 0b111 | 1 << 16 | 1 << 20
    assert load_multiboot(make_elf([(0x100000, mb_header(flags), 12)]), "k").header_flags == flags


def test_segment_above_4g():
    top = make_elf([(0xFFFFF000, CODE, 0x1000)], bits=64, entry=0xFFFFF000)
    assert load_multiboot(top, "k").end == 1 << 32          # up to 4 GiB is fine
    above = make_elf([(0xFFFFF000, CODE, 0x1001)], bits=64, entry=0xFFFFF000)
    assert "loads above 4 GiB" in refusal(above)


def test_overlapping_segments():
    elf = make_elf([(0x100000, CODE, 0x2000), (0x101000, b"x", 1)])
    assert "has overlapping segments: 0x100000..0x102000 and 0x101000..0x101001" in refusal(elf)


def test_entry_outside_segments():
    assert refusal(make_elf(entry=0x103000)) == (
        "k.elf enters at 0x103000, outside every loaded segment")


def test_no_loadable_segment():
    # the header after the ELF headers, in no segment
    assert "has no loadable segment" in refusal(make_elf([]) + CODE)
    # a PT_LOAD of size 0 is no segment
    assert "has no loadable segment" in refusal(make_elf([(0x100000, b"", 0)]) + CODE)


@pytest.mark.parametrize("bits", [32, 64])
def test_symbols(bits):
    syms = [("start", 0x100000, STT_FUNC, GLOBAL), ("table", 0x100010, STT_OBJECT, LOCAL),
            ("edata", 0x103000, STT_NOTYPE, GLOBAL), ("", 0x100004, STT_FUNC, LOCAL),
            (".text", 0x100000, STT_SECTION, LOCAL), ("weak_undefined", 0, STT_NOTYPE, GLOBAL)]
    k = load_multiboot(make_elf(symbols=syms, bits=bits), "k")
    assert k.symbols == {"start": 0x100000, "table": 0x100010, "edata": 0x103000}


def test_garbage_never_escapes_as_a_traceback():
    elf = make_elf([(0x100000, CODE, 0x2000), (0x103000, b"d" * 32, 64)],
                   symbols=[("start", 0x100000, STT_FUNC, GLOBAL)])
    rng = random.Random(0)
    cases = [elf[:n] for n in range(len(elf))]
    for _ in range(2000):
        b = bytearray(elf)
        for _ in range(rng.randrange(1, 5)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    for case in cases:
        try:
            load_multiboot(case, "fuzz.elf")
        except HvError as e:
            assert str(e).startswith("fuzz.elf") and "\n" not in str(e)


# --- build_boot_info -----------------------------------------------------------

def u32(mem, addr):
    return struct.unpack_from("<I", mem, addr)[0]


def cstr(mem, addr):
    return bytes(mem[addr:mem.index(b"\0", addr)]).decode()


def guest_ram(info: BootInfo, ram: int) -> bytearray:
    """The blobs written into RAM, checking they do not overlap."""
    mem, used = bytearray(ram), []
    for addr, data in info.blobs:
        assert all(addr + len(data) <= a or b <= addr for a, b in used)
        used.append((addr, addr + len(data)))
        mem[addr:addr + len(data)] = data
    return mem


KERNEL = load_multiboot(make_elf([(0x100000, CODE, 0x3123)]), "k.elf")
MODULES = [("env", b"NR_CPUS=1\nMEMSIZE=4\n"), ("big", bytes(range(256)) * 20)]


def test_the_mbi_fields():
    info = build_boot_info(KERNEL, 4 * MiB, "k.elf -v x", MODULES)
    mem = guest_ram(info, 4 * MiB)
    mbi = info.mbi_addr
    assert (mbi, u32(mem, mbi + 48)) == (0x9500, 0x9000)     # QEMU's MBI and memory map
    # the rest from the first page after the kernel
    assert min(a for a, _ in info.blobs if a >= 1 * MiB) == 0x104000
    assert u32(mem, mbi) == 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9
    assert (u32(mem, mbi + 4), u32(mem, mbi + 8)) == (639, 3 * 1024)
    assert u32(mem, mbi + 12) == 0                              # boot_device: none
    assert cstr(mem, u32(mem, mbi + 16)) == "k.elf -v x"
    assert u32(mem, mbi + 20) == 2
    assert all(u32(mem, mbi + off) == 0 for off in range(28, 44, 4))   # syms
    assert all(u32(mem, mbi + off) == 0 for off in (52, 56, 60, 68))   # drives..apm
    assert cstr(mem, u32(mem, mbi + 64)) == "hv"
    assert mem[mbi + 72:mbi + 88] == bytes(16)                          # VBE
    assert info.blobs[0] == (mbi, bytes(mem[mbi:mbi + 88]))


def test_the_modules():
    info = build_boot_info(KERNEL, 4 * MiB, "k.elf", MODULES)
    mem = guest_ram(info, 4 * MiB)
    mods = u32(mem, info.mbi_addr + 24)
    for i, (name, body) in enumerate(MODULES):
        start, end, string, reserved = struct.unpack_from("<4I", mem, mods + 16 * i)
        assert start % PAGE == 0 and start >= KERNEL.end      # header flag bit 0
        assert mem[start:end] == body
        assert cstr(mem, string) == name and reserved == 0


def test_no_modules():
    info = build_boot_info(KERNEL, 4 * MiB, "k.elf", [])
    mem = guest_ram(info, 4 * MiB)
    assert u32(mem, info.mbi_addr) & 1 << 3 and u32(mem, info.mbi_addr + 20) == 0


def test_the_memory_map():
    info = build_boot_info(KERNEL, 64 * MiB, "k.elf", MODULES)
    mem = guest_ram(info, 64 * MiB)
    length, addr = u32(mem, info.mbi_addr + 44), u32(mem, info.mbi_addr + 48)
    entries = [struct.unpack_from("<IQQI", mem, a) for a in range(addr, addr + length, 24)]
    assert entries == [(20, 0, 0x9FC00, 1), (20, 0x9FC00, 0x400, 2),
                       (20, 0xF0000, 0x10000, 2), (20, MiB, 63 * MiB, 1)]


def test_too_little_ram():
    big = load_multiboot(make_elf([(0x100000, CODE, 0x2FF000)]), "big.elf")   # to 4 MiB - 4 KiB
    build_boot_info(big, 4 * MiB, "big.elf", [])                # the MBI fits in the last page
    with pytest.raises(HvError) as e:
        build_boot_info(big, 4 * MiB, "big.elf", [("env", b"A=1\n")])
    assert str(e.value).startswith("big.elf needs 5 MiB of RAM (")
    assert str(e.value).endswith("more than the 4 MiB given: --ram 6M would fit it")


def test_a_nul_in_the_command_line():
    with pytest.raises(HvError, match="NUL"):
        build_boot_info(KERNEL, 4 * MiB, "k.elf\0x", [])


# --- the real kvm-unit-tests images ------------------------------------------------

FLATS = sorted((KUT / "x86").glob("*.flat")) or [None]


def need_kut():
    if not KUT.is_dir():
        pytest.skip(f"{KUT} is absent: the prebuilt kvm-unit-tests images live beside "
                    f"the checkout (../shared), not in it")


def test_the_shared_images_are_found():
    need_kut()
    assert (KUT / "README.md").is_file()
    assert {p.stem for p in FLATS} >= {"dummy", "access_test", "vmexit"}


@pytest.mark.parametrize("path", FLATS, ids=lambda p: p.stem if p else "absent")
def test_real_image(path):
    need_kut()
    assert path, f"{KUT}/x86 holds no .flat image"
    data = path.read_bytes()
    assert data[4] == 1                              # ELF32: objcopy'd from the 64-bit link
    k = load_multiboot(data, path.name)
    assert k.header_flags == 0
    assert all(s.paddr >= 0x400000 for s in k.segments)
    assert any(s.paddr <= k.entry < s.paddr + len(s.data) for s in k.segments)
    # the images keep their symbol table: entry is `start` (x86/cstart64.S)
    assert k.symbols["start"] == k.entry and "main" in k.symbols
    # the data segment's BSS is about 12 MiB, zeroed by the loader, not in the file
    data_seg = k.segments[-1]
    assert data_seg.memsz - len(data_seg.data) > 12 * MiB
    info = build_boot_info(k, 64 * MiB, f"{path.name} arg", [("env", b"NR_CPUS=1\n")])
    assert info.mbi_addr == 0x9500
    assert all(a >= k.end for a, _ in info.blobs if a > 1 * MiB)


def test_access_test_occupies_4_to_16_point_something_mib():
    need_kut()
    k = load_multiboot((KUT / "x86" / "access_test.flat").read_bytes(), "access_test.flat")
    assert k.end == 0x103D088                        # measured: 16.24 MiB
    assert 16 * MiB < k.end < 17 * MiB


def test_a_kernel_loading_over_the_boot_information_is_refused():
    low = load_multiboot(make_elf([(0x8000, CODE, 0x3000)], entry=0x8000), "low.elf")
    with pytest.raises(HvError, match=r"low.elf loads over \[0x9000, 0x9558\)"):
        build_boot_info(low, 4 * MiB, "low.elf", [])


# --- load_flat: a flat image by its a.out kludge (flags bit 16, §3.1.3) ------------------

AOUT = 1 << 16


def kludge(header=0x100000, load=0x100000, load_end=0, bss_end=0, entry=0x100020,
           flags=AOUT) -> bytes:
    """A multiboot header with the a.out kludge's five addresses."""
    return mb_header(flags) + struct.pack("<5I", header, load, load_end, bss_end, entry)


def flat_refusal(data: bytes, what: str = "k.bin") -> str:
    with pytest.raises(HvError) as e:
        load_flat(data, what)
    text = str(e.value)
    assert text.startswith(what) and "\n" not in text
    return text


def test_a_flat_image_loads_where_its_header_says():
    image = kludge(bss_end=0x103000) + b"\xf4" * 32         # the code at 0x100020
    k = load_flat(image, "k.bin", {"start": 0x100020})
    assert k == Kernel("k.bin", 0x100020, (Segment(0x100000, image, 0x3000),),
                       {"start": 0x100020}, AOUT)
    assert k.end == 0x103000                        # the BSS counts, though not in the file


def test_load_addr_and_load_end_addr_pick_the_bytes():
    # The header at file offset 16 and load_addr = header_addr - 8: loading
    # starts at file offset 8; load_end_addr leaves the last 4 bytes out.
    body = kludge(header=0x200010, load=0x200008, load_end=0x20003C, entry=0x200030)
    image = b"skipskip" + b"loadload" + body + b"\x90" * 12 + b"tail"
    assert find_header(image) == 16
    k = load_flat(image, "k.bin")
    assert k.segments == (Segment(0x200008, image[8:-4], 0x34),) and k.entry == 0x200030


def test_a_flat_image_without_a_header_is_no_kernel():
    assert load_flat(b"\x90" * 64, "k.bin") is None
    assert load_flat(mb_header(AOUT, checksum=1) + bytes(20), "k.bin") is None    # bad checksum
    assert find_header(bytes(8192) + kludge()) is None          # beyond the first 8 KiB


@pytest.mark.parametrize("image, message", [
    (mb_header(0) + bytes(20),
     "k.bin has a multiboot header (at offset 0x0) without load addresses: a kernel that is "
     "no ELF needs the a.out kludge (flags bit 16)"),
    (kludge()[:24],
     "k.bin's multiboot header at offset 0x0 is cut short: flags bit 16 needs its 5 address "
     "fields"),
    (kludge(load=0x100004),
     "k.bin's multiboot header has load_addr 0x100004 above header_addr 0x100000: the header "
     "must be loaded"),
    (kludge(load=0xFF000),
     "k.bin's multiboot header puts load_addr 0xff000 4096 bytes before the file's first byte "
     "(header_addr 0x100000, at offset 0x0)"),
    (kludge(load_end=0x100000),
     "k.bin's multiboot header has load_end_addr 0x100000 at or below header_addr 0x100000: "
     "the header must be loaded"),
    (kludge(load_end=0x100040),
     "k.bin's multiboot header has load_end_addr 0x100040 past the file's end (64 bytes from "
     "load_addr; the file has 32)"),
    (kludge(bss_end=0x100010),
     "k.bin's multiboot header has bss_end_addr 0x100010 below load_end_addr 0x100020"),
    (kludge(entry=0x100020),
     "k.bin's multiboot header has entry_addr 0x100020 outside the loaded bytes "
     "[0x100000, 0x100020)"),
    (kludge(header=0xFFFFFFF0, load=0xFFFFFFF0, entry=0xFFFFFFF0),
     "k.bin loads above 4 GiB (a segment at 0xfffffff0..0x100000010): a multiboot kernel "
     "starts with paging off"),
    (kludge(flags=AOUT | 1 << 3)[:12] + bytes(20),
     "k.bin requires multiboot features hv does not provide (header flags 0x10008: unknown "
     "required bits 0x8)"),
])
def test_bad_load_addresses_are_refused_in_one_line(image, message):
    assert flat_refusal(image) == message


def test_an_elf_is_loaded_by_its_headers_not_by_the_kludge():
    # bit 16 with addresses that would not load: an ELF ignores them (GRUB Legacy's rule)
    elf = make_elf([(0x100000, kludge(load=0x100004) + b"\xf4", 33)])
    assert load_multiboot(elf, "k.elf").segments[0].paddr == 0x100000
