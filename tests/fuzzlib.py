"""Generators and runners for tests/test_fuzz.py: random page-table graphs
with access scripts, and random instruction bytes, run in every MMU mode
and compared with `qemu` (Unicorn's own MMU, the oracle).

Paging guests
-------------
A `PagingCase` (strategy `paging_cases`) is a random paging structure plus a
script of operations: qword reads, writes and execute accesses (`call va`)
at random virtual addresses that the tables may or may not map, writes of
random entries into the live tables, INVLPG, CR3 reloads, CR0.WP,
EFER.NXE, CR4.PKE (with PKRU) and CR4.SMEP/SMAP (with EFLAGS.AC) changes. The guest (`paging_image`) is one interpreter, assembled
once, followed by a blob describing the case; `render_paging` gives the same
image as a commented source. The guest installs the asm/ library's GDT and
IDT with a #PF/#GP handler that records vector, error code and CR2 and
resumes after the access, builds the tables, switches CR3 to them, runs the
script printing one line per operation ("r <va> = <value>", "w <va> <value>
ok", "x <va> #14 <error code> <cr2>", ...), then prints the random entries
(A/D bits included) and the data words the script may have written, and
exits 0. Every mode must print what `qemu` prints.

Guest-physical layout (guest RAM is 2 GiB, RAM):

    0x100000            the interpreter's image (code, IDT, GDT/TSS, blob)
    0x300000, 0x301000  FIXED_PDPT, FIXED_PD: PML4[0] of the random root ->
                        FIXED_PDPT[0] -> FIXED_PD, eight 2 MiB pages that
                        identity-map [0, 16 MiB): code, stack, IDT, GDT and
                        all of TABLES and DATA stay reachable, so the guest
                        keeps running whatever the random part holds
    0x302000            FIXED_PML4: with 5-level paging (a case's `levels`,
                        run with --paging-levels 5) the random root is a
                        PML5 whose entry 0 is FIXED_PML4, whose entry 0 is
                        FIXED_PDPT
    TABLES              random paging-structure pages; TABLES[0] is the root
    DATA                data frames, every qword pattern(address)
    HIGH (1 GiB) ...    zero RAM, a 1 GiB-aligned target in RAM

The random part of the address space uses only the table indices INDICES
(8, 9, 0x100, 0x1ff, at every level, so never the root's entry 0) and the page offsets
OFFSETS (0x40, 0x48, 0x800, 0xff8: exactly the entries at INDICES, so a write
through an alias of a table rewrites a live entry), plus reads at 0xffc that
run into the next page, and sometimes non-canonical addresses. Every entry
the generator writes (`entries`: random P/RW/US/A/D/PS/G/NX, sometimes
reserved or ignored bits) targets TABLES (aliasing, loops, self-references
at any level), DATA, HIGH, or addresses outside RAM, so whatever the graph,
an access can only reach TABLES, DATA, zero RAM from HIGH on, or memory
outside RAM: never the code, stack, IDT, GDT or the fixed tables (a 2 MiB
leaf at 0x400000 or 0x600000 plus a PT index from INDICES lands exactly on
TABLES or DATA; other targets of large leaves have reserved address bits).
The qwords at offsets 0x80 and 0x880 (EXEC_OFFSETS) of every page an access
can reach hold 0xC3 (`ret`) and nothing writes there, so an execute access
returns at once when the fetch is allowed.

TLB staleness: hv's TLB model and QEMU's TLB may legitimately differ after
a live entry changes without invalidation, and any write may hit a live
entry through an alias. So after every write (through a random VA, or to
an entry through the identity map) and every CR0.WP/EFER.NXE change, the
guest invalidates every page the script uses (INVLPG each, or a CR3
reload). CR4.PGE stays off, so G bits are ignored and a CR3 reload flushes
everything. A and D bits are compared: hv sets them in QEMU's order.

Code guests
-----------
`code_image(code, prologue)`: random bytes as the whole guest (no IDT: the
first exception is a triple fault), or after CODE_PROLOGUE (an IDT whose
handler prints each exception and resumes one byte further); see there.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from hypothesis import strategies as st

import hv
from hv.api import make_result
from hv.asm import assemble_source
from hv.vmm.vm import VM, Config

MODES = ("native", "shadow", "ept", "agile")       # compared with ORACLE
# What run_all runs: every mode, and agile again without the walk memo
# (a switch changes which tables a replayed walk must watch). "agile" here
# starts shadowed (rent=0), so that the program's page-table writes move
# tables to nested; "agile/rent" starts nested, as by default, and pays a
# small rent, so that its root goes shadowed early, prefilled from what
# the nested walks touched.
RUNS = MODES + ("agile/no-memo", "agile/rent")
AGILE_POLICIES = {"agile": "dynamic:rent=0", "agile/no-memo": "dynamic:rent=0",
                  "agile/rent": "dynamic:rent=64"}
ORACLE = "qemu"
REASONS = {"exit", "halted", "triple_fault", "max_insns", "escape", "error"}

# How many examples each fuzz test runs: small in `make test`, raised by
# `make fuzz` (HV_FUZZ_EXAMPLES=2000 HV_FUZZ_RANDOM=1).
EXAMPLES = int(os.environ.get("HV_FUZZ_EXAMPLES", "0")) or None
RANDOM = os.environ.get("HV_FUZZ_RANDOM", "") not in ("", "0")


def budget(default: int) -> int:
    return EXAMPLES or default


# -- layout ------------------------------------------------------------------
FIXED_PDPT, FIXED_PD, FIXED_PML4 = 0x300000, 0x301000, 0x302000
TABLES = (0x408000, 0x409000, 0x500000, 0x5FF000, 0x400000, 0x401000)
ROOT = TABLES[0]
DATA = (0x600000, 0x608000, 0x609000, 0x700000, 0x7FF000)
INDICES = (8, 9, 0x100, 0x1FF)
OFFSETS = (0x40, 0x48, 0x800, 0xFF8)
CROSS = 0xFFC                   # a qword read that runs into the next page
EXEC_OFFSETS = (0x80, 0x880)
RAM = 2 << 30
RAM_END = RAM
# A 1 GiB-aligned target in RAM, zero: a 1 GiB leaf there (or a 2 MiB
# leaf, or a 4 KiB one) maps zero RAM far from everything else.
HIGH = 1 << 30
RET = 0xC3
# Every 4 KiB page a random access can reach inside RAM (see the docstring):
# where the `ret`s go.
REACHABLE_PAGES = TABLES + DATA + (HIGH,) + tuple(
    HIGH + pd * 0x200000 + pt * 0x1000 for pd in (0,) + INDICES for pt in INDICES)
# A qword of a data frame at guest-physical `pa`: byte 0 is `ret`; as a
# paging entry it is present (0xC3 = P|RW|D|PS) with reserved bits 48 and 50
# set (and ignored bits 53, 55), so a walk through it faults with RSVD.
# The qword at `pa` is PATTERN | (pa & 0xFFFFF8) << 8 (fill_data).
PATTERN = 0x00A5_0000_0000_0000 | RET


# Targets outside guest RAM. An access through them ends the VM with reason
# "escape" in every mode (QEMU: an unmapped physical access).
OUTSIDE = (RAM_END, 0xC000_0000, 0x20_0000_0000)
# Addresses with a bit in 45:40 set: below hv's MAXPHYADDR (46) but above
# the guest CPU's (40). Not generated: hv bug,
# test_fuzz.py::test_regression_phys_bits_40_to_45_are_reserved.
OUTSIDE_HIGH = (1 << 40, 0x3FFF_FFFF_F000)
# Bits that are reserved in every entry whatever hv's and Unicorn's
# MAXPHYADDR (46 and 40): 51:46.
RSVD_BITS = tuple(range(46, 52))
# Bits every entry may hold with no effect: 11:9 (ignored), 58:52 (ignored;
# 62:59 are protection keys, ignored without CR4.PKE: `entries` draws
# them apart), PWT, PCD.
IGNORED_BITS = (3, 4, 9, 10, 11, 52, 55, 58, 61)

P, RW, US, PWT, PCD, A, D, PS, G, NX = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1 << 63)


def canonical(va: int, levels: int = 4) -> int:
    bits = 9 * levels + 12             # 48 or 57
    return va | (2**64 - (1 << bits)) if va >> bits - 1 & 1 else va


def is_canonical(va: int, levels: int = 4) -> bool:
    top = va >> 9 * levels + 11
    return top == 0 or top == (1 << 64 - 9 * levels - 11) - 1


def make_va(i4: int, i3: int, i2: int, i1: int, off: int, noncanonical: bool = False,
            i5: int | None = None) -> int:
    """The address of those table indices (i5: of the PML5, with 5 levels)."""
    levels = 4 if i5 is None else 5
    va = canonical((i5 or 0) << 48 | i4 << 39 | i3 << 30 | i2 << 21 | i1 << 12 | off, levels)
    return va ^ (1 << 9 * levels + 16) if noncanonical else va     # bit 52, or 61


# -- the case ---------------------------------------------------------------
@dataclass
class PagingCase:
    entries: list[tuple[int, int, int]]     # (TABLES index, entry index, value)
    ops: list[tuple]                        # see _script
    # Virtual pages the script uses: each is INVLPG'd after a write
    pages: list[int] = field(default_factory=list)
    levels: int = 4                         # of paging: 5 runs with --paging-levels 5


@st.composite
def entries(draw) -> int:
    """A random paging entry: flags, a target, sometimes reserved bits."""
    targets = TABLES + DATA + (HIGH,) + OUTSIDE + OUTSIDE_HIGH
    target = draw(st.sampled_from(targets))
    value = target
    # P first: shrinking makes it present.
    if draw(st.integers(0, 7)) != 7:
        value |= P
    for bit in (RW, US, A, D, PS, G, NX):
        if draw(st.booleans()):
            value |= bit
    if draw(st.integers(0, 9)) == 9:
        value |= 1 << draw(st.sampled_from(RSVD_BITS))
    if draw(st.integers(0, 4)) == 4:
        value |= 1 << draw(st.sampled_from(IGNORED_BITS))
    if draw(st.integers(0, 3)) == 3:
        value |= draw(st.integers(1, 15)) << 59     # a protection key (CR4.PKE)
    return value


@st.composite
def paging_cases(draw) -> PagingCase:
    ents = draw(st.lists(st.tuples(st.integers(0, len(TABLES) - 1), st.sampled_from(INDICES),
                                   entries()), min_size=1, max_size=24))
    levels = draw(st.sampled_from((4, 5)))
    idx = st.sampled_from(INDICES)
    pool = draw(st.lists(st.tuples(idx, idx, idx, idx, st.sampled_from(OFFSETS + (CROSS,)),
                                   st.integers(0, 15).map(lambda n: n == 15),
                                   idx if levels == 5 else st.none()),
                         min_size=1, max_size=6))
    vas = [make_va(*v) for v in pool]
    value = entries()
    va = st.sampled_from(vas)
    flush = st.sampled_from(("invlpg", "cr3"))
    op = st.one_of(
        st.tuples(st.just("r"), va),
        st.tuples(st.just("w"), va, value, flush),
        st.tuples(st.just("x"), va, st.sampled_from(EXEC_OFFSETS)),
        st.tuples(st.just("p"), st.integers(0, len(TABLES) - 1), st.sampled_from(INDICES),
                  value, flush),
        st.tuples(st.just("i"), va),
        st.tuples(st.just("c")),
        st.tuples(st.just("wp"), st.booleans()),
        st.tuples(st.just("nxe"), st.booleans()),
        st.tuples(st.just("pk"), st.booleans(), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("sm"), st.booleans(), st.booleans(), st.booleans()),
    )
    ops = draw(st.lists(op, min_size=1, max_size=24))
    pages = []
    for v in vas:
        for page in (v & ~0xFFF, (v & ~0xFFF) + 0x1000 if v & 0xFFF == CROSS else None):
            if page is not None and page < 2**64 and is_canonical(page, levels) \
                    and page not in pages:
                pages.append(page)
    return PagingCase(ents, ops, pages, levels)


# -- the guest ----------------------------------------------------------------
# The guest is one fixed interpreter (PAGING_GUEST, assembled once) followed
# by a blob of qwords that describes the case (paging_blob): the tables'
# initial entries and the script. render_paging(case) gives the same image
# as a source: the interpreter and the blob as commented `.quad` lines.
(OP_END, OP_READ, OP_WRITE, OP_EXEC, OP_PTE, OP_INVLPG, OP_CR3, OP_WP, OP_NXE, OP_PK,
 OP_SM) = range(11)

PAGING_GUEST = """\
    jmp main
