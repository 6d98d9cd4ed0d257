"""Exception and interrupt delivery outside IA-32e mode (hv.hw.delivery):
protected mode through 8-byte gates, real mode through the vector table,
checked on a CPU of registers and bytes (the SDM's frames, byte by byte).
Long-mode delivery is checked by every guest with an IDT."""
from collections import Counter

import pytest

import hv
from hv.arch.x86 import RFLAGS, Vector
from hv.events import PageFault
from hv.hw.delivery import Delivery

from conftest import MODES

IDT, GDT, TSS = 0x1000, 0x2000, 0x3000
FLAT_CODE32, FLAT_DATA32 = 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF
RING3_CODE32, RING3_DATA32 = 0x00CF_FA00_0000_FFFF, 0x00CF_F200_0000_FFFF


class FakeCpu:
    """The engine calls delivery makes, on a dict of registers and a bytearray."""

    def __init__(self, mode: str, cpl: int = 0, **regs):
        self.mode, self._cpl = mode, cpl
        self.mem = bytearray(0x20000)
        self.regs = {"rsp": 0x8000, "rflags": 0x202, "cs": 0x08, "ss": 0x10, "rip": 0}
        self.regs.update(regs)
        self.idt_limit, self.stack32 = 0x7FF, None

    def cpu_mode(self): return self.mode
    def cpl(self): return self._cpl
    def set_cpl(self, cpl): self._cpl = cpl
    def reg(self, name): return self.regs[name]
    def set_reg(self, name, value): self.regs[name] = value
    def idtr(self): return IDT, self.idt_limit
    def gdtr(self): return GDT, 0xFF
    def tr_base(self): return TSS
    def stack_flag(self, desc): self.stack32 = bool(desc >> 54 & 1)

    def put(self, addr: int, value: int, size: int) -> None:
        self.mem[addr:addr + size] = value.to_bytes(size, "little")

    def get(self, addr: int, size: int) -> int:
        return int.from_bytes(self.mem[addr:addr + size], "little")

    def gate32(self, vector: int, offset: int, gtype: int = 0xE, dpl: int = 0,
               selector: int = 0x08, present: bool = True) -> None:
        self.put(IDT + 8 * vector, (offset & 0xFFFF) | selector << 16 | gtype << 40 | dpl << 45
                 | present << 47 | (offset >> 16) << 48, 8)


def deliver(cpu: FakeCpu, vector, error_code=None, rip=0x1234, **kw):
    def read(vaddr, n):
        return bytes(cpu.mem[vaddr:vaddr + n])

    def write(vaddr, data, first):
        assert vaddr >> 12 == first >> 12 and vaddr <= first < vaddr + len(data)
        if 0xF000 <= first < 0x10000:       # an unmapped page, for a fault
            raise PageFault(first, 0x2)
        cpu.mem[vaddr:vaddr + len(data)] = data

    counters = Counter()
    return Delivery(cpu, read, write, counters).deliver(vector, error_code, rip, **kw), counters


def protected_cpu(**kw) -> FakeCpu:
    cpu = FakeCpu("protected", **kw)
    for i, desc in enumerate((0, FLAT_CODE32, FLAT_DATA32, RING3_CODE32, RING3_DATA32)):
        cpu.put(GDT + 8 * i, desc, 8)
    return cpu


def test_a_32_bit_interrupt_gate_pushes_eflags_cs_eip_and_the_error_code():
    cpu = protected_cpu(rflags=0x202 | RFLAGS.TF)
    cpu.gate32(Vector.GP, 0x12345678)
    chain, counters = deliver(cpu, Vector.GP, 0x18)
    assert chain is None and counters["exceptions"] == 1
    esp = cpu.regs["rsp"]
    assert esp == 0x8000 - 16
    assert [cpu.get(esp + 4 * i, 4) for i in range(4)] == [0x18, 0x1234, 0x08, 0x202 | RFLAGS.TF]
    assert (cpu.regs["cs"], cpu.regs["rip"]) == (0x08, 0x12345678)
    assert cpu.regs["rflags"] == 0x2          # IF and TF clear
    assert cpu.stack32 is None                 # the same stack: SS untouched


