"""hv.asm: keystone with its output checked, GNU as as the oracle."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_64, Cs
from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, Ks

import hv.asm
from hv.asm import (Image, Symbols, assemble_file, assemble_source, describe_insn, disassemble,
                    listing)
from hv.errors import AsmError, HvError

BASE = 0x100000
FIXTURES = Path(__file__).parent / "asm_fixtures"
HAVE_BINUTILS = all(shutil.which(tool) for tool in ("as", "ld", "objcopy"))
needs_gnu_as = pytest.mark.skipif(
    not HAVE_BINUTILS, reason="GNU binutils (as, ld, objcopy) not installed: they are the oracle")


def gnu_as(tmp_path: Path, source: str, base: int = BASE, bits: int = 64) -> bytes:
    """The flat binary GNU as + ld make of `source` (Intel syntax) at `base`,
    as `bits`-bit code."""
    src, obj, elf, flat = (tmp_path / f"oracle.{ext}" for ext in ("s", "o", "elf", "bin"))
    src.write_text(f".intel_syntax noprefix\n.code{bits}\n" + source + "\n")
    wide = bits == 64
    for cmd in (["as", "--64" if wide else "--32", "-o", obj, src],
                ["ld", "-m", "elf_x86_64" if wide else "elf_i386", f"-Ttext={base:#x}",
                 "-o", elf, obj],
                ["objcopy", "-O", "binary", "-j", ".text", elf, flat]):
        subprocess.run(cmd, check=True, capture_output=True)
    return flat.read_bytes()


def first_difference(image: Image, expected: bytes) -> str:
    """The first statement whose bytes differ, for a readable failure."""
    ends = [address - image.base for address, *_ in image.source_map[1:]] + [len(image.code)]
    for (address, file, line, statement), end in zip(image.source_map, ends):
        start = address - image.base
        ours, theirs = image.code[start:end], expected[start:end]
        if ours != theirs:
            return f"{file}:{line}: {statement}: ours {ours.hex(' ')} / GNU as {theirs.hex(' ')}"
    return f"lengths {len(image.code)} / {len(expected)}"


def decoded(code: bytes, address: int = BASE) -> list[str]:
    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    return [f"{i.mnemonic} {i.op_str}".strip() for i in cs.disasm(code, address)]


def error_of(text: str, name: str = "t.s", **kwargs) -> str:
    with pytest.raises(AsmError) as info:
        assemble_source(text, name, **kwargs)
    return str(info.value)


# --- encodings, checked against GNU as -------------------------------------------

@needs_gnu_as
def test_kernel_corpus_matches_gnu_as(tmp_path):
    source = (FIXTURES / "kernel.s").read_text()
    image = assemble_source(source, "kernel.s")
    expected = gnu_as(tmp_path, source)
    assert image.code == expected, first_difference(image, expected)


@needs_gnu_as
@pytest.mark.parametrize("line", [
    "mov rbx, [0x300000]",              # keystone alone: [rip + 0x300000]
    "mov rax, [0x300000]",              # keystone alone: moffs (48 a1)
    "mov [0x300008], r12",
    "mov qword ptr [0x300010], 5",
    "mov rax, qword ptr fs:[0x28]",
    "invlpg [0x300000]",
    "jmp qword ptr [0x300000]",
    "mov rax, [0xffffffff80001000]",    # sign-extended disp32
    "mov rax, [rbx + rsp]",             # keystone alone: [rbx]
    "mov rcx, [rbx*8 + 0x300000]",
    "pushf",                            # keystone alone: 66 9c, a 16-bit push
    "popf",
    "xlat",
    "movabs rax, [0x1122334455667788]",
    "mov rax, [0x80000000]",            # only the accumulator reaches 64-bit addresses
    "mov rax, 0xffffffff",
    "and rax, -4096",
    "shl rax",
    "push -0x81",
    "xchg rax, rbx",
    # A constant is a plain displacement (GNU as agrees when a, b come first;
    # for forward ones it makes `(b - a) - next_ip`, hv stays consistent).
    "a: nop\nb: nop\nlea rax, [rip + (b - a)]",
    "lea rax, [rip + b + 1]\nb: nop",               # an address: relative to next insn
])
def test_single_statements_match_gnu_as(tmp_path, line):
    assert assemble_source(line).code == gnu_as(tmp_path, line)


@needs_gnu_as
def test_data_directives_match_gnu_as(tmp_path):
    source = r"""
