"""Finding the instructions Unicorn cannot trap.

Nothing in Unicorn traps MOV to CR0/CR3/CR4, INVLPG or WRMSR, yet each must
reach the MMU exactly (they invalidate TLB entries or change paging
controls). hv scans every code page the guest fetches from for the opcode
bytes of those instructions and hooks exactly the addresses where one may
start; a hook decodes the instruction it sits on and ignores it if it is
something else (a false positive costs nothing until executed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import capstone
from capstone import x86 as csx86

# Opcodes after any prefixes: 0F 22 /r (MOV to CRn), 0F 01 /7 with a memory
# operand (INVLPG), 0F 30 (WRMSR). SDM Vol.2B "MOV-Move to/from Control
# Registers", Vol.2A "INVLPG", Vol.2B "WRMSR".
_OPCODES = re.compile(rb"\x0f(?:\x22|\x01|\x30)", re.DOTALL)
# Legacy prefixes and REX (SDM Vol.2A §2.1.1, §2.2.1).
_PREFIXES = frozenset(b"\x66\x67\xf2\xf3\xf0\x2e\x36\x3e\x26\x64\x65") | frozenset(range(0x40, 0x50))
MAX_INSN = 15


def candidate_starts(code: bytes, limit: int) -> list[int]:
    """Offsets below `limit` in `code` where an intercepted instruction may start.

    `code` may run past `limit` (into the next page) so that an instruction
    that straddles the page boundary is found from the page it starts in.
    """
    starts = set()
    for m in _OPCODES.finditer(code):
        i = m.start()
        if code[i + 1] == 0x01 and i + 2 < len(code):
            modrm = code[i + 2]
            if (modrm >> 3) & 7 != 7 or modrm >> 6 == 3:
                continue            # 0F 01 but not INVLPG
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

    kind: "mov_cr", "invlpg" or "wrmsr". For mov_cr: `cr` and the source
    register name `reg`. For invlpg: the memory operand (`base`, `index`,
    `scale`, `disp`, `segment` register names or None).
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


_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True


def decode(code: bytes, address: int) -> Intercepted | None:
    """Decode the instruction at the start of `code`, if it is one hv intercepts."""
    insn = next(_cs.disasm(code[:MAX_INSN], address, 1), None)
    if insn is None:
        return None
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    if insn.id == csx86.X86_INS_WRMSR:
        return Intercepted("wrmsr", insn.size, text)
    if insn.id == csx86.X86_INS_INVLPG:
        mem = insn.operands[0].mem
        name = insn.reg_name
        return Intercepted("invlpg", insn.size, text,
                           base=name(mem.base) if mem.base else None,
                           index=name(mem.index) if mem.index else None,
                           scale=mem.scale, disp=mem.disp,
                           segment=name(mem.segment) if mem.segment else None)
    if insn.id == csx86.X86_INS_MOV and len(insn.operands) == 2:
        dst, src = insn.operands
        if dst.type == csx86.X86_OP_REG and insn.reg_name(dst.reg).startswith("cr"):
            return Intercepted("mov_cr", insn.size, text, cr=int(insn.reg_name(dst.reg)[2:]),
                               reg=insn.reg_name(src.reg))
    return None