def test_a_32_bit_trap_gate_keeps_if_and_int_n_checks_the_gates_dpl():
    cpu = protected_cpu(cpl=3, cs=0x1B, ss=0x23)
    cpu.gate32(0x80, 0x4000, gtype=0xF, dpl=3)
    cpu.gate32(0x81, 0x4000, gtype=0xF, dpl=0)
    cpu.gate32(Vector.GP, 0x5000)
    cpu.put(TSS + 4, 0x9000, 4)                # ESP0
    cpu.put(TSS + 8, 0x10, 2)                  # SS0
    chain, _ = deliver(cpu, 0x80, rip=0x2002, int_rip=0x2000)
    assert chain is None
    # From ring 3: the ring-0 stack of the TSS, the old SS and ESP first.
    esp = cpu.regs["rsp"]
    assert esp == 0x9000 - 20
    assert [cpu.get(esp + 4 * i, 4) for i in range(5)] == [0x2002, 0x1B, 0x202, 0x8000, 0x23]
    assert (cpu.regs["cs"], cpu.regs["ss"], cpu.cpl(), cpu.stack32) == (0x08, 0x10, 0, True)
    assert cpu.regs["rflags"] & RFLAGS.IF
    # INT 0x81 from ring 3 through a DPL-0 gate: #GP(vector << 3 | IDT).
    cpu2 = protected_cpu(cpl=3, cs=0x1B, ss=0x23)
    cpu2.gate32(0x81, 0x4000, gtype=0xF, dpl=0)
    cpu2.gate32(Vector.GP, 0x5000)
    cpu2.put(TSS + 4, 0x9000, 4)
    cpu2.put(TSS + 8, 0x10, 2)
    chain, _ = deliver(cpu2, 0x81, rip=0x2002, int_rip=0x2000)
    assert chain is None and cpu2.regs["rip"] == 0x5000
    assert cpu2.get(cpu2.regs["rsp"], 4) == 0x81 << 3 | 2


def test_a_16_bit_gate_pushes_2_byte_values():
    cpu = protected_cpu()
    cpu.gate32(Vector.UD, 0x0001_2345, gtype=0x6)
    deliver(cpu, Vector.UD)
    esp = cpu.regs["rsp"]
    assert esp == 0x8000 - 6
    assert [cpu.get(esp + 2 * i, 2) for i in range(3)] == [0x1234, 0x08, 0x202]
    assert cpu.regs["rip"] == 0x2345


def test_a_task_gate_and_a_missing_gate_end_in_a_chain_that_names_them():
    cpu = protected_cpu()
    cpu.gate32(Vector.DF, 0x6000, gtype=0x5)
    cpu.gate32(Vector.GP, 0x6000, present=False)
    chain, _ = deliver(cpu, Vector.UD)         # beyond no gate: vector 6 is empty
    assert [(s.vector, s.why) for s in chain] == [
        (Vector.UD, "the gate's type 0x0 is no interrupt or trap gate"),
        (Vector.GP, "the gate is not present"),
        (Vector.DF, "a task gate (hv models no task switch)")]


def test_a_fault_pushing_the_frame_is_a_double_fault_and_on_that_stack_a_triple_fault():
    cpu = protected_cpu(rsp=0xF010)            # the stack is on the unmapped page
    cpu.gate32(Vector.PF, 0x6000)
    cpu.gate32(Vector.DF, 0x7000)
    chain, _ = deliver(cpu, Vector.PF, 0x2, cr2=0x4321)
    assert [(s.name, s.why) for s in chain] == [
        ("#PF(0x2) at 0x4321", "#PF(0x2) at 0xf00c pushing the exception frame"),
        ("#DF(0x0)", "#PF(0x2) at 0xf00c pushing the exception frame")]


