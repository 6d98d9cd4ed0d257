"""Guest assembler: keystone Intel syntax in, a flat binary image out.

keystone 0.9.2 cannot be trusted on its own (tests/test_asm.py pins it):
it reports no line numbers, silently ignores or mis-handles some directives,
mangles expressions that contain symbols (``mov rax, sym + 8`` loses the
``+ 8``), and silently mis-encodes some operands (``[0x300000]`` becomes
``[rip + 0x300000]``, ``[rbx + rsp]`` becomes ``[rbx]``, ``pushf`` becomes a
16-bit push). So hv uses keystone only to encode one instruction at a time:

* hv reads the sources itself: ``.include``, comments, labels, directives and
  data, so every byte is tied to its file and line;
* it evaluates every expression itself and hands keystone each instruction
  rewritten with plain numbers, in forms keystone is known to encode right;
* it decodes keystone's bytes with capstone and checks that every operand
  means what the source says; anything else is an AsmError at that line.

Layout takes several passes: an instruction's size can depend on a label
value (short or near jump), so passes repeat until every forward reference
was given the value the label ends up with.

Code is 64-bit unless ``.code32`` or ``.code16`` says otherwise (until the
next ``.codeNN``): keystone and capstone then work in that mode, and the
checks follow it. There an operand-size prefix (66) that no operand asks
for is a mismatch too, since keystone adds some (tests/test_asm.py pins
them): to ``lgdt`` and ``lidt`` in 32-bit code and to ``ret`` and ``retf``
in 16-bit code (a 24-bit GDT base, 4-byte return addresses), which hv
drops; to every 16-bit near branch (a 32-bit one), which hv refuses, so
16-bit code has short branches only (within 127 bytes). keystone makes every
direct far jump (``jmp 0x08:label``) a 16-bit one, so hv encodes those
itself. A register only 64-bit code has is an error in the other two.

Symbols hold numbers, as keystone treats them: ``mov rax, label`` loads the
address (``offset label`` is accepted too); GNU as would load from memory
there, so write ``[label]`` for a memory operand.
"""
from __future__ import annotations

import bisect
import functools
import operator
import re
from dataclasses import dataclass, replace
from pathlib import Path

from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs
from capstone import x86 as csx86
from keystone import (
    KS_ARCH_X86,
    KS_ERR_ASM_FIXUP_INVALID,
    KS_ERR_ASM_INVALIDOPERAND,
    KS_ERR_ASM_MISSINGFEATURE,
    KS_ERR_ASM_MNEMONICFAIL,
    KS_MODE_16,
    KS_MODE_32,
    KS_MODE_64,
    Ks,
    KsError,
)

from hv.errors import AsmError
from hv.paths import asm_lib_dir

DEFAULT_BASE = 0x100000
_MAX_PASSES = 16


# --- public API ---------------------------------------------------------------

@dataclass(frozen=True)
class Image:
    """An assembled guest: its bytes and where each came from."""
    code: bytes                 # flat binary, loaded at `base`
    base: int
    symbols: dict[str, int]     # label -> absolute address
    source_map: tuple           # (address, file, line, statement), sorted by address
    code_bits: tuple = ()       # (address, 16, 32 or 64): where .codeNN changed the code size


def assemble_file(path, base=DEFAULT_BASE, include_dirs=None) -> Image:
    path = Path(path)
    try:
        text = _source_text(path)
    except ValueError as e:
        raise AsmError(str(e), str(path)) from None
    return assemble_source(text, str(path), base, include_dirs)


def _source_text(path: Path) -> str:
    """A source file's text; ValueError says why there is none."""
    try:
        return path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read source: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError("not a source: not UTF-8 text") from None


def assemble_source(text: str, name="<inline>", base=DEFAULT_BASE, include_dirs=None) -> Image:
    """Assemble `text`; `name` is the file name errors and the source map use.

    `.include "f"` looks in the including file's folder first (none for an
    inline `<name>`), then in `include_dirs` (default: the asm/ library).
    """
    search = [Path(d) for d in include_dirs] if include_dirs is not None else [asm_lib_dir()]
    key = (text, name, base, tuple(search))
    hit = _ASSEMBLED.get(key)
    if hit is not None and all(_stamp(path) == stamp for path, stamp in hit[1]):
        return hit[0]
    chain = () if name.startswith("<") else (Path(name).resolve(),)
    included: list[Path] = []
    statements = _code_sizes([st for src in _read(text, name, search, chain, included)
                              for st in _parse_line(src)])
    final = _layout(statements, base)
    if not final.code:
        raise AsmError("no code: the source assembles to 0 bytes", name)
    for insn, address, code, operands in final.checks:
        insn.verify(address, code, operands)
    image = Image(bytes(final.code), base, final.labels, tuple(final.source_map),
                  tuple(final.code_bits))
    if len(_ASSEMBLED) >= 256:
        _ASSEMBLED.clear()
    _ASSEMBLED[key] = (image, tuple((path, _stamp(path)) for path in included))
    return image


# Images already assembled in this process, with the files they included and
# their stamps: assembling takes a keystone call per instruction, and
# hv compare or a test file runs the same guest many times.
_ASSEMBLED: dict[tuple, tuple[Image, tuple]] = {}


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Symbols:
    """Names addresses inside an image by its labels, as objdump does:
    `main`, `main+0x3`. An address outside the image has no name."""

    def __init__(self, labels: dict[str, int], start: int, end: int):
        first: dict[int, str] = {}
        for name, address in labels.items():     # in the order they are defined
            if start <= address < end:
                first.setdefault(address, name)
        self._addresses = sorted(first)
        self._names = [first[a] for a in self._addresses]
        self.end = end

    @classmethod
    def of(cls, image: Image) -> Symbols:
        return cls(image.symbols, image.base, image.base + len(image.code))

    def name(self, address: int) -> str | None:
        i = bisect.bisect_right(self._addresses, address) - 1
        if i < 0 or address >= self.end:
            return None
        offset = address - self._addresses[i]
        return self._names[i] if offset == 0 else f"{self._names[i]}+{offset:#x}"

    def at(self, address: int) -> str:
        """`0x100003 <main+0x3>`, or the plain address."""
        name = self.name(address)
        return f"{address:#x}" if name is None else f"{address:#x} <{name}>"


# A branch's target, and a RIP-relative operand, as capstone writes them.
_TARGET_RE = re.compile(r"0x[0-9a-f]+")
_RIP_RE = re.compile(r"\[rip ([+-]) (0x[0-9a-f]+|\d+)\]")