here:
    .byte 1, 0xff, -1, 'A', '\n', ';', '#'
    .word 0xffff, -2
    .short 3
    .hword 4
    .long 0xffffffff, here
    .int -7 / 2, -7 % 2
    .quad here + 8, 0x8000000000000000
    .ascii "a;b#c", "tab\there\x41\101\"q\\"
    .asciz "nul"
    .string "s"
    .balign 8, 0xcc
    .p2align 4, 0
    .zero 3
    .skip 2, 0xaa
    .space 2
    .fill 3, 2, 0x1234
    .fill 2, 8, 0x12345678
SIZE = . - here
.equ TWICE, SIZE * 2
.set THRICE, SIZE * 3
    .quad SIZE, TWICE, THRICE, (1 << 3) + 1, 1 | 6, 6 & 3, 5 ^ 1, ~0
"""
    image = assemble_source(source)
    expected = gnu_as(tmp_path, source)
    assert image.code == expected, first_difference(image, expected)


@needs_gnu_as
def test_jump_sizes_settle_like_gnu_as(tmp_path):
    # Forward jumps start short and grow. Each `jz` below is just out of
    # short range once the ones before it have grown (and just in range
    # while they have not), so sizes must be re-estimated as code moves.
    source = "\n".join([f"    jz end{i}" for i in range(30)]
                       + ["    .fill 70, 1, 0x90"]
                       + [f"end{i}:\n    jmp start{i}\nstart{i}:" for i in range(30)]
                       + ["    jmp .", "back: nop", "    .fill 120, 1, 0x90", "    jnz back"])
    image = assemble_source(source)
    expected = gnu_as(tmp_path, source)
    assert image.code == expected, first_difference(image, expected)
    assert decoded(image.code[:6]) == [f"je {image.symbols['end0']:#x}"]      # near: 0f 84


def test_jump_short_and_near():
    image = assemble_source("top:\n jmp fwd\n jmp far\nfwd: .fill 200, 1, 0x90\nfar: jmp top")
    assert image.code[:2] == bytes.fromhex("eb 05")                    # to fwd: short
    assert image.code[2:7] == bytes.fromhex("e9 c8 00 00 00")          # over 200 bytes: near
    assert decoded(image.code[207:], BASE + 207) == ["jmp 0x100000"]


# --- keystone's mis-encodings -------------------------------------------------------

def test_absolute_operand_is_encoded_with_sib_not_rip():
    code = assemble_source("mov rbx, [0x300000]").code
    assert code == bytes.fromhex("48 8b 1c 25 00 00 30 00")     # what GNU as emits
    assert decoded(code) == ["mov rbx, qword ptr [0x300000]"]


def test_riz_plus_x_is_the_absolute_address_not_rsp():
    code = assemble_source("mov rax, [riz + 0x300000]").code
    assert code == assemble_source("mov rax, [0x300000]").code
    assert decoded(code) == ["mov rax, qword ptr [0x300000]"]


def test_label_expressions_keep_their_offset():
    # keystone alone drops the `+ 8` of `label + 8`.
    image = assemble_source("mov rax, data + 8\nmov rbx, offset data - 1\ndata: .quad 0")
    data = image.symbols["data"]
    assert decoded(image.code[:14]) == [f"mov rax, {data + 8:#x}", f"mov rbx, {data - 1:#x}"]


@pytest.mark.parametrize("line, produced", [
    ("mov rax, [rbx + 0x80000000]", "mov rax, qword ptr [rbx - 0x80000000]"),
    ("push 0xffff", "push -1"),
    ("push 0x80000000", "push 0"),
    ("mov eax, 0x1ffffffff", "mov eax, 0xffffffff"),
    ("mov al, 0x1ff", "mov al, 0xff"),
    ("mov rax, [rsp*2]", "mov rax, qword ptr [riz*2]"),
    ("mov eax, [eip + 0x10]", "mov eax, dword ptr [rax + 0x10]"),
    ("jmp 0x100000000", "jmp 0"),
])
def test_silent_mis_encodings_are_rejected(line, produced):
    assert error_of(line) == f"t.s:1: keystone mis-encodes this as '{produced}': {line}"


def test_absolute_address_beyond_disp32_is_rejected():
    assert error_of("nop\nmov rbx, [0x80000000]") == (
        "t.s:2: absolute address 0x80000000 does not fit in a sign-extended 32-bit "
        "displacement (only movabs with al/ax/eax/rax takes a 64-bit address): mov rbx, [0x80000000]")


@pytest.mark.parametrize("line, hint", [
    ("iret", "iretq (64-bit frame) or iretd"),
    ("sysret", "sysretq"),
])
def test_ambiguous_operand_size_is_rejected(line, hint):
    assert error_of(line) == f"t.s:1: ambiguous operand size; write {hint}: {line}"


def test_precedence_that_gnu_as_and_keystone_disagree_on_is_rejected():
    message = "operator precedence differs between GNU as and keystone here; add parentheses"
    assert error_of("mov eax, 1 << 3 + 1") == f"t.s:1: {message}: mov eax, 1 << 3 + 1"
    assert error_of(".long 1 | 2 + 3") == f"t.s:1: {message}: .long 1 | 2 + 3"
    assert assemble_source("mov eax, (1 << 3) + 1").code == bytes.fromhex("b8 09 00 00 00")


# --- errors name file:line: message: statement ----------------------------------------

@pytest.mark.parametrize("line, message", [
    ("foo rax", "unknown mnemonic"),
    ("mov rax, [rbx+", "invalid operand"),
    ("mov rax, [rbx + rcx*3]", "invalid operand"),
    ("mov rax, qword ptr x", "invalid operand"),
    ("mov [rax], 1", "invalid operand"),
    ("jmp nowhere", "undefined symbol 'nowhere'"),
    ("mov rax, [rip + nowhere]", "undefined symbol 'nowhere'"),
    (".section .data", "'.section' is not supported: a guest image is one flat section "
                       "(keystone silently ignores it)"),
    (".data", "'.data' is not supported: a guest image is one flat section "
              "(keystone silently ignores it)"),
    ('.incbin "missing.bin"', "'.incbin' is not supported (keystone silently ignores it); "
                              "put the bytes in with .byte"),
    (".org 0x10", "'.org' is not supported; use .skip or .fill, or .align, to place data"),
    (".macro m", "unsupported directive '.macro'"),
    (".code8", "unsupported directive '.code8'"),
    (".code32 x", "'.code32' takes no arguments"),
    (".byte 0x300", "value 0x300 does not fit in 1 byte(s)"),
    (".word 0x12345", "value 0x12345 does not fit in 2 byte(s)"),    # keystone: emits nothing
    (".align 3", "alignment must be a power of two"),
    ("rep", "a prefix needs its instruction on the same line"),
    ("push eax", "instruction not available in 64-bit mode"),
])
def test_error_names_file_line_and_statement(tmp_path, line, message):
    path = tmp_path / "guest.s"
    path.write_text(f"start:\n    nop   ; fine\n    {line}   # the bad one\n    hlt\n")
    with pytest.raises(AsmError) as info:
        assemble_file(path)
    assert str(info.value) == f"{path}:3: {message}: {line}"
    assert (info.value.file, info.value.line) == (str(path), 3)


def test_incbin_of_an_existing_file_is_rejected_too(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x01\x02")
    path = tmp_path / "guest.s"
    path.write_text('.incbin "blob.bin"\n')
    with pytest.raises(AsmError, match=r"guest\.s:1: '\.incbin' is not supported"):
        assemble_file(path)


def test_error_inside_included_file_points_into_it(tmp_path):
    (tmp_path / "lib.s").write_text("lib_entry:\n    ret\n    mov rax, [rbx+\n")
    main = tmp_path / "main.s"
    main.write_text('.include "lib.s"\n    hlt\n')
    with pytest.raises(AsmError) as info:
        assemble_file(main)
    assert str(info.value) == f"{tmp_path / 'lib.s'}:3: invalid operand: mov rax, [rbx+"


def test_duplicate_label_and_register_named_label():
    assert error_of("x: nop\nx: nop") == "t.s:2: symbol 'x' is already defined: x:"
    assert error_of("rax: nop") == "t.s:1: 'rax' is a register name: rax: nop"


def test_asm_error_is_an_hv_error():
    with pytest.raises(HvError):
        assemble_source("foo")


def test_missing_source_file(tmp_path):
    with pytest.raises(AsmError, match="cannot read source"):
        assemble_file(tmp_path / "absent.s")


# --- includes -----------------------------------------------------------------------

def test_include_relative_to_including_file_then_asm_lib(tmp_path, monkeypatch):
    lib = tmp_path / "asmlib"
    (tmp_path / "guests" / "sub").mkdir(parents=True)
    lib.mkdir()
    (lib / "serial.s").write_text("serial_out:\n    out dx, al\n    ret\n")
    (lib / "both.s").write_text("    ud2\n")                         # shadowed by guests/both.s
    (tmp_path / "guests" / "both.s").write_text("    int3\n")
    (tmp_path / "guests" / "sub" / "inner.s").write_text('inner:\n    .include "leaf.s"\n')
    (tmp_path / "guests" / "sub" / "leaf.s").write_text("    cpuid\n")     # nested, own folder
    main = tmp_path / "guests" / "main.s"
    main.write_text('.include "serial.s"\n.include "both.s"\n.include "sub/inner.s"\n    hlt\n')
    monkeypatch.setattr(hv.asm, "asm_lib_dir", lambda: lib)

    image = assemble_file(main)

    assert decoded(image.code) == ["out dx, al", "ret", "int3", "cpuid", "hlt"]
    assert image.symbols == {"serial_out": BASE, "inner": BASE + 3}
    assert [(f, line) for _, f, line, _ in image.source_map] == [
        (str(lib / "serial.s"), 2), (str(lib / "serial.s"), 3),
        (str(main.parent / "both.s"), 1), (str(main.parent / "sub" / "leaf.s"), 1), (str(main), 4)]


def test_include_dirs_replace_the_asm_lib(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "x.s").write_text("    nop\n")
    assert assemble_source('.include "x.s"', include_dirs=[extra]).code == b"\x90"
    assert assemble_source('.include "x.s"', include_dirs=[str(extra)]).code == b"\x90"


def test_include_cycle(tmp_path):
    (tmp_path / "a.s").write_text('.include "b.s"\n')
    (tmp_path / "b.s").write_text('    nop\n.include "a.s"\n')
    with pytest.raises(AsmError) as info:
        assemble_file(tmp_path / "a.s")
    assert str(info.value) == f'{tmp_path / "b.s"}:2: include cycle: a.s -> b.s -> a.s: .include "a.s"'


def test_missing_include(tmp_path):
    main = tmp_path / "main.s"
    main.write_text('    nop\n.include "nope.s"\n')
    with pytest.raises(AsmError) as info:
        assemble_file(main, include_dirs=[tmp_path / "lib"])
    assert str(info.value) == (f'{main}:2: include file "nope.s" not found '
                               f'(looked in {tmp_path}, {tmp_path / "lib"}): .include "nope.s"')


def test_include_needs_quotes():
    assert error_of(".include lib.s") == "t.s:1: .include needs a quoted file name: .include lib.s"


# --- symbols, source map, comments ------------------------------------------------------

def test_symbols_and_source_map():
    image = assemble_source(
        "start:  mov rax, 1      ; set\n"
        "        jmp done        # skip\n"
        "LIMIT = 4\n"
        "table:  .quad start, LIMIT\n"
        ".equ ONE, 1\n"
        "done:   hlt\n", "k.s", base=0x200000)
    assert image.base == 0x200000
    assert image.symbols == {"start": 0x200000, "table": 0x200009, "done": 0x200019}
    assert image.source_map == (
        (0x200000, "k.s", 1, "mov rax, 1"),
        (0x200007, "k.s", 2, "jmp done"),
        (0x200009, "k.s", 4, ".quad start, LIMIT"),
        (0x200019, "k.s", 6, "hlt"),
    )
    assert image.code[9:25] == (0x200000).to_bytes(8, "little") + (4).to_bytes(8, "little")


def test_comment_characters_inside_strings_and_chars():
    image = assemble_source(".ascii \"a;b#c\"   ; comment\nmov al, ';'  # comment\nmov bl, '#'")
    assert image.code == b"a;b#c" + bytes.fromhex("b0 3b b3 23")


def test_harmless_directives_are_accepted():
    image = assemble_source(".intel_syntax noprefix\n.text\n.code64\n.globl f\n.global f\nf: ret")
    assert image.code == b"\xc3" and image.symbols == {"f": BASE}


def test_align_pads_with_nops_or_the_fill_byte():
    assert assemble_source("ret\n.align 4").code == b"\xc3\x90\x90\x90"
    assert assemble_source("ret\n.balign 4, 0").code == b"\xc3\0\0\0"
    assert assemble_source("ret\n.p2align 3, 0xcc").code == b"\xc3" + b"\xcc" * 7


# --- disassembly --------------------------------------------------------------------------

def test_disassemble_tolerates_trailing_data():
    image = assemble_source("mov rax, 1\nhlt\n.byte 0xff, 0xff, 0x48")
    assert disassemble(image.code, image.base) == [
        "0x100000:  48 c7 c0 01 00 00 00   mov rax, 1",
        "0x100007:  f4                     hlt",
        "0x100008:  ff                     .byte 0xff",
        "0x100009:  ff                     .byte 0xff",
        "0x10000a:  48                     .byte 0x48",
    ]


def test_disassemble_with_symbols_heads_labels_restarts_at_them_and_names_targets():
    image = assemble_source(
        "main:   lea rsi, [rip + data]\n"
        "        call f\n"
        "        jmp main\n"
        "data:   .byte 0xb8\n"            # mov eax, imm32: without labels it swallows f
        "f:      ret\n"
        "        nop\n        nop\n        nop\n        nop\n", "k.s")
    assert disassemble(image.code, image.base, image.symbols) == [
        "0x100000 <main>:",
        "0x100000:  48 8d 35 07 00 00 00   lea rsi, [rip + 7]  ; 0x10000e <data>",
        "0x100007:  e8 03 00 00 00         call 0x10000f <f>",
        "0x10000c:  eb f2                  jmp 0x100000 <main>",
        "0x10000e <data>:",
        "0x10000e:  b8                     .byte 0xb8",
        "0x10000f <f>:",
        "0x10000f:  c3                     ret",
        "0x100010:  90                     nop",
        "0x100011:  90                     nop",
        "0x100012:  90                     nop",
        "0x100013:  90                     nop",
    ]
    # Without them, as before: plain addresses, and the data runs into f.
    plain = disassemble(image.code, image.base)
    assert plain[3] == "0x10000e:  b8 c3 90 90 90         mov eax, 0x909090c3"
    assert "<" not in "".join(plain)


def test_symbols_name_addresses_by_the_label_at_or_before_them():
    image = assemble_source("a:\nb:     nop\n        nop\nc:     hlt\nend:\n", "k.s")
    names = Symbols.of(image)
    assert names.name(BASE) == "a"              # two labels at one address: the first
    assert names.name(BASE + 1) == "a+0x1"
    assert names.name(BASE + 2) == "c"
    assert names.name(BASE - 1) is None         # before the first label
    assert names.name(BASE + 3) is None         # past the image (`end` names nothing in it)
    assert names.at(BASE + 1) == "0x100001 <a+0x1>" and names.at(0x5000) == "0x5000"
    assert Symbols({}, BASE, BASE + 3).at(BASE) == "0x100000"     # a .bin: no labels


def test_listing_shows_address_bytes_file_line_and_labels():
    image = assemble_source(
        "start:  mov rax, 1\n"
        "        jmp done\n"
        "table:  .quad start, 4\n"
        "        .fill 20, 1, 0xab\n"
        "done:   hlt\n"
        "end:\n", "k.s")
    assert listing(image) == [
        "0x100000                                    start:",
        "0x100000    48 c7 c0 01 00 00 00     k.s:1      mov rax, 1",
        "0x100007    eb 24                    k.s:2      jmp done",
        "0x100009                                    table:",
        "0x100009    00 00 10 00 00 00 00 00  k.s:3      .quad start, 4",
        "            04 00 00 00 00 00 00 00",
        "0x100019    ab ab ab ab ab ab ab ab  k.s:4      .fill 20, 1, 0xab",
        "            ... 20 bytes",
        "0x10002d                                    done:",
        "0x10002d    f4                       k.s:5      hlt",
        "0x10002e                                    end:",
    ]


def test_describe_insn():
    assert describe_insn(bytes.fromhex("48 8b 03 90"), 0x1000) == "mov rax, qword ptr [rbx]"
    assert describe_insn(bytes.fromhex("f4"), 0x1000) == "hlt"
    assert describe_insn(bytes.fromhex("ff ff"), 0x1000) == "(bytes ff ff)"
    assert describe_insn(b"", 0x1000) == "(no bytes)"


# --- .code16 and .code32 ------------------------------------------------------------------

# Statements a multiboot kernel's way to long mode needs, in the code size
# each runs at; hv's bytes must be GNU as's. Some are keystone's mistakes
# put right (the next test pins keystone itself).
CODE32 = [
    "cmp eax, 0x2badb002", "mov esp, 0x9f000", "mov eax, [0xfee00020]",
    "mov dword ptr [0xfee000f0], 0x1ff", "mov eax, [ebx + 0x80000000]",
    "mov eax, [ebx + esp]", "lea esi, [ebx + 4*ecx + 8]", "mov [edi + 4], eax",
    "mov ax, 0x10", "mov ax, ds", "movzx eax, word ptr [esi]",
    "mov eax, cr4", "or eax, 0x20", "mov cr4, eax", "mov cr3, eax", "mov cr0, eax",
    "mov ecx, 0xc0000080", "rdmsr", "bts eax, 8", "wrmsr",
    "lgdt [0x101000]", "lidt [0x101000]", "sgdt [0x101000]", "lgdt [ebx + 0x10]",
    "jmp 0x08:0x100100", "ljmp 0x08:0x100100",
    "pushf", "popf", "pushfd", "iret", "iretd", "retf", "lret", "xlat",
    "rep stosd", "rep movsb", "lock xadd [0x100200], eax", "push eax", "pop ebx",
    "out dx, al", "in al, dx", "call 0x100000", "ret", "ret 4", "xchg eax, ebx",
    "cbw", "cwd", "cwde", "cdq", "pushad", "popad", "movsw", "stosw", "in ax, dx",
    "a: nop\njz a\njmp a",
]
CODE16 = [
    "cli", "xor ax, ax", "mov ds, ax", "mov ax, cs", "mov ss, ax", "mov sp, 0x7000",
    "lgdt [0x20]", "lidt [0x20]", "mov eax, cr0", "or eax, 1", "mov cr0, eax",
    "mov ecx, 0xc0000080", "mov cr3, eax", "jmp 0x18:0x8010", "ljmpd 0x18:0x100100",
    "ret", "retf", "iret", "pushf", "popf",
    "mov ax, [0x20]", "mov eax, [0x20]", "mov ax, [bx + si]", "mov ax, [bp]",
    "mov eax, [ebx]", "mov ax, word ptr cs:[0x20]", "lock inc word ptr [0x40]",
    "movzx eax, word ptr [0x20]", "mov word ptr [bx], 5", "push cs", "pop ds",
    "cbw", "cwd", "cwde", "cdq", "pushfd", "popfd", "iretd", "pushad", "stosd", "lodsd",
    "retf 4", "ret 4",
    "a: nop\njz a\njmp a",
]


@needs_gnu_as
@pytest.mark.parametrize("bits, line", [(32, line) for line in CODE32] + [(16, line) for line in CODE16])
def test_16_and_32_bit_statements_match_gnu_as(tmp_path, bits, line):
    assert assemble_source(f".code{bits}\n{line}").code == gnu_as(tmp_path, line, bits=bits)


@pytest.mark.parametrize("bits, line, alone, ours", [
    # An operand-size prefix no operand asks for: a 16-bit LGDT loads a
    # 24-bit base, a 16-bit PUSHF pushes 2 bytes, a 32-bit RET pops 4.
    (32, "lgdt [0x101000]", "66 0f 01 15 00 10 10 00", "0f 01 15 00 10 10 00"),
    (32, "lidt [0x101000]", "66 0f 01 1d 00 10 10 00", "0f 01 1d 00 10 10 00"),
    (32, "pushf", "66 9c", "9c"),
    (32, "iret", "66 cf", "cf"),
    (16, "ret", "66 c3", "c3"),
    (16, "retf", "66 cb", "cb"),
    # A direct far jump is always a 16-bit one: offset 0x100100 becomes 0x100.
    (32, "ljmp 0x8:0x100100", "66 ea 00 01 08 00", "ea 00 01 10 00 08 00"),
    (16, "ljmp 0x18:0x100100", "ea 00 01 18 00", None),
])
def test_keystone_alone_in_16_and_32_bit_code(bits, line, alone, ours):
    """What keystone 0.9.2 makes of these by itself, and what hv makes."""
    ks = Ks(KS_ARCH_X86, {16: KS_MODE_16, 32: KS_MODE_32}[bits])
    assert bytes(ks.asm(line, BASE)[0]) == bytes.fromhex(alone)
    if ours is None:
        assert "does not fit in 16 bits" in error_of(f".code{bits}\n{line}")
    else:
        assert assemble_source(f".code{bits}\n{line}").code == bytes.fromhex(ours)


def test_capstone_names_cbw_and_cwd_as_if_in_32_bit_code_in_16_bit_code():
    """capstone 5 decodes 98 and 99 in 16-bit code as cwde and cdq (which
    need 66 there); hv reads them as cbw and cwd."""
    cs = Cs(CS_ARCH_X86, CS_MODE_16)
    assert [i.mnemonic for i in cs.disasm(bytes.fromhex("98 99 66 98 66 99"), 0)] == [
        "cwde", "cdq", "cwde", "cdq"]
    assert assemble_source(".code16\ncbw\ncwd\ncwde\ncdq").code == bytes.fromhex("98 99 66 98 66 99")


@pytest.mark.parametrize("source, message", [
    # keystone makes every 16-bit near branch a 32-bit one (66 e9 rel32)
    (".code16\njmp far\n.fill 200, 1, 0x90\nfar: nop",
     "keystone mis-encodes this as 'jmp 0x1000ce' with a 32-bit operand size "
     "(66 e9 c8 00 00 00); in .code16 only short branches (within 127 bytes) are encoded "
     "right: jmp far"),
    (".code16\ncall 0x100000",
     "keystone mis-encodes this as 'call 0x100000' with a 32-bit operand size "
     "(66 e8 fa ff ff ff); in .code16 only short branches (within 127 bytes) are encoded "
     "right: call 0x100000"),
    # and truncates a 16-bit address
    (".code16\nmov ax, [0x12345]", "keystone mis-encodes this as 'mov ax, word ptr [0x2345]': "
                                    "mov ax, [0x12345]"),
    (".code32\npush 0xffff", "keystone mis-encodes this as 'push -1': push 0xffff"),
    (".code32\nmov rax, 1", "register 'rax' exists only in 64-bit code (.code64): mov rax, 1"),
    (".code16\nmov eax, [rip + 4]",
     "register 'rip' exists only in 64-bit code (.code64): mov eax, [rip + 4]"),
    (".code32\nmov r8d, eax", "register 'r8d' exists only in 64-bit code (.code64): mov r8d, eax"),
    ("jmp 0x08:0x100000", "no direct far jump in 64-bit code (use retfq, or jmp through "
                          "memory): jmp 0x08:0x100000"),
    (".code16\njmp 0x18:0x100100", "far jump offset 0x100100 does not fit in 16 bits; ljmpd "
                                   "takes a 32-bit one: jmp 0x18:0x100100"),
    (".code32\njmp 0x10000:0", "selector 0x10000 does not fit in 16 bits: jmp 0x10000:0"),
    (".code32\nljmpd 0x100000", "ljmpd takes SELECTOR:OFFSET: ljmpd 0x100000"),
])
def test_16_and_32_bit_code_errors_name_the_line(source, message):
    line = source.count("\n", 0, source.index(message.rsplit(": ", 1)[1])) + 1
    assert error_of(source) == f"t.s:{line}: {message}"


def test_code_size_holds_until_the_next_directive():
    image = assemble_source(".code32\nstart32: push eax\n.code16\npush eax\n.code64\npush rax\n"
                            "push rax")
    assert image.code == bytes.fromhex("50 66 50 50 50")
    assert assemble_source("push rax").code == bytes.fromhex("50")     # 64-bit by default


def test_far_jump_to_a_label_and_sse_in_32_bit_code():
    image = assemble_source(".code32\njmp 0x08:there\nmovdqa xmm0, [eax]\n.code64\nthere: nop")
    assert image.code == bytes.fromhex("ea 0b 00 10 00 08 00  66 0f 6f 00  90")


def test_disassemble_follows_the_code_size():
    image = assemble_source(".code32\nstart: jmp 0x08:next\n.code16\nmov ax, cs\n.code64\n"
                            "next: push rax")
    assert image.code_bits == ((BASE, 32), (BASE + 7, 16), (BASE + 9, 64))
    assert disassemble(image.code, BASE, image.symbols, image.code_bits) == [
        "0x100000 <start>:",
        "0x100000:  ea 09 00 10 00 08 00   ljmp 8:0x100009",
        "0x100007:  8c c8                  mov ax, cs",
        "0x100009 <next>:",
        "0x100009:  50                     push rax",
    ]
    assert assemble_source("nop\n.code64\nnop").code_bits == ()    # 64-bit throughout


# --- the cache of assembled images --------------------------------------------------------

def test_a_changed_include_is_assembled_again(tmp_path):
    """assemble_source keeps what it assembled; an included file that changed
    since is read again."""
    (tmp_path / "inc.s").write_text("    mov eax, 1\n")
    main = tmp_path / "main.s"
    main.write_text('.include "inc.s"\n    hlt\n')
    first = assemble_file(main)
    assert assemble_file(main) is first                 # kept
    (tmp_path / "inc.s").write_text("    mov eax, 2\n    nop\n")
    again = assemble_file(main)
    assert again is not first and again.code != first.code