def test_a_frame_across_two_pages_is_pushed_value_by_value_up_to_the_fault():
    cpu = protected_cpu(rsp=0x10008)           # EFLAGS and CS above 0x10000, EIP below
    cpu.gate32(Vector.GP, 0x6000)
    chain, _ = deliver(cpu, Vector.GP, 0x18)
    assert chain[0].why == "#PF(0x2) at 0xfffc pushing the exception frame"
    assert [cpu.get(0x10000 + 4 * i, 4) for i in range(2)] == [0x08, 0x202]


@pytest.mark.parametrize("sp", [0x100, 0x2])
def test_real_mode_pushes_flags_cs_ip_on_ss_sp_and_jumps_through_the_vector_table(sp):
    cpu = FakeCpu("real", rsp=sp, ss=0x1000, cs=0x9000, rflags=0x202 | RFLAGS.TF | RFLAGS.AC)
    cpu.put(IDT + 4 * 0x30, 0x1234_0056, 4)    # segment 0x1234, offset 0x56
    chain, counters = deliver(cpu, 0x30, rip=0x0102, int_rip=0x0100)
    assert chain is None and counters["exceptions"] == 1
    new_sp = (sp - 6) & 0xFFFF                  # SP wraps within its 64 KiB
    assert cpu.regs["rsp"] == new_sp
    frame = [cpu.get(0x10000 + ((new_sp + 2 * i) & 0xFFFF), 2) for i in range(3)]
    assert frame == [0x0102, 0x9000, 0x202 | RFLAGS.TF]    # FLAGS: 16 bits, AC above them
    assert (cpu.regs["cs"], cpu.regs["rip"], cpu.regs["rflags"]) == (0x1234, 0x56, 0x2)


# A flat multiboot kernel that stays in 32-bit protected mode: its own GDT
# and an IDT of 32-bit interrupt gates for #UD (6) and vector 0x30. INT
# 0x30 adds 1 to ecx; UD2's handler adds 0x10 and steps EIP past it; a
# fault in the handlers, or a gate read as 64-bit, would not end at the
# OUT with 0x11. A real guest, in every mode (hv.run).
KERNEL32 = """
header:
    .long 0x1BADB002, 1 << 16, -(0x1BADB002 + (1 << 16))
    .long header, header, end, end + 0x1000, entry
.code32
entry:
    lgdt [gdtr]
    jmp 0x08:flat
flat:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x90000
    mov eax, offset on_ud
    mov ebx, idt + 6 * 8
    call set_gate
    mov eax, offset on_int
    mov ebx, idt + 0x30 * 8
    call set_gate
    lidt [idtr]
    xor ecx, ecx
    int 0x30
    ud2
    mov eax, ecx
    out 0xf4, eax
set_gate:                       ; eax = handler, ebx = the gate
    mov word ptr [ebx], ax
    mov word ptr [ebx + 2], 0x08
    mov word ptr [ebx + 4], 0x8E00
    shr eax, 16
    mov word ptr [ebx + 6], ax
    ret
on_int:
    inc ecx
    iret
on_ud:
    add ecx, 0x10
    add dword ptr [esp], 2
    iret
gdtr:
    .word 23
    .long gdt
idtr:
    .word 0x30 * 8 + 7
    .long idt
.align 8
gdt:
    .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF
idt:
    .fill 0x31 * 8, 1, 0
end:
"""


@pytest.mark.parametrize("mmu", MODES)
def test_a_32_bit_kernel_takes_int_n_and_a_fault_through_its_own_idt(tmp_path, mmu):
    src = tmp_path / "kernel32.s"
    src.write_text(KERNEL32)
    r = hv.run(src, mmu=mmu)
    assert (r.reason, r.exit_code) == ("exit", 0x11), r.detail
    assert r.counters["exceptions"] == 2