def disassemble(code: bytes, base=DEFAULT_BASE, symbols: dict[str, int] | None = None,
                code_bits=()) -> list[str]:
    """One line per instruction; bytes capstone cannot decode become `.byte`.
    With `symbols` (an Image's), each label heads the code it names,
    decoding starts again at every label (data before it is not run into
    its code), and branch targets and RIP-relative operands are named.
    `code_bits` (an Image's) says where the code is 16- or 32-bit."""
    symbols = symbols or {}
    names = Symbols(symbols, base, base + len(code))
    labels: dict[int, list[str]] = {}
    for name, address in symbols.items():
        if base <= address < base + len(code):
            labels.setdefault(address - base, []).append(name)
    changes = [(address - base, bits) for address, bits in code_bits]
    starts = sorted(labels.keys() | {0} | {offset for offset, _ in changes if offset < len(code)})
    lines = []
    for begin, end in zip(starts, starts[1:] + [len(code)]):
        lines += [f"{base + begin:#x} <{name}>:" for name in labels.get(begin, ())]
        bits = next((b for offset, b in reversed(changes) if offset <= begin), 64)
        offset = begin
        while offset < end:
            for address, size, mnemonic, op_str in _cs(bits).disasm_lite(code[offset:end],
                                                                          base + offset):
                if symbols:
                    op_str += _named_operand(names, address + size, mnemonic, op_str)
                lines.append(_listing(address, code[offset:offset + size], f"{mnemonic} {op_str}"))
                offset += size
            if offset < end:
                lines.append(_listing(base + offset, code[offset:offset + 1],
                                      f".byte {code[offset]:#04x}"))
                offset += 1
    return lines


def _named_operand(names: Symbols, next_address: int, mnemonic: str, op_str: str) -> str:
    """` <label+off>` after a branch target, `  ; 0x... <label>` after a
    RIP-relative operand (relative to the next instruction), or nothing."""
    if (mnemonic.startswith(("j", "loop")) or mnemonic in ("call", "xbegin")) \
            and _TARGET_RE.fullmatch(op_str):
        name = names.name(int(op_str, 16))
        return "" if name is None else f" <{name}>"
    m = _RIP_RE.search(op_str)
    if m:
        disp = int(m[2], 0)
        target = (next_address + (disp if m[1] == "+" else -disp)) & (2**64 - 1)
        if names.name(target) is not None:
            return f"  ; {names.at(target)}"
    return ""


def listing(image: Image) -> list[str]:
    """The assembled program as GNU as lists it: each statement's address,
    bytes (8 a line; of a longer run of data, the first 8 and its length)
    and file:line; labels on lines of their own."""
    labels = sorted(image.symbols.items(), key=lambda kv: kv[1])     # stable: definition order
    where = [f"{Path(file).name}:{line}" for _, file, line, _ in image.source_map]
    width = max(map(len, where), default=0)
    ends = [address for address, *_ in image.source_map[1:]] + [image.base + len(image.code)]

    def line(address, data: str, loc: str, text: str) -> str:
        at = "" if address is None else f"{address:#x}"
        return f"{at:<10}  {data:<23}  {loc:<{width}}  {text}".rstrip()

    lines = []
    for (address, _, _, text), loc, end in zip(image.source_map, where, ends):
        while labels and labels[0][1] <= address:
            name, at = labels.pop(0)
            lines.append(line(at, "", "", f"{name}:"))
        data = image.code[address - image.base:end - image.base]
        lines.append(line(address, data[:8].hex(" "), loc, "    " + text))
        if 8 < len(data) <= 16:
            lines.append(line(None, data[8:].hex(" "), "", ""))
        elif len(data) > 16:
            lines.append(line(None, f"... {len(data)} bytes", "", ""))
    lines += [line(at, "", "", f"{name}:") for name, at in labels]
    return lines


def describe_insn(code: bytes, address: int) -> str:
    """The instruction `code` starts with, as text, for crash reports."""
    for _, _, mnemonic, op_str in _cs().disasm_lite(code, address, 1):
        return f"{mnemonic} {op_str}".strip()
    return f"(bytes {code[:15].hex(' ')})" if code else "(no bytes)"


def _listing(address: int, data: bytes, text: str) -> str:
    return f"{address:#x}:  {data.hex(' '):<20}   {text.strip()}"


# --- engines, built once (creating them costs far more than using them) ------

# The code size (.code16, .code32, .code64) -> keystone's and capstone's mode.
_KS_MODES = {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}
_CS_MODES = {16: CS_MODE_16, 32: CS_MODE_32, 64: CS_MODE_64}


@functools.cache
def _ks(bits: int = 64) -> Ks:
    return Ks(KS_ARCH_X86, _KS_MODES[bits])


@functools.cache
def _cs(bits: int = 64) -> Cs:
    cs = Cs(CS_ARCH_X86, _CS_MODES[bits])
    cs.detail = True
    return cs


@functools.cache
def _registers() -> frozenset[str]:
    return frozenset(_cs().reg_name(r) for r in range(1, csx86.X86_REG_ENDING))


# --- reading sources ----------------------------------------------------------

class _Bad(Exception):
    """A problem with the statement being handled; its caller adds file:line."""


class _Ambiguous(_Bad):
    """An expression GNU as and keystone would read differently."""


@dataclass(frozen=True)
class _Source:
    file: str
    line: int
    text: str       # the statement as written, comment and labels removed

    def error(self, message: str) -> AsmError:
        return AsmError(message, self.file, self.line, self.text)


_INCLUDE_RE = re.compile(r"\.include\b\s*(.*)", re.I)


def _read(text, name, search, chain, included):
    """Yield every non-empty line of a source, includes expanded in place
    (each included file is appended to `included`)."""
    folder = None if name.startswith("<") else Path(name).parent
    for number, line in enumerate(text.splitlines(), 1):
        code = _strip_comment(line).strip()
        if not code:
            continue
        src = _Source(name, number, code)
        include = _INCLUDE_RE.fullmatch(code)
        if include:
            yield from _include(src, include[1], folder, search, chain, included)
        else:
            yield src


def _include(src, argument, folder, search, chain, included):
    quoted = re.fullmatch(r'"([^"]+)"', argument.strip())
    if not quoted:
        raise src.error(".include needs a quoted file name")
    dirs = ([folder] if folder else []) + search
    path = next((d / quoted[1] for d in dirs if (d / quoted[1]).is_file()), None)
    if path is None:
        looked = ", ".join(str(d) for d in dirs)
        raise src.error(f'include file "{quoted[1]}" not found (looked in {looked})')
    key = path.resolve()
    if key in chain:
        raise src.error("include cycle: " + " -> ".join(p.name for p in (*chain, key)))
    try:
        text = _source_text(path)
    except ValueError as e:
        raise src.error(f'include file "{quoted[1]}": {e}') from None
    included.append(path)
    yield from _read(text, str(path), search, (*chain, key), included)