.include "serial.s"
.include "gdt.s"
.include "idt.s"

ARMED   = 0xA                   ; r14 during an access
FAULTED = 0xF                   ; r14 after the access faulted (r12 vector, r11 error code, r10 CR2)
ROOT    = {root:#x}
PATTERN = {pattern:#x}

; The blob at the end of the image:
;   blob + 0    offset from blob of the page list (virtual pages the script
;               uses, ending with 1), then of the script
;   blob + 16   the initial entries: (address, qword) pairs, ending with 0
;   script      (op, a, b, c) quadruples, ending with op 0:
;               1 read a=va; 2 write a=va b=value; 3 exec a=va;
;               4 entry write a=guest-physical address b=value;
;               5 INVLPG a=va; 6 CR3 reload; 7 CR0.WP=a; 8 EFER.NXE=a;
;               9 CR4.PKE=a, then with PKE WRPKRU b;
;               10 CR4.SMEP=a bit 0, CR4.SMAP=a bit 1, EFLAGS.AC=a bit 2.
;               Writes (2, 4): then c=0 INVLPG every page of the list,
;               c=1 reload CR3.
main:
    call gdt_init
    call idt_init
    mov rdi, 13
    lea rsi, [rip + on_fault]
    call idt_set_handler
    mov rdi, 14
    lea rsi, [rip + on_fault]
    call idt_set_handler
    call fill_data
    lea rsi, [rip + blob + 16]
.Linit:
    mov rdi, qword ptr [rsi]
    test rdi, rdi
    jz .Linit_done
    mov rax, qword ptr [rsi + 8]
    mov qword ptr [rdi], rax
    add rsi, 16
    jmp .Linit
.Linit_done:
    mov rax, ROOT
    mov cr3, rax
    xor r14, r14
    lea rbp, [rip + blob]
    add rbp, qword ptr [rip + blob + 8]     ; the script
.Lnext:
    mov rax, qword ptr [rbp]
    mov rbx, qword ptr [rbp + 8]
    mov rcx, qword ptr [rbp + 16]
    mov r9, qword ptr [rbp + 24]
    add rbp, 32
    cmp rax, 10
    ja .Lbad_op
    lea rdx, [rip + op_table]
    jmp qword ptr [rdx + rax*8]
.Lbad_op:
    lea rsi, [rip + msg_bad_op]
    call panic
msg_bad_op:
    .asciz "bad op"

op_end:
    call dump
    xor eax, eax
    call exit

op_read:
    call do_read
    jmp .Lnext
op_write:
    call do_write
    jmp flush
op_exec:
    call do_exec
    jmp .Lnext
op_pte:
    call do_pte
    jmp flush
op_invlpg:
    call do_invlpg
    jmp .Lnext
op_cr3:
    call flush_cr3
    jmp .Lnext
op_wp:
    call set_wp
    jmp .Lnext
op_nxe:
    call set_nxe
    jmp .Lnext
op_pk:
    call set_pk
    jmp .Lnext
op_sm:
    call set_sm
    jmp .Lnext
flush:
    test r9, r9
    jnz .Lflush_cr3
    call flush_pages
    jmp .Lnext
.Lflush_cr3:
    call flush_cr3
    jmp .Lnext

; A #PF or #GP during an access: record it, resume after the access (r15)
; with the stack the access started with (r13). Any other fault, or one
; outside an access: the library's report, exit 0xEE.
on_fault:
    cmp qword ptr [rdi + FRAME_R14], ARMED
    jne idt_default_handler
    mov qword ptr [rdi + FRAME_R14], FAULTED
    mov rax, qword ptr [rdi + FRAME_VECTOR]
    mov qword ptr [rdi + FRAME_R12], rax
    mov rax, qword ptr [rdi + FRAME_ERROR]
    mov qword ptr [rdi + FRAME_R11], rax
    xor eax, eax
    cmp qword ptr [rdi + FRAME_VECTOR], 14
    jne .Lon_fault_cr2
    mov rax, cr2
.Lon_fault_cr2:
    mov qword ptr [rdi + FRAME_R10], rax
    mov rax, qword ptr [rdi + FRAME_R15]
    mov qword ptr [rdi + FRAME_RIP], rax
    mov rax, qword ptr [rdi + FRAME_R13]
    mov qword ptr [rdi + FRAME_RSP], rax
    ret

; tag: al = letter, rbx = address: prints "<letter> <rbx> "
tag:
    call putc
    mov al, ' '
    call putc
    mov rax, rbx
    call put_hex
    mov al, ' '
    jmp putc

; do_read: rbx = va. "r <va> = <value>" or "r <va> #<vector> <error> <cr2>"
do_read:
    mov al, 'r'
    call tag
    mov r13, rsp
    lea r15, [rip + .Ldo_read_resume]
    mov r14, ARMED
    mov rax, qword ptr [rbx]
.Ldo_read_resume:
    cmp r14, FAULTED
    je fault_line
    xor r14, r14
    push rax
    mov al, '='
    call putc
    mov al, ' '
    call putc
    pop rax
    call put_hex
    jmp newline

; do_write: rbx = va, rcx = value. "w <va> <value> ok" or a fault.
do_write:
    mov al, 'w'
    call tag
    mov rax, rcx
    call put_hex
    mov al, ' '
    call putc
    mov r13, rsp
    lea r15, [rip + ok_line]
    mov r14, ARMED
    mov qword ptr [rbx], rcx
    jmp ok_line

; do_exec: rbx = va. Calls it (a `ret` when the fetch is allowed).
do_exec:
    mov al, 'x'
    call tag
    mov r13, rsp
    lea r15, [rip + ok_line]
    mov r14, ARMED
    call rbx
    jmp ok_line

ok_line:
    cmp r14, FAULTED
    je fault_line
    xor r14, r14
    mov al, 'o'
    call putc
    mov al, 'k'
    call putc
    jmp newline

fault_line:
    xor r14, r14
    mov al, '#'
    call putc
    mov rax, r12
    call put_dec
    mov al, ' '
    call putc
    mov rax, r11
    call put_hex
    mov al, ' '
    call putc
    mov rax, r10
    call put_hex
    jmp newline

; do_pte: rbx = guest-physical address of an entry (identity-mapped), rcx =
; its new value. "p <address> <value>"
do_pte:
    mov al, 'p'
    call tag
    mov rax, rcx
    call put_hex
    mov qword ptr [rbx], rcx
    jmp newline

; do_invlpg: rbx = va. "i <va>"
do_invlpg:
    mov al, 'i'
    call tag
    invlpg [rbx]
    jmp newline

; flush_cr3: reload CR3 (PGE is off: flushes every translation).
flush_cr3:
    mov rax, cr3
    mov cr3, rax
    ret

; flush_pages: INVLPG every page the script uses.
flush_pages:
    push rsi
    push rbx
    lea rsi, [rip + blob]
    add rsi, qword ptr [rip + blob]
.Lflush_pages:
    mov rbx, qword ptr [rsi]
    cmp rbx, 1                          ; the list ends with 1
    je .Lflush_pages_done
    invlpg [rbx]
    add rsi, 8
    jmp .Lflush_pages
.Lflush_pages_done:
    pop rbx
    pop rsi
    ret

; set_wp: rbx = 0/1: CR0.WP, then a CR3 reload. "W <rbx>"
set_wp:
    mov al, 'W'
    call tag
    mov rax, cr0
    and rax, ~0x10000
    mov rcx, rbx
    shl rcx, 16
    or rax, rcx
    mov cr0, rax
    call flush_cr3
    jmp newline

; set_nxe: rbx = 0/1: EFER.NXE, then a CR3 reload. "N <rbx>"
set_nxe:
    mov al, 'N'
    call tag
    mov ecx, 0xC0000080
    rdmsr
    and eax, ~0x800
    mov rdx, rbx
    shl edx, 11
    or eax, edx
    xor edx, edx
    wrmsr
    call flush_cr3
    jmp newline

; set_pk: rbx = 0/1: CR4.PKE; with it rcx to PKRU (no TLB flush: none is
; needed). "K <rbx>"
set_pk:
    mov al, 'K'
    call tag
    mov rax, cr4
    and rax, ~0x400000
    mov rdx, rbx
    shl rdx, 22
    or rax, rdx
    mov cr4, rax
    test rbx, rbx
    jz newline
    mov eax, ecx
    xor ecx, ecx
    xor edx, edx
    wrpkru
    jmp newline

; set_sm: rbx bit 0: CR4.SMEP, bit 1: CR4.SMAP, bit 2: EFLAGS.AC (STAC or
; CLAC), then a CR3 reload. "S <rbx>". The interpreter's own pages are
; supervisor pages: only the script's accesses to user pages are refused.
set_sm:
    mov al, 'S'
    call tag
    mov rax, cr4
    and rax, ~0x300000
    mov rdx, rbx
    and rdx, 3
    shl rdx, 20
    or rax, rdx
    mov cr4, rax
    test rbx, 4
    jz .Lset_sm_clac
    stac
    jmp .Lset_sm_flush
.Lset_sm_clac:
    clac
.Lset_sm_flush:
    call flush_cr3
    jmp newline

; fill_data: every qword of every data frame: PATTERN | (its address & 0xFFFFF8) << 8.
fill_data:
    lea rsi, [rip + data_list]
.Lfill_frame:
    mov rdi, qword ptr [rsi]
    test rdi, rdi
    jz .Lfill_done
    xor ecx, ecx
.Lfill_qword:
    lea rax, [rdi + rcx]
    and rax, 0xFFFFF8
    shl rax, 8
    mov rdx, PATTERN
    or rax, rdx
    mov qword ptr [rdi + rcx], rax
    add rcx, 8
    cmp rcx, 4096
    jb .Lfill_qword
    add rsi, 8
    jmp .Lfill_frame
.Lfill_done:
    ret

; dump: "m <address> <qword>" for every address in dump_list (identity-mapped):
; the random entries (with their A/D bits) and the data the script wrote.
dump:
    lea rsi, [rip + dump_list]
.Ldump:
    mov rbx, qword ptr [rsi]
    test rbx, rbx
    jz .Ldump_done
    mov al, 'm'
    call tag
    mov rax, qword ptr [rbx]
    call put_hex
    call newline
    add rsi, 8
    jmp .Ldump
.Ldump_done:
    ret

.align 8
op_table:
    .quad op_end, op_read, op_write, op_exec, op_pte, op_invlpg, op_cr3, op_wp, op_nxe, op_pk
    .quad op_sm
{lists}
.align 8
blob:
"""


def _quads(label: str, values) -> str:
    return f"{label}:\n" + "".join(f"    .quad {v:#x}\n" for v in values)


def _fixed_lists() -> str:
    dump = [t + 8 * i for t in TABLES for i in INDICES] + [d + o for d in DATA for o in OFFSETS]
    return _quads("data_list", DATA + (0,)) + _quads("dump_list", dump + [0])


PAGING_SOURCE = PAGING_GUEST.format(root=ROOT, pattern=PATTERN, lists=_fixed_lists())
_paging_image: bytes | None = None


def paging_interpreter() -> bytes:
    global _paging_image
    if _paging_image is None:
        img = assemble_source(PAGING_SOURCE, name="<fuzz>")
        # The blob must follow the interpreter directly.
        assert img.symbols["blob"] == img.base + len(img.code), "blob is not at the end"
        _paging_image = img.code
    return _paging_image


def _init_entries(case: PagingCase) -> list[tuple[int, int]]:
    init = [(FIXED_PDPT, FIXED_PD | P | RW), (ROOT, FIXED_PDPT | P | RW)] if case.levels == 4 \
        else [(FIXED_PDPT, FIXED_PD | P | RW), (FIXED_PML4, FIXED_PDPT | P | RW),
              (ROOT, FIXED_PML4 | P | RW)]
    init += [(FIXED_PD + 8 * i, (i << 21) | P | RW | PS) for i in range(8)]
    for page in REACHABLE_PAGES:
        for off in EXEC_OFFSETS:
            init.append((page | off, RET))
    init += [(TABLES[t] + 8 * i, v) for t, i, v in case.entries]
    return init


def _script(case: PagingCase) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(comment, quadruple) for every op of the case."""
    out = []
    for op in case.ops:
        kind = op[0]
        if kind == "r":
            out.append((f"read {op[1]:#x}", (OP_READ, op[1], 0, 0)))
        elif kind == "w":
            va = op[1] if op[1] & 0xFFF != CROSS else op[1] - 4     # aligned writes only
            out.append((f"write {va:#x} <- {op[2]:#x}, then {op[3]}",
                        (OP_WRITE, va, op[2], int(op[3] == "cr3"))))
        elif kind == "x":
            va = (op[1] & ~0xFFF) | op[2]
            out.append((f"exec {va:#x}", (OP_EXEC, va, 0, 0)))
        elif kind == "p":
            pa = TABLES[op[1]] + 8 * op[2]
            out.append((f"entry {pa:#x} <- {op[3]:#x}, then {op[4]}",
                        (OP_PTE, pa, op[3], int(op[4] == "cr3"))))
        elif kind == "i":
            if is_canonical(op[1], case.levels):    # INVLPG of a non-canonical address: not generated
                out.append((f"invlpg {op[1]:#x}", (OP_INVLPG, op[1], 0, 0)))
        elif kind == "c":
            out.append(("reload cr3", (OP_CR3, 0, 0, 0)))
        elif kind == "wp":
            out.append((f"cr0.wp = {int(op[1])}", (OP_WP, int(op[1]), 0, 0)))
        elif kind == "nxe":
            out.append((f"efer.nxe = {int(op[1])}", (OP_NXE, int(op[1]), 0, 0)))
        elif kind == "pk":
            out.append((f"cr4.pke = {int(op[1])}" + (f", pkru = {op[2]:#x}" if op[1] else ""),
                        (OP_PK, int(op[1]), op[2], 0)))
        elif kind == "sm":
            out.append((f"cr4.smep = {int(op[1])}, cr4.smap = {int(op[2])}, "
                        f"eflags.ac = {int(op[3])}",
                        (OP_SM, op[1] | op[2] << 1 | op[3] << 2, 0, 0)))
        else:
            raise ValueError(op)
    out.append(("end", (OP_END, 0, 0, 0)))
    return out


def _blob_lines(case: PagingCase) -> list[tuple[str, list[int]]]:
    """The blob as (comment, qwords) lines."""
    init = _init_entries(case)
    pages = case.pages + [1]
    pages_off = 16 + 16 * len(init) + 8
    script_off = pages_off + 8 * len(pages)
    lines = [("offsets of the page list and the script", [pages_off, script_off])]
    lines += [("", [a, v]) for a, v in init] + [("end of the entries", [0])]
    lines += [("pages to INVLPG", pages)]
    lines += [(c, list(q)) for c, q in _script(case)]
    return lines


def paging_image(case: PagingCase) -> bytes:
    blob = b"".join(q.to_bytes(8, "little") for _, qs in _blob_lines(case) for q in qs)
    return paging_interpreter() + blob


def render_paging(case: PagingCase) -> str:
    """The guest source of `case`: assembles to paging_image(case)."""
    out = [PAGING_SOURCE]
    for comment, qs in _blob_lines(case):
        line = "    .quad " + ", ".join(f"{q:#x}" for q in qs)
        out.append(f"{line:50} ; {comment}\n" if comment else line + "\n")
    return "".join(out)


# -- running and comparing ------------------------------------------------------
def assemble(src: str) -> bytes:
    return assemble_source(src, name="<fuzz>").code


def run_mode(img: bytes, run: str, **kw) -> hv.Result:
    """One run (a mode, or one of RUNS); under shadow and agile paging also
    their MMU's invariants at the end."""
    mode, _, variant = run.partition("/")
    if variant == "no-memo":
        kw["memo"] = False
    if run in AGILE_POLICIES:
        kw.setdefault("agile_policy", AGILE_POLICIES[run])
    if mode in ("shadow", "agile"):
        vm = VM(img, Config(mmu=mode, **kw), name="fuzz")
        vm.run()
        vm.mmu.check()
        return make_result("fuzz", vm)
    return hv.run("fuzz", mmu=mode, image=img, **kw)


def outcome(r: hv.Result) -> tuple:
    """What every mode must agree on."""
    return (r.reason, r.exit_code, r.console)


def run_all(img: bytes, **kw) -> dict[str, hv.Result]:
    return {m: run_mode(img, m, **kw) for m in (ORACLE,) + RUNS}


def describe(results: dict[str, hv.Result]) -> str:
    out = []
    for m, r in results.items():
        tail = "\n".join(r.console.splitlines()[-4:])
        out.append(f"--- {m}: reason={r.reason} exit_code={r.exit_code} detail={r.detail}\n{tail}")
    return "\n".join(out)


def first_difference(a: str, b: str) -> str:
    la, lb = a.splitlines(), b.splitlines()
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return f"line {i}: {x!r} != {y!r}"
    return f"{len(la)} lines != {len(lb)} lines"


# -- random instruction bytes ---------------------------------------------------
# A prologue that installs the library's GDT and IDT with a handler for all
# 32 vectors; the handler prints "#<vector> <error code> <cr2 or 0>\n" and
# resumes one byte after the faulting instruction's first byte (a trap:
# after the instruction) -- random decoding goes on -- until the 8th
# exception, which exits with 0x33. Every general-purpose register but rsp
# is zeroed before the random bytes run; they start on a page of their own
# (code_page), followed by CODE_EPILOGUE.
#
# The prologue also moves the page tables from the boot ABI's (PML4 0x2000,
# PDPT 0x3000, PD 0x4000) to the top of RAM (CODE_TABLES: the same identity
# map of 64 MiB with 2 MiB pages): random code easily points RSP a few KiB
# above 0 (`pop rsp` of a zero, then `ret imm16`), and exception frames
# pushed there would rewrite live page tables with no INVLPG after: which
# translation is used next is then up to each TLB (QEMU's, hv's model), and
# modes may part legitimately. Up there the random code's stack does not
# reach them, and the boot tables, still shadowed after the switch, are
# written until shadow paging unshadows them (ARCHITECTURE.md: 3 writes
# with no use as a table).
CODE_TABLES = 0x3F00000
CODE_MARK = 1       # the prologue's mark as the random code starts
CODE_PROLOGUE = """\
    jmp main
.include "serial.s"
.include "gdt.s"
.include "idt.s"
main:
    call gdt_init
    call idt_init
{move_tables}    xor ebx, ebx
.Lset:
    mov rdi, rbx
    lea rsi, [rip + on_exc]
    call idt_set_handler
    inc ebx
    cmp ebx, 32
    jb .Lset
    xor eax, eax                        ; hypercall 0: mark 1, the random code starts
    mov ebx, CODE_MARK
    vmcall
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    xor edi, edi
    xor ebp, ebp
    xor r8, r8
    xor r9, r9
    xor r10, r10
    xor r11, r11
    xor r12, r12
    xor r13, r13
    xor r14, r14
    xor r15, r15
    jmp code_page

on_exc:
    mov rbx, rdi
    mov al, '#'
    call putc
    mov rax, qword ptr [rbx + FRAME_VECTOR]
    call put_dec
    mov al, ' '
    call putc
    mov rax, qword ptr [rbx + FRAME_ERROR]
    call put_hex
    mov al, ' '
    call putc
    xor eax, eax
    cmp qword ptr [rbx + FRAME_VECTOR], 14
    jne .Lon_exc_cr2
    mov rax, cr2
.Lon_exc_cr2:
    call put_hex
    call newline
    inc qword ptr [rip + exc_count]
    cmp qword ptr [rip + exc_count], 8
    jae .Lon_exc_enough
    inc qword ptr [rbx + FRAME_RIP]
    ret
.Lon_exc_enough:
    mov al, 0x33
    jmp exit

.align 8
exc_count:
    .quad 0
.align 4096
code_page:
"""
MOVE_TABLES = f"""\
    mov rdi, {CODE_TABLES:#x}           ; PML4, then PDPT, then PD
    lea rax, [rdi + 0x1003]
    mov qword ptr [rdi], rax
    lea rax, [rdi + 0x2003]
    mov qword ptr [rdi + 0x1000], rax
    mov eax, 0x83                       ; P | RW | PS
    xor ecx, ecx
.Lmap:
    mov qword ptr [rdi + 0x2000 + rcx*8], rax
    add rax, 0x200000
    inc ecx
    cmp ecx, 32
    jb .Lmap
    mov cr3, rdi
    mov ecx, 3                          ; write the old tables 3 times each: under
.Lflood:                                ; shadow paging they are then unshadowed
    mov qword ptr [0x2ff8], rcx         ; (mmu_flooded), so no longer write-protected
    mov qword ptr [0x3ff8], rcx
    mov qword ptr [0x4ff8], rcx
    dec ecx
    jnz .Lflood
"""
CODE_PROLOGUE = CODE_PROLOGUE.format(move_tables=MOVE_TABLES).replace("CODE_MARK", str(CODE_MARK))

_code_prologue_image: bytes | None = None


# After the random bytes: mov al, 0x44; out 0xf4, al (exit 0x44), so code
# that falls through ends at once instead of running a sled of zeros
# (`add [rax], al`) to max_insns.
CODE_EPILOGUE = bytes([0xB0, 0x44, 0xE6, 0xF4])


def code_counter(r, name: str) -> int:
    """What the random code itself added to counter `name`: since the
    prologue's mark, or the whole run without the prologue."""
    return r.counters.get(name, 0) - r.marks.get(CODE_MARK, {}).get(name, 0)


def code_image(code: bytes, prologue: bool) -> bytes:
    """The guest image: `code` alone (entered at its first byte, no IDT:
    the first exception is a triple fault), or after CODE_PROLOGUE; then
    CODE_EPILOGUE."""
    global _code_prologue_image
    if not prologue:
        return code + CODE_EPILOGUE
    if _code_prologue_image is None:
        _code_prologue_image = assemble(CODE_PROLOGUE)
    return _code_prologue_image + code + CODE_EPILOGUE


def code_source(code: bytes, prologue: bool) -> str:
    """A guest source that assembles to code_image(code, prologue)."""
    body = "    .byte " + ", ".join(f"{b:#04x}" for b in code + CODE_EPILOGUE) + "\n"
    return (CODE_PROLOGUE if prologue else "") + body


# MOV to CR0 or CR4: 0F 22 and a ModRM byte whose reg field is 0 or 4.
_NO_TSC_OR_MSR = bytes.maketrans(b"\x30\x31\x32", b"\x90\x90\x90")
_MOV_CR0_CR4 = re.compile(rb"\x0f\x22(?=[\x00-\x07\x20-\x27\x40-\x47\x60-\x67\x80-\x87"
                          rb"\xa0-\xa7\xc0-\xc7\xe0-\xe7])", re.S)
# LGDT and LIDT (0F 01 /2, /3 with a memory operand), LLDT and LTR (0F 00 /2,
# /3): a non-canonical base is #GP by the SDM and loads under the oracle.
_TABLE_LOADS = re.compile(rb"\x0f(?:\x01(?=[\x10-\x1f\x50-\x5f\x90-\x9f])|\x00(?=[\x10-\x1f\x50-\x5f"
                          rb"\x90-\x9f\xd0-\xdf]))", re.S)
# INVPCID (0F 38 82): QEMU 5 does not decode it (#UD under the oracle).
_INVPCID = re.compile(rb"\x0f\x38\x82")


def scrub_code(code: bytes) -> bytes:
    """Random code without 31 bytes (NOPs in their place, wherever decoding
    may start: the handler resumes one byte further, so any byte may be an
    opcode): RDTSC (0F 31, and the VEX-prefixed forms Unicorn also runs as
    RDTSC) reads the host's clock under the oracle, where nothing
    intercepts it, and the vCPU's modelled cycles in hv's modes
    (test_the_tsc_counts_instructions): the two cannot agree. Nor MOV to CR0
    or CR4 (its 22 byte becomes 90: SETO): 64-bit code clearing CR0.PG or
    CR4.PAE is #GP(0) by the SDM and loads under the oracle
    (test_leaving_ia32e_mode_from_64_bit_code_is_gp0). Nor RDMSR and WRMSR
    (their 30 and 32 bytes become 90, as 31's): hv's MSR model answers in
    its modes, QEMU's MSRs under the oracle (test_kernels.py). Nor LGDT,
    LIDT, LLDT and LTR (their 01 or 00 byte becomes 90): a non-canonical
    base is #GP(0) in hv's modes, loaded under the oracle. Nor INVPCID (its
    82 becomes 90): hv runs it, QEMU 5 does not decode it."""
    code = _INVPCID.sub(b"\x0f\x38\x90", code)
    code = _TABLE_LOADS.sub(b"\x0f\x90", _MOV_CR0_CR4.sub(b"\x0f\x90", code))
    return code.translate(_NO_TSC_OR_MSR)
