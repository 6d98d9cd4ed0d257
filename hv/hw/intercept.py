"""Finding the instructions Unicorn cannot trap.

Nothing in Unicorn traps MOV to or from CR0/CR3/CR4/CR8, INVLPG, RDMSR or
WRMSR, yet each must reach the MMU or hv's CPU model exactly (they
invalidate TLB entries, change paging controls, read MSRs QEMU does not
have, or are the local APIC's TPR); RDTSC
and RDTSCP must read a clock that is the same on every run. hv scans every code page the guest fetches from for the opcode bytes
of those instructions and hooks exactly the addresses where one may start;
a hook decodes the instruction it sits on and ignores it if it is something
else (a false positive costs nothing until executed).

Unicorn (QEMU 5's decoder) also runs these opcodes behind a VEX prefix, as
the legacy instruction with VEX's R, X, B and W bits as REX's (a real CPU
raises #UD): the oracle runs them, so hv intercepts them too.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

import capstone
from capstone import x86 as csx86

from ..errors import InvariantError

# Opcodes after any prefixes: 0F 22 /r (MOV to CRn), 0F 01 /7 with a memory
# operand (INVLPG), 0F 30 (WRMSR), 0F 31 (RDTSC), 0F 32 (RDMSR), 0F 01 F9
# (RDTSCP), 0F 01 /2 and /3 with a memory operand (LGDT, LIDT), 0F 00 /2
# and /3 (LLDT, LTR), 0F 08 (INVD). SDM Vol.2B "MOV-Move to/from Control Registers",
# Vol.2A "INVLPG", Vol.2B "WRMSR", "RDTSC", "RDMSR", "RDTSCP", Vol.2A
# "LGDT/LIDT", "LLDT", Vol.2B "LTR", Vol.2A "INVD". The same behind a VEX
# prefix: C5 xx, or C4 xx xx with map 0F (m-mmmm = 1). In 32-bit code REX
# bytes are INC and DEC, so the candidates of a 64-bit scan include every
# start a 32-bit decoder would see; the hook decodes in the CPU's mode.
# And 0F 20 /r after a REX prefix with R set: MOV from CR8 (its only form;
# CR8 is the local APIC's TPR, which QEMU under Unicorn does not keep); and
# 66 0F 38 82 /r, INVPCID (Vol.2A "INVPCID"), which QEMU 5 does not decode;
# and 0F 01 EE, EF: RDPKRU, WRPKRU (Vol.2B), whose PKRU the MMU keeps.
_OPCODES = re.compile(rb"(?:\x0f|\xc5.|\xc4[\x01\x21\x41\x61\x81\xa1\xc1\xe1].)[\x00\x08\x22\x01\x30\x31\x32]"
                      rb"|[\x44-\x47\x4c-\x4f]\x0f\x20|\x0f\x38\x82", re.DOTALL)
# Legacy prefixes and REX (SDM Vol.2A §2.1.1, §2.2.1).
_PREFIXES = frozenset(b"\x66\x67\xf2\xf3\xf0\x2e\x36\x3e\x26\x64\x65") | frozenset(range(0x40, 0x50))
MAX_INSN = 15
# Prefixes QEMU accepts before VEX: segment overrides and address size.
_VEX_MAY_FOLLOW = frozenset(b"\x2e\x36\x3e\x26\x64\x65\x67")


def candidate_starts(code: bytes, limit: int) -> list[int]:
    """Offsets below `limit` in `code` where an intercepted instruction may start.

    `code` may run past `limit` (into the next page) so that an instruction
    that straddles the page boundary is found from the page it starts in.
    """
    starts = set()
    for m in _OPCODES.finditer(code):
        i, end = m.start(), m.end()
        if code[i] & 0xF0 == 0x40:
            i += 1                  # the REX of MOV from CR8 is its own prefix
        if code[end - 1] in (0x00, 0x01) and end < len(code):
            reg, memory = code[end] >> 3 & 7, code[end] >> 6 != 3
            if code[end - 1] == 0x00:
                if reg not in (2, 3):
                    continue        # 0F 00 but neither LLDT nor LTR
            elif not (reg == 7 and (memory or code[end] == 0xF9) or reg in (2, 3) and memory
                      or code[end] in (0xEE, 0xEF)):
                continue            # 0F 01 but none of INVLPG, RDTSCP, LGDT, LIDT, RD/WRPKRU
        j = i
        while True:
            if j < limit:
                starts.add(j)
            if j == 0 or i - j >= MAX_INSN - 3 or code[j - 1] not in _PREFIXES:
                break
            j -= 1
    return sorted(starts)


def ends_open(code: bytes, limit: int) -> bool:
    """Whether the bytes after `limit` can change candidate_starts(code,
    limit): only if an intercepted opcode may begin in the last two bytes,
    or the last byte may be a prefix of one that begins after `limit`."""
    return code[limit - 1] in _PREFIXES or code[limit - 1] == 0x0F or \
        code[limit - 2:limit] == b"\x0f\x01"


@dataclass(frozen=True)
class Intercepted:
    """A decoded intercepted instruction.

    kind: "mov_cr", "mov_from_cr8", "invlpg", "invpcid", "wrmsr", "rdmsr",
    "rdtsc", "rdtscp", "invd", "rdpkru", "wrpkru", "lgdt", "lidt", "lldt" or
    "ltr" (the mnemonic). For mov_cr: `cr` and the source register name
    `reg`; for mov_from_cr8: the destination `reg`; for lldt and ltr: the
    selector's `reg`, or a memory operand as invlpg's. For invlpg: the
    memory operand (`base`, `index`, `scale`, `disp`, `segment` register
    names or None); invpcid has both (the type's `reg`, the descriptor's
    address).
    """
    kind: str
    size: int
    text: str
    cr: int = 0
    reg: str | None = None
    base: str | None = None
    index: str | None = None
    scale: int = 1
    disp: int = 0
    segment: str | None = None


def _capstone(mode: int) -> capstone.Cs:
    cs = capstone.Cs(capstone.CS_ARCH_X86, mode)
    cs.detail = True
    return cs


_CS = {64: _capstone(capstone.CS_MODE_64), 32: _capstone(capstone.CS_MODE_32),
       16: _capstone(capstone.CS_MODE_16)}
_SIMPLE = (csx86.X86_INS_WRMSR, csx86.X86_INS_RDMSR, csx86.X86_INS_RDTSC, csx86.X86_INS_RDTSCP,
           csx86.X86_INS_INVD, csx86.X86_INS_RDPKRU, csx86.X86_INS_WRPKRU)
# One operand, a memory address (or, for LLDT and LTR, a selector register).
_MEMORY_OPERAND = (csx86.X86_INS_INVLPG, csx86.X86_INS_LGDT, csx86.X86_INS_LIDT,
                   csx86.X86_INS_LLDT, csx86.X86_INS_LTR)


# Mnemonics after which RFLAGS.IF may be set (STI, POPF, IRET, and SYSRET,
# which loads RFLAGS from R11; SDM Vol.3A §6.8.1) or the code that runs
# next is not the code that follows (a jump, call, return, loop or
# software interrupt): where straight_run stops.
_RUN_ENDS = ("sti", "popf", "iret", "sysret", "rsm", "j", "call", "lcall", "ljmp", "ret",
             "loop", "int", "syscall", "sysenter", "sysexit")


@functools.lru_cache(maxsize=1024)      # a guest waits in few places
def straight_run(code: bytes, bits: int = 64) -> int:
    """How many instructions run from the start of `code` up to and
    including the first that may set RFLAGS.IF or leave the straight line
    (at least 1): an interrupt held back by RFLAGS.IF cannot be taken
    before they have run."""
    n = 0
    for _, _, mnemonic, _ in _CS[bits].disasm_lite(code, 0):
        n += 1
        if mnemonic.startswith(_RUN_ENDS):
            break
    return max(n, 1)


def insn_size(code: bytes, bits: int = 64) -> int:
    """The length of the instruction at the start of `code` (which QEMU ran)."""
    insn = next(_CS[bits].disasm_lite(code[:MAX_INSN], 0, 1), None)
    if insn is None:
        raise InvariantError(f"QEMU ran code capstone cannot decode: {code[:MAX_INSN].hex()}")
    return insn[1]


def decode(code: bytes, address: int, bits: int = 64) -> Intercepted | None:
    """Decode the instruction at the start of `code` as `bits`-bit code, if
    it is one hv intercepts."""
    code = code[:MAX_INSN]
    insn = next(_CS[bits].disasm(code, address, 1), None)
    if insn is None:
        return _decode_vex(code, address) if bits == 64 else None
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    if insn.id in _SIMPLE:
        return Intercepted(insn.mnemonic, insn.size, text)
    if insn.id in _MEMORY_OPERAND:
        op = insn.operands[0]
        if op.type == csx86.X86_OP_REG:
            return Intercepted(insn.mnemonic, insn.size, text, reg=insn.reg_name(op.reg))
        return _with_memory(insn, text, op.mem)
    if insn.id == csx86.X86_INS_INVPCID:
        return _with_memory(insn, text, insn.operands[1].mem,
                            reg=insn.reg_name(insn.operands[0].reg))
    if insn.id == csx86.X86_INS_MOV and len(insn.operands) == 2:
        dst, src = insn.operands
        if dst.type == csx86.X86_OP_REG and insn.reg_name(dst.reg).startswith("cr"):
            return Intercepted("mov_cr", insn.size, text, cr=int(insn.reg_name(dst.reg)[2:]),
                               reg=insn.reg_name(src.reg))
        if src.type == csx86.X86_OP_REG and insn.reg_name(src.reg) == "cr8":
            return Intercepted("mov_from_cr8", insn.size, text, cr=8, reg=insn.reg_name(dst.reg))
    return None


def _with_memory(insn, text: str, mem, reg: str | None = None) -> Intercepted:
    """`insn` with its memory operand `mem` (and a register operand `reg`)."""
    name = insn.reg_name
    return Intercepted(insn.mnemonic, insn.size, text, reg=reg,
                       base=name(mem.base) if mem.base else None,
                       index=name(mem.index) if mem.index else None,
                       scale=mem.scale, disp=mem.disp,
                       segment=name(mem.segment) if mem.segment else None)


def _decode_vex(code: bytes, address: int) -> Intercepted | None:
    """A VEX-prefixed legacy 0F opcode, as QEMU runs it: rewritten with the
    equivalent REX prefix for capstone (C5 xx is as long as REX 0F; C4 xx
    xx one byte longer)."""
    i = 0
    while i < len(code) and code[i] in _VEX_MAY_FOLLOW:
        i += 1
    if i + 3 > len(code) or code[i] not in (0xC4, 0xC5):
        return None             # QEMU: #UD after REX, 66, F2, F3 or LOCK
    if code[i] == 0xC5:
        r, x, b, w, last, rest = code[i + 1] >> 7 ^ 1, 0, 0, 0, code[i + 1], code[i + 2:]
    else:
        if code[i + 1] & 0x1F != 1:
            return None         # not map 0F
        r, x, b = (code[i + 1] >> 7 ^ 1, code[i + 1] >> 6 & 1 ^ 1, code[i + 1] >> 5 & 1 ^ 1)
        w, last, rest = code[i + 2] >> 7, code[i + 2], code[i + 3:]
    implied = (b"", b"\x66", b"\xf3", b"\xf2")[last & 3]     # VEX.pp
    rex = bytes([0x40 | w << 3 | r << 2 | x << 1 | b])
    ins = decode(code[:i] + implied + rex + b"\x0f" + rest, address)
    longer = (code[i] == 0xC4) - len(implied)       # the VEX form's length - the rewrite's
    return ins if ins is None or not longer else replace(ins, size=ins.size + longer)