def _outside_quotes(text: str):
    """(index, char) of every character not inside "strings" or 'c' characters."""
    quote, escaped = None, False
    for i, c in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        else:
            yield i, c


def _strip_comment(line: str) -> str:
    """Cut a `;` or `#` comment (GNU as would read `;` as a statement separator)."""
    for i, c in _outside_quotes(line):
        if c in ";#":
            return line[:i]
    return line


def _split_args(text: str) -> list[str]:
    """Split at top-level commas (not inside quotes, brackets or parentheses)."""
    parts, depth, start = [], 0, 0
    for i, c in _outside_quotes(text):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


_ESCAPES = {"n": 10, "t": 9, "r": 13, "b": 8, "f": 12, "v": 11, "a": 7, "\\": 92, '"': 34, "'": 39}
_ESCAPE_RE = re.compile(r"\\(?:x([0-9a-fA-F]+)|([0-7]{1,3})|(.))")


def _unescape(body: str) -> bytes:
    """GNU as string escapes: \\n \\t ..., \\ooo octal, \\x<hex digits> (low byte)."""
    out, pos = bytearray(), 0
    for m in _ESCAPE_RE.finditer(body):
        out += body[pos:m.start()].encode()
        hexa, octal, char = m.groups()
        if char is not None and char not in _ESCAPES:
            raise _Bad(f"unknown escape '\\{char}'")
        out.append(int(hexa, 16) & 0xFF if hexa else int(octal, 8) & 0xFF if octal else _ESCAPES[char])
        pos = m.end()
    return bytes(out + body[pos:].encode())


def _string(text: str) -> bytes:
    m = re.fullmatch(r'"((?:[^"\\]|\\.)*)"', text)
    if not m:
        raise _Bad("expected a quoted string")
    return _unescape(m[1])


# --- expressions --------------------------------------------------------------
# An expression is parsed once into a tree of tuples and evaluated in every
# pass. Evaluation gives (value, reloc): reloc counts labels (+1 each, -1 if
# subtracted), so `[rip + label]` (reloc 1) is relative to the next
# instruction while `[rip + end - start]` (reloc 0) is a plain displacement,
# as in GNU as. reloc is None where an operator other than + - touched a label.

_TOKEN_RE = re.compile(r"""\s*(?:
      (?P<num>0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH]|[0-9]+)
    | '(?P<chr>\\.|[^\\'])'
    | (?P<name>[A-Za-z_.$][\w.$]*)
    | (?P<op><<|>>|[-+*/%&|^~()])
    )\s*""", re.X)

# GNU as and keystone (C) rank operators differently: `1<<3+1` is 9 in GNU as
# and 16 in keystone. An expression must mean the same under both.
_GAS_PRECEDENCE = {"*": 3, "/": 3, "%": 3, "<<": 3, ">>": 3, "|": 2, "&": 2, "^": 2, "+": 1, "-": 1}
_C_PRECEDENCE = {"*": 5, "/": 5, "%": 5, "+": 4, "-": 4, "<<": 3, ">>": 3, "&": 2, "^": 1, "|": 0}


def _number(text: str) -> int:
    t = text.lower()
    try:
        if t.endswith("h") and not t.startswith("0x"):
            return int(t[:-1], 16)
        if t.startswith(("0x", "0b")):
            return int(t, 0)
        # A leading 0 means octal, in GNU as and in keystone alike.
        return int(t, 8) if len(t) > 1 and t[0] == "0" else int(t)
    except ValueError:
        raise _Bad(f"invalid number '{text}'") from None


def _tokenize(text: str, registers=False) -> list[tuple[str, object]]:
    """("num", int), ("name", str), ("op", str); ("reg", name) only if `registers`."""
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise _Bad("invalid expression")
        if m["num"]:
            tokens.append(("num", _number(m["num"])))
        elif m["chr"]:
            tokens.append(("num", _unescape(m["chr"])[0]))
        elif m["name"]:
            if m["name"].lower() not in _registers():
                tokens.append(("name", m["name"]))
            elif registers:
                tokens.append(("reg", m["name"].lower()))
            else:
                raise _Bad("register in an expression")
        else:
            tokens.append(("op", m["op"]))
        pos = m.end()
    return tokens


class _Parser:
    """Precedence climbing over tokens with one of the two precedence tables."""

    def __init__(self, tokens, precedence):
        self.tokens, self.precedence, self.pos = tokens, precedence, 0

    def parse(self):
        node = self.binary(0)
        if self.pos != len(self.tokens):
            raise _Bad("invalid expression")
        return node

    def take(self):
        token = self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)
        self.pos += 1
        return token

    def binary(self, level):
        left = self.unary()
        while self.pos < len(self.tokens):
            kind, op = self.tokens[self.pos]
            rank = self.precedence.get(op) if kind == "op" else None
            if rank is None or rank < level:
                break
            self.pos += 1
            left = (op, left, self.binary(rank + 1))
        return left

    def unary(self):
        kind, value = self.take()
        if kind == "num":
            return ("num", value)
        if kind == "name":
            return ("sym", value)
        if value == "(":
            node = self.binary(0)
            if self.take() != ("op", ")"):
                raise _Bad("invalid expression")
            return node
        if value in ("-", "~"):
            return (value + "u", self.unary())
        if value == "+":
            return self.unary()
        raise _Bad("invalid expression")


def _parse_expr(tokens):
    if not tokens:
        raise _Bad("missing value")
    tree = _Parser(tokens, _GAS_PRECEDENCE).parse()
    if tree != _Parser(tokens, _C_PRECEDENCE).parse():
        raise _Ambiguous("operator precedence differs between GNU as and keystone here; add parentheses")
    return tree


def _divide(a, b):
    if b == 0:
        raise _Bad("division by zero")
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q     # truncate toward zero, as GNU as


def _shift(op):
    def shift(a, b):
        if not 0 <= b < 64:
            raise _Bad(f"shift count {b} out of range")
        return op(a, b)
    return shift


_ARITHMETIC = {
    "*": operator.mul, "/": _divide, "%": lambda a, b: a - b * _divide(a, b),
    "<<": _shift(operator.lshift), ">>": _shift(operator.rshift),
    "&": operator.and_, "|": operator.or_, "^": operator.xor,
}


def _evaluate(node, lookup) -> tuple[int, int | None]:
    kind = node[0]
    if kind == "num":
        return node[1], 0
    if kind == "sym":
        return lookup(node[1])
    if kind in ("-u", "~u"):
        value, reloc = _evaluate(node[1], lookup)
        if kind == "~u":
            return ~value, 0 if reloc == 0 else None
        return -value, None if reloc is None else -reloc
    (a, ra), (b, rb) = _evaluate(node[1], lookup), _evaluate(node[2], lookup)
    if kind in ("+", "-"):
        sign = 1 if kind == "+" else -1
        return a + sign * b, None if None in (ra, rb) else ra + sign * rb
    return _ARITHMETIC[kind](a, b), 0 if ra == rb == 0 else None


# --- operands -----------------------------------------------------------------

_SIZES = {"byte": 1, "word": 2, "dword": 4, "fword": 6, "qword": 8, "tbyte": 10,
          "xmmword": 16, "ymmword": 32, "zmmword": 64}
_MEM_RE = re.compile(r"(?:(?P<size>\w+)\s+ptr\s+)?(?:(?P<seg>[cdefgs]s)\s*:\s*)?\[(?P<inner>[^\[\]]*)\]", re.I)
_NO_INDEX = ("riz", "eiz")      # "no index register" pseudo-registers


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fits32(value: int) -> bool:
    return -(1 << 31) <= _signed64(value) < 1 << 31


def _same_number(value: int, decoded: int, size: int) -> bool:
    """Is `decoded` (capstone, `size` bytes) the source's `value`, not a truncation?"""
    bits = 8 * (size or 8)
    return -(1 << bits - 1) <= value < 1 << bits and (value - decoded) % (1 << bits) == 0


def _address_bits(ins, bits: int) -> int:
    """The address size an instruction decoded in `bits`-bit code uses."""
    if ins.prefix[3] != 0x67:
        return bits
    return {16: 32, 32: 16, 64: 32}[bits]


@dataclass(frozen=True)
class _Reg:
    name: str
    relative = False

    def resolve(self, _pass):
        return self

    def render(self, _mnemonic, _bits=64):
        return self.name

    def matches(self, op, ins, _bits):
        return op.type == csx86.X86_OP_REG and ins.reg_name(op.reg) == self.name


@dataclass(frozen=True)
class _Imm:
    value: int
    relative = False

    def render(self, _mnemonic, _bits=64):
        return hex(self.value)

    def matches(self, op, _ins, _bits):
        return op.type == csx86.X86_OP_IMM and _same_number(self.value, op.imm, op.size)


@dataclass(frozen=True)
class _ImmExpr:
    expr: tuple

    def resolve(self, p):
        return _Imm(p.value(self.expr))


@dataclass(frozen=True)
class _Mem:
    size: str | None
    seg: str | None
    base: str | None
    index: str | None
    scale: int
    disp: int
    relative: bool = False      # rip-based and disp is the target address

    def render(self, mnemonic, bits=64):
        base, index = self.base, self.index
        if index in ("rsp", "esp") and self.scale == 1:
            base, index = index, base       # keystone turns [rbx + rsp] into [rbx]
        parts = [base] if base else []
        if index:
            parts.append(f"{index}*{self.scale}")
        disp = _signed64(self.disp)
        if not parts and _fits32(disp) and mnemonic != "movabs" and bits == 64:
            parts.append("riz*1")           # keystone encodes [X] as [rip + X]; [riz*1 + X] right
        inner = " + ".join(parts)
        if disp or not parts or base == "rip":
            inner = f"{inner} {'-' if disp < 0 else '+'} {abs(disp):#x}" if parts else f"{disp:#x}"
        size = f"{self.size} ptr " if self.size else ""
        seg = f"{self.seg}:" if self.seg else ""
        return f"{size}{seg}[{inner}]"

    def matches(self, op, ins, bits):
        if op.type != csx86.X86_OP_MEM:
            return False
        mem = op.mem
        base = ins.reg_name(mem.base) if mem.base else None
        index = ins.reg_name(mem.index) if mem.index else None
        index = None if index in _NO_INDEX else index
        if self.size and _SIZES[self.size] != op.size:
            return False
        if (ins.reg_name(mem.segment) if mem.segment else None) != self.seg:
            return False
        if bits == 64:
            if (self.disp - mem.disp) % (1 << 64):
                return False
        # In 16- and 32-bit code an address wraps at the address size
        # ([ebx + 0x80000000] is [ebx - 0x80000000]); a displacement that
        # does not fit in it was truncated.
        elif not _same_number(self.disp, mem.disp, _address_bits(ins, bits) // 8):
            return False
        if self.index and self.scale != 1:
            return (base, index, mem.scale) == (self.base, self.index, self.scale)
        # With scale 1, base and index may trade places.
        return sorted(filter(None, (base, index))) == sorted(filter(None, (self.base, self.index))) \
            and (index is None or mem.scale == 1)

    @property
    def absolute(self):
        return self.base is None and self.index is None


@dataclass(frozen=True)
class _MemExpr:
    size: str | None
    seg: str | None
    base: str | None
    index: str | None
    scale: int
    disp: tuple | None

    def resolve(self, p):
        value, reloc = _evaluate(self.disp, p.lookup) if self.disp else (0, 0)
        p.check_range(value)
        if self.base == "rip" and reloc not in (0, 1):
            raise _Bad("invalid rip-relative displacement")
        return _Mem(self.size, self.seg, self.base, self.index, self.scale, value,
                    self.base == "rip" and reloc == 1)


def _parse_operand(text: str):
    try:
        return _operand(text.strip())
    except _Ambiguous:
        raise
    except _Bad:
        raise _Bad("invalid operand") from None


def _operand(text: str):
    low = text.lower()
    if low in _registers():
        return _Reg(low)
    if "[" in text or "]" in text:
        m = _MEM_RE.fullmatch(text)
        if not m or (m["size"] and m["size"].lower() not in _SIZES):
            raise _Bad("invalid operand")
        return _memory(m["size"] and m["size"].lower(), m["seg"] and m["seg"].lower(), m["inner"])
    offset = re.fullmatch(r"offset\s+(.*)", text, re.I)
    return _ImmExpr(_parse_expr(_tokenize(offset[1] if offset else text)))


def _memory(size, seg, inner):
    """[base + index*scale + disp], terms in any order, disp an expression."""
    tokens = _tokenize(inner, registers=True)
    # Terms split at + and -, as GNU as reads them; keystone must read them alike.
    _parse_expr([("num", 0) if kind == "reg" else (kind, v) for kind, v in tokens])
    base = index = None
    scale, disp = 1, []
    for sign, term in _terms(tokens):
        reg, term_scale = _register_term(term)
        if reg is None:
            disp += [("op", sign), ("op", "(")] + term + [("op", ")")]
        elif sign != "+":
            raise _Bad("invalid operand")
        elif reg in _NO_INDEX:
            continue                        # "no index": nothing to add
        elif term_scale is None and base is None:
            base = reg
        elif index is None:
            index, scale = reg, term_scale or 1
        else:
            raise _Bad("invalid operand")
    if scale not in (1, 2, 4, 8) or (base == "rip" and index) or index == "rip":
        raise _Bad("invalid operand")
    return _MemExpr(size, seg, base, index, scale, _parse_expr(disp) if disp else None)


def _terms(tokens):
    """Split at top-level + and - into (sign, tokens) terms."""
    terms, current, sign, depth = [], [], "+", 0
    for token in tokens:
        after_operand = current and (current[-1][0] != "op" or current[-1] == ("op", ")"))
        if token in (("op", "+"), ("op", "-")) and depth == 0 and after_operand:
            terms.append((sign, current))
            sign, current = token[1], []
            continue
        depth += {("op", "("): 1, ("op", ")"): -1}.get(token, 0)
        current.append(token)
    if not current:
        raise _Bad("invalid operand")
    return terms + [(sign, current)]


def _register_term(term):
    """(register, scale or None) for `reg`, `reg*n`, `n*reg`; (None, None) for disp terms."""
    kinds = [kind for kind, _ in term]
    if "reg" not in kinds:
        return None, None
    if kinds == ["reg"]:
        return term[0][1], None
    if kinds == ["reg", "op", "num"] and term[1][1] == "*":
        return term[0][1], term[2][1]
    if kinds == ["num", "op", "reg"] and term[1][1] == "*":
        return term[2][1], term[0][1]
    raise _Bad("invalid operand")


# --- statements -----------------------------------------------------------------

@dataclass(frozen=True)
class _Statement:
    """A parsed statement; emit(pass) defines symbols and returns its bytes."""
    src: _Source


@dataclass(frozen=True)
class _Label(_Statement):
    name: str

    def emit(self, p):
        p.define(self.name, p.address, 1)
        p.labels[self.name] = p.address
        return b""


@dataclass(frozen=True)
class _Assign(_Statement):
    name: str
    expr: tuple

    def emit(self, p):
        value, reloc = _evaluate(self.expr, p.lookup)
        p.check_range(value)
        p.define(self.name, value, reloc)
        return b""


@dataclass(frozen=True)
class _Data(_Statement):
    size: int
    exprs: tuple

    def emit(self, p):
        return b"".join(_pack(p.value(e), self.size) for e in self.exprs)


@dataclass(frozen=True)
class _Bytes(_Statement):
    data: bytes

    def emit(self, p):
        return self.data


@dataclass(frozen=True)
class _Align(_Statement):
    boundary: tuple
    fill: tuple | None
    power_of_two: bool          # .p2align n aligns to 2**n

    def emit(self, p):
        n = p.value(self.boundary)
        if self.power_of_two:
            if not 0 <= n < 32:
                raise _Bad("alignment out of range")
            n = 1 << n
        if n <= 0 or n & (n - 1):
            raise _Bad("alignment must be a power of two")
        # Padding is executable: nop unless a fill byte is given.
        fill = p.value(self.fill) if self.fill else 0x90
        return _pack(fill, 1) * (-p.address % n)


@dataclass(frozen=True)
class _Fill(_Statement):
    count: tuple
    size: tuple | None
    fill: tuple | None

    def emit(self, p):
        count = p.value(self.count)
        size = p.value(self.size) if self.size else 1
        fill = p.value(self.fill) if self.fill else 0
        if count < 0 or size not in (1, 2, 4, 8):
            raise _Bad("count must be >= 0 and size 1, 2, 4 or 8")
        if size == 8 and not 0 <= fill < 1 << 32:
            raise _Bad("GNU as fills only the low 4 bytes of 8; use .quad")
        return _pack(fill, size) * count


def _pack(value: int, size: int) -> bytes:
    bits = 8 * size
    if not -(1 << bits - 1) <= value < 1 << bits:
        raise _Bad(f"value {value:#x} does not fit in {size} byte(s)")
    return (value % (1 << bits)).to_bytes(size, "little")


# Mnemonics that capstone spells differently for the same instruction.
_CONDITIONS = {"z": "e", "nz": "ne", "c": "b", "nae": "b", "nc": "ae", "nb": "ae", "na": "be",
               "nbe": "a", "nge": "l", "nl": "ge", "ng": "le", "nle": "g", "pe": "p", "po": "np"}
_SYNONYMS = {"sal": "shl", "movabs": "mov", "fwait": "wait", "icebp": "int1",
             "loopz": "loope", "loopnz": "loopne", "pushal": "pushad", "popal": "popad"}
# GNU as mnemonics keystone gets wrong or lacks, by code size:
# source -> (what keystone is given, what capstone calls the result).
_RESPELL = {
    64: {
        "pushf": ("pushfq", "pushfq"),      # keystone: 66 9c, a 16-bit push
        "popf": ("popfq", "popfq"),         # keystone: 66 9d
        "lret": ("retf", "retf"),
        "lretq": ("retfq", "retfq"),
        "xlat": ("xlatb", "xlatb"),
        "sysretq": ("sysret", "sysretq"),   # keystone spells the 64-bit forms without q
        "sysexitq": ("sysexit", "sysexitq"),
    },
    32: {
        "pushf": ("pushfd", "pushfd"),      # keystone: 66 9c, a 16-bit push
        "popf": ("popfd", "popfd"),
        "iret": ("iretd", "iretd"),         # keystone: 66 cf, a 16-bit frame
        "lret": ("retf", "retf"),
        "xlat": ("xlatb", "xlatb"),
    },
    16: {
        "lret": ("retf", "retf"),
        "xlat": ("xlatb", "xlatb"),
    },
}
# keystone gives these an operand-size prefix (66) that GNU as does not and
# no operand asks for, by code size; hv drops it. In 32-bit code LGDT and
# LIDT would load a 24-bit base; in 16-bit code RET and RETF would pop
# 4-byte words.
_DROP_66 = {32: frozenset({"lgdt", "lidt", "sgdt", "sidt"}),
            16: frozenset({"ret", "retf", "lret"})}
# capstone 5 names 98 and 99 cwde and cdq in 16-bit code too, where they
# are cbw and cwd (without an operand-size prefix).
_CS_16_NAMES = {"cwde": "cbw", "cdq": "cwd"}
# Operand size unclear in 64-bit mode (GNU as warns or refuses; keystone
# guesses: iret -> 66 cf, a 16-bit frame).
_AMBIGUOUS = {"iret": "iretq (64-bit frame) or iretd", "sysret": "sysretq", "sysexit": "sysexitq"}
_PREFIXES = {"lock": "lock", "rep": "rep", "repe": "rep", "repz": "rep", "repne": "repne", "repnz": "repne"}
_LEGACY_PREFIXES = frozenset(b"\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65\x66\x67")
_SHIFTS = {"shl", "shr", "sar", "rol", "ror", "rcl", "rcr"}
_BRANCHES = {"call", "loop", "loope", "loopz", "loopne", "loopnz", "xbegin"}     # and j*
_FAR_JUMPS = {"jmp", "ljmp", "ljmpd"}       # jmp SEL:OFF
# Mnemonics that name the operand size the other one of 16- and 32-bit code
# takes an operand-size prefix for, by code size.
_OTHER_SIZE = {32: frozenset({"cbw", "cwd", "pushfw", "popfw", "iretw", "pushaw", "popaw"}),
               16: frozenset({"cwde", "cdq", "pushfd", "popfd", "iretd", "pushad", "popad"})}
_KS_ERRORS = {
    KS_ERR_ASM_MNEMONICFAIL: "unknown mnemonic",
    KS_ERR_ASM_INVALIDOPERAND: "invalid operand",
    KS_ERR_ASM_MISSINGFEATURE: "instruction not available in {bits}-bit mode",
    KS_ERR_ASM_FIXUP_INVALID: "target out of range",
}


def _long_only(name: str) -> bool:
    """A register that only 64-bit code has (a REX prefix reaches it)."""
    return name.startswith("r") or name in ("spl", "bpl", "sil", "dil", "cr8")


def _drop_prefix(code: bytes, prefix: int) -> bytes:
    """`code` without `prefix` among its leading legacy prefixes."""
    for i, byte in enumerate(code):
        if byte == prefix:
            return code[:i] + code[i + 1:]
        if byte not in _LEGACY_PREFIXES:
            break
    return code


def _canonical(mnemonic: str) -> str:
    for head in ("cmov", "set", "j"):
        if mnemonic.startswith(head) and mnemonic[len(head):] in _CONDITIONS:
            return head + _CONDITIONS[mnemonic[len(head):]]
    return _SYNONYMS.get(mnemonic, mnemonic)


@dataclass(frozen=True)
class _Insn(_Statement):
    prefixes: tuple
    mnemonic: str
    operands: tuple
    bits: int = 64              # the code size: .code16, .code32, .code64

    def emit(self, p):
        if self.bits == 64 and self.mnemonic in _AMBIGUOUS:
            raise _Bad(f"ambiguous operand size; write {_AMBIGUOUS[self.mnemonic]}")
        if self.bits != 64:
            self._check_registers()
        ops = [op.resolve(p) for op in self.operands]
        size = None
        if any(op.relative for op in ops):
            # [rip + label]: the displacement counts from the next instruction,
            # so learn this one's size first (rip displacements are always 32-bit).
            size = len(self._encode([replace(op, disp=0, relative=False) if op.relative else op
                                     for op in ops], p))
            after = p.address + size
            ops = [replace(op, disp=op.disp - after, relative=False) if op.relative else op for op in ops]
        code = self._encode(ops, p)
        if size not in (None, len(code)):
            raise _Bad("instruction size depends on its own displacement")
        p.checks.append((self, p.address, code, ops))
        return code

    def _check_registers(self):
        for op in self.operands:
            names = ((op.name,) if isinstance(op, _Reg)
                     else (op.base, op.index) if isinstance(op, _MemExpr) else ())
            for name in filter(None, names):
                if _long_only(name):
                    raise _Bad(f"register '{name}' exists only in 64-bit code (.code64)")

    def _branch(self) -> bool:
        return self.mnemonic in _BRANCHES or self.mnemonic.startswith("j")

    def _encode(self, ops, p) -> bytes:
        name = _RESPELL[self.bits].get(self.mnemonic, (self.mnemonic,))[0]
        text = " ".join((*self.prefixes, name))
        if ops:
            text += " " + ", ".join(op.render(self.mnemonic, self.bits) for op in ops)
        # Only relative branches encode differently at another address (rip
        # displacements are already numbers here); a wrong guess would still
        # be caught by verify(), which decodes at the final address.
        key = (self.bits, text, p.address if self._branch() else None)
        if key not in p.cache:
            try:
                code = _ks(self.bits).asm(text, p.address, as_bytes=True)[0] or b""
            except KsError as e:
                message = _KS_ERRORS.get(e.errno, f"keystone cannot assemble this ({e})")
                raise _Bad(message.format(bits=self.bits)) from None
            if self.mnemonic in _DROP_66.get(self.bits, ()):
                code = _drop_prefix(code, 0x66)
            p.cache[key] = code
        return p.cache[key]

    def verify(self, address, code, ops):
        """Raise unless capstone reads `code` as exactly this statement."""
        found = list(_cs(self.bits).disasm(code, address))
        if len(found) != 1 or found[0].size != len(code):
            raise self.src.error(f"keystone produced {code.hex(' ') or 'nothing'}, not one instruction")
        ins = found[0]
        if not self._same(ins, ops):
            raise self.src.error(self._mismatch(ins, ops))
        if not self._operand_size_asked(ins):
            size = 32 if self.bits == 16 else 16
            hint = ("; in .code16 only short branches (within 127 bytes) are encoded right"
                    if self._branch() else "")
            raise self.src.error(f"keystone mis-encodes this as '{_text(ins)}' with a {size}-bit "
                                 f"operand size ({code.hex(' ')}){hint}")

    def _same(self, ins, ops) -> bool:
        *prefixes, name = ins.mnemonic.split()
        if self.bits == 16 and ins.prefix[2] != 0x66:
            name = _CS_16_NAMES.get(name, name)
        expected = _RESPELL[self.bits].get(self.mnemonic, (None, self.mnemonic))[1]
        if [_PREFIXES.get(w, w) for w in prefixes] != [_PREFIXES[w] for w in self.prefixes] \
                or _canonical(name) != _canonical(expected):
            return False
        decoded = list(ins.operands)
        if not ops:
            # Implicit operands (stosq: [rdi], rax) are never immediates.
            return all(d.type != csx86.X86_OP_IMM for d in decoded)
        if _canonical(name) in _SHIFTS and len(decoded) == len(ops) + 1 \
                and decoded[-1].type == csx86.X86_OP_IMM and decoded[-1].imm == 1:
            decoded.pop()       # `shl rax` is `shl rax, 1`
        orders = [decoded, decoded[::-1]] if _canonical(name) == "xchg" else [decoded]
        return any(len(order) == len(ops) and all(self._matches(o, d, ins) for o, d in zip(ops, order))
                   for order in orders)

    def _matches(self, op, decoded, ins) -> bool:
        if self.bits != 64 and self._branch() and isinstance(op, _Imm):
            # capstone reads a branch target as an address; in 16-bit code
            # that is beyond the operand's size, and the same (IP wraps).
            return decoded.type == csx86.X86_OP_IMM and (op.value - decoded.imm) % (1 << 64) == 0
        return op.matches(decoded, ins, self.bits)

    def _operand_size_asked(self, ins) -> bool:
        """In 16- and 32-bit code an operand-size prefix (66) must be what the
        mnemonic or an operand asks for: a 16-bit register, memory operand
        or immediate in 32-bit code, a 32-bit one in 16-bit code (a branch's
        target is no immediate). (64-bit code keeps its checks.)"""
        if self.bits == 64 or ins.prefix[2] != 0x66 or self.mnemonic in _OTHER_SIZE[self.bits]:
            return True
        if any(d.type == csx86.X86_OP_REG and ins.reg_name(d.reg).startswith(("xmm", "ymm"))
               for d in ins.operands):
            return True         # SSE: 66 selects the instruction, not a size
        other = 2 if self.bits == 32 else 4
        kinds = (csx86.X86_OP_REG, csx86.X86_OP_MEM) + (() if self._branch() else (csx86.X86_OP_IMM,))
        return any(d.type in kinds and d.size == other for d in ins.operands)

    def _mismatch(self, ins, ops) -> str:
        for op in ops:
            if self.bits == 64 and isinstance(op, _Mem) and op.absolute and not _fits32(op.disp):
                return (f"absolute address {op.disp:#x} does not fit in a sign-extended 32-bit "
                        "displacement (only movabs with al/ax/eax/rax takes a 64-bit address)")
        return f"keystone mis-encodes this as '{_text(ins)}'"


def _text(ins) -> str:
    return f"{ins.mnemonic} {ins.op_str}".strip()


@dataclass(frozen=True)
class _FarJump(_Statement):
    """`jmp SEL:OFF` (or `ljmp`; `ljmpd` takes a 32-bit offset in 16-bit
    code): a direct far jump, encoded by hv (EA, offset, selector), since
    keystone makes each one a 16-bit jump (66 ea in 32-bit code)."""
    selector: tuple
    offset: tuple
    wide: bool
    bits: int = 64

    def emit(self, p):
        selector, offset = p.value(self.selector), p.value(self.offset)
        if self.bits == 64:
            raise _Bad("no direct far jump in 64-bit code (use retfq, or jmp through memory)")
        if not 0 <= selector <= 0xFFFF:
            raise _Bad(f"selector {selector:#x} does not fit in 16 bits")
        size = 4 if self.bits == 32 or self.wide else 2
        if not 0 <= offset < 1 << 8 * size:
            hint = "; ljmpd takes a 32-bit one" if size == 2 else ""
            raise _Bad(f"far jump offset {offset:#x} does not fit in {8 * size} bits{hint}")
        code = (b"\x66" if size == 4 and self.bits == 16 else b"") + b"\xea" \
            + offset.to_bytes(size, "little") + selector.to_bytes(2, "little")
        p.checks.append((self, p.address, code, (selector, offset)))
        return code

    def verify(self, address, code, operands):
        found = list(_cs(self.bits).disasm(code, address))
        if not (len(found) == 1 and found[0].size == len(code) and found[0].mnemonic == "ljmp"
                and [op.imm for op in found[0].operands] == list(operands)):
            raise self.src.error(f"capstone does not read {code.hex(' ')} as this far jump")


@dataclass(frozen=True)
class _CodeSize(_Statement):
    """.code16, .code32, .code64: how the instructions after it are encoded."""
    bits: int

    def emit(self, p):
        if (p.code_bits[-1][1] if p.code_bits else 64) != self.bits:
            p.code_bits.append((p.address, self.bits))
        return b""


def _code_sizes(statements: list) -> list:
    """Every instruction with the code size the last .codeNN before it set
    (64 before any)."""
    bits, out = 64, []
    for st in statements:
        if isinstance(st, _CodeSize):
            bits = st.bits
        elif isinstance(st, (_Insn, _FarJump)):
            st = replace(st, bits=bits)
        out.append(st)
    return out


# --- parsing statements -----------------------------------------------------------

_NAME = r"[A-Za-z_.$][\w.$]*"
_LABEL_RE = re.compile(rf"({_NAME})\s*:\s*")
_ASSIGN_RE = re.compile(rf"({_NAME})\s*=(?!=)\s*(.*)")
_DIRECTIVE_RE = re.compile(r"(\.[A-Za-z_][\w.]*)\s*(.*)")
_MNEMONIC_RE = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:\s+(.*))?")

_DATA_SIZES = {".byte": 1, ".word": 2, ".short": 2, ".hword": 2, ".value": 2,
               ".long": 4, ".int": 4, ".quad": 8}
_STRINGS = {".ascii": b"", ".asciz": b"\0", ".string": b"\0"}
_NO_OPS = {".text", ".global", ".globl"}
_CODE_SIZES = {".code16": 16, ".code32": 32, ".code64": 64}
_FAR_RE = re.compile(r"([^:\[\]]+):([^:\[\]]+)")     # SELECTOR:OFFSET
_SECTION = "is not supported: a guest image is one flat section (keystone silently ignores it)"
_REJECTED = {
    ".section": _SECTION, ".data": _SECTION, ".bss": _SECTION, ".rodata": _SECTION,
    ".pushsection": _SECTION, ".popsection": _SECTION, ".previous": _SECTION,
    ".incbin": "is not supported (keystone silently ignores it); put the bytes in with .byte",
    ".org": "is not supported; use .skip or .fill, or .align, to place data",
    ".include": "must be alone on its line",
}


def _parse_line(src: _Source) -> list[_Statement]:
    """Labels first (any number), then at most one statement."""
    text, out = src.text, []
    while m := _LABEL_RE.match(text):
        out.append(_Label(replace(src, text=f"{m[1]}:"), _symbol_name(src, m[1])))
        text = text[m.end():]
    if text:
        src = replace(src, text=text)
        try:
            out.append(_parse_statement(src))
        except _Bad as e:
            raise src.error(str(e)) from None
    return out


def _symbol_name(src, name):
    if name.lower() in _registers():
        raise src.error(f"'{name}' is a register name")
    return name


def _parse_statement(src: _Source) -> _Statement:
    text = src.text
    if text.startswith("."):
        m = _DIRECTIVE_RE.fullmatch(text)
        if not m:
            raise _Bad("invalid directive")
        return _parse_directive(src, m[1].lower(), m[2])
    if m := _ASSIGN_RE.fullmatch(text):
        return _Assign(src, _symbol_name(src, m[1]), _parse_expr(_tokenize(m[2])))
    return _parse_insn(src, text)


def _parse_directive(src, name, rest):
    args = _split_args(rest) if rest else []
    if name in _DATA_SIZES:
        return _Data(src, _DATA_SIZES[name], tuple(_parse_expr(_tokenize(a)) for a in _need(args, 1)))
    if name in _STRINGS:
        return _Bytes(src, b"".join(_string(a) + _STRINGS[name] for a in _need(args, 1)))
    if name in (".align", ".balign", ".p2align"):
        exprs = [_parse_expr(_tokenize(a)) for a in _need(args, 1, 2)]
        return _Align(src, exprs[0], exprs[1] if len(exprs) > 1 else None, name == ".p2align")
    if name in (".fill", ".zero", ".skip", ".space"):
        return _parse_fill(src, name, [_parse_expr(_tokenize(a)) for a in args])
    if name in (".equ", ".set"):
        symbol, value = _need(args, 2, 2)
        if not re.fullmatch(_NAME, symbol):
            raise _Bad("invalid symbol name")
        return _Assign(src, _symbol_name(src, symbol), _parse_expr(_tokenize(value)))
    if name in _CODE_SIZES:
        if rest:
            raise _Bad(f"'{name}' takes no arguments")
        return _CodeSize(src, _CODE_SIZES[name])
    if name in _NO_OPS or (name == ".intel_syntax" and rest.strip() in ("", "noprefix")):
        return _Bytes(src, b"")
    if name in _REJECTED:
        raise _Bad(f"'{name}' {_REJECTED[name]}")
    raise _Bad(f"unsupported directive '{name}'")


def _parse_fill(src, name, exprs):
    """.fill count[, size[, value]], .skip/.space count[, value], .zero count."""
    if name == ".fill":
        count, size, fill = (_need(exprs, 1, 3) + [None, None])[:3]
        return _Fill(src, count, size, fill)
    count, fill = (_need(exprs, 1, 1 if name == ".zero" else 2) + [None])[:2]
    return _Fill(src, count, None, fill)


def _need(args, least, most=None):
    if not least <= len(args) <= (most or len(args)) or "" in args:
        raise _Bad("wrong number of arguments")
    return list(args)


def _parse_insn(src, text):
    prefixes = []
    m = _MNEMONIC_RE.fullmatch(text)
    while m and m[1].lower() in _PREFIXES and m[2]:
        prefixes.append(m[1].lower())
        m = _MNEMONIC_RE.fullmatch(m[2])
    if not m:
        raise _Bad("unknown mnemonic")
    mnemonic = m[1].lower()
    if mnemonic in _PREFIXES:
        raise _Bad("a prefix needs its instruction on the same line")
    far = _FAR_RE.fullmatch(m[2] or "") if mnemonic in _FAR_JUMPS else None
    if far:
        return _FarJump(src, _parse_expr(_tokenize(far[1])), _parse_expr(_tokenize(far[2])),
                        mnemonic == "ljmpd")
    if mnemonic == "ljmpd":
        raise _Bad("ljmpd takes SELECTOR:OFFSET")
    operands = tuple(_parse_operand(t) for t in _split_args(m[2])) if m[2] else ()
    return _Insn(src, tuple(prefixes), mnemonic, operands)


# --- layout ---------------------------------------------------------------------

class _Pass:
    """One pass over the program, guessing forward references from the last one."""

    def __init__(self, base, before: _Pass | None, defined, cache):
        self.address = base
        self.before = before        # the pass before, if any
        self.defined = defined      # every name the program defines
        self.cache = cache          # (text, address or None) -> bytes, kept across passes
        self.symbols = {}           # name -> (value, reloc) defined so far in this pass
        self.addresses = []         # statement index -> its address in this pass
        self.labels = {}
        self.guesses = {}           # forward references: name -> {(value, reloc) used}
        self.code = bytearray()
        self.source_map = []
        self.checks = []            # (insn, address, bytes, operands) to verify at the end
        self.code_bits = []         # (address, bits) where the code size changes

    def run(self, statements):
        for st in statements:
            self.addresses.append(self.address)
            try:
                data = st.emit(self)
            except _Bad as e:
                raise st.src.error(str(e)) from None
            if data:
                self.source_map.append((self.address, st.src.file, st.src.line, st.src.text))
                self.code += data
                self.address += len(data)

    def converged(self) -> bool:
        """Was every forward reference given the value its symbol then got?"""
        return all(used == {self.symbols[name]} for name, used in self.guesses.items())

    def lookup(self, name):
        if name in (".", "$"):
            return self.address, 1
        if name in self.symbols:
            return self.symbols[name]
        if name not in self.defined:
            raise _Bad(f"undefined symbol '{name}'")
        # Not defined yet in this pass. At first guess "right here", so forward
        # jumps start short and only grow; later, the last pass's value moved
        # by as much as this pass has grown so far (addresses only; reloc 1).
        if self.before is None:
            guess = (self.address, 1)
        else:
            value, reloc = self.before.symbols[name]
            drift = self.address - self.before.addresses[len(self.addresses) - 1]
            guess = (value + drift, reloc) if reloc == 1 else (value, reloc)
        self.guesses.setdefault(name, set()).add(guess)
        return guess

    def define(self, name, value, reloc):
        if name in self.symbols:
            raise _Bad(f"symbol '{name}' is already defined")
        self.symbols[name] = (value, reloc)

    def value(self, expr) -> int:
        value, _ = _evaluate(expr, self.lookup)
        self.check_range(value)
        return value

    @staticmethod
    def check_range(value):
        if not -(1 << 63) <= value < 1 << 64:
            raise _Bad(f"value {value:#x} does not fit in 64 bits")


def _layout(statements, base) -> _Pass:
    defined = {st.name for st in statements if isinstance(st, (_Label, _Assign))}
    p, cache = None, {}
    for _ in range(_MAX_PASSES):
        p = _Pass(base, p, defined, cache)
        p.run(statements)
        if p.converged():
            return p
    src = statements[0].src
    raise AsmError(f"instruction sizes do not settle after {_MAX_PASSES} passes", src.file)
