"""Pins of the Unicorn behaviours hv's engine works around (listed at the
top of hv/hw/engine.py). If an upgrade changes one, these fail first."""
import random
import sys

import keystone
import pytest

from hv.hw.engine import Engine
from hv.memory import PhysMem

_ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
BASE = 0x1000


def engine(src: str, python_mmu: bool = False) -> Engine:
    mem = PhysMem(2 << 20)
    mem.write(BASE, bytes(_ks.asm(src, BASE)[0]))
    e = Engine(mem.host_addr, mem.size, python_mmu=python_mmu)
    e._mem = mem        # keep the memory alive as long as the engine
    return e


def test_unicorn_1883_and_the_workaround():
    """unicorn#1883: the second exception is reported as #DF unless the
    in-flight exception state is cleared after each one."""
    src = "xor eax, eax\n" + "div eax\n" * 3 + "hlt"

    def run_divs(clear: bool) -> list[int]:
        e = engine(src)
        seen = []

        def intr(vector):
            seen.append(vector)
            e.set_reg("rip", e.reg("rip") + 2)     # skip the 2-byte div
            e.stop()
        e.on_interrupt(intr)
        pc = BASE
        for _ in range(3):
            e.run(pc, 100)
            if clear:
                e.clear_exception()
            pc = e.reg("rip")
        return seen

    assert run_divs(clear=False)[:2] == [0, 8]     # the bug, as Unicorn 2.1.4 has it
    assert run_divs(clear=True) == [0, 0, 0]       # hv's workaround


def test_instruction_counter_reports_instructions_started():
    e = engine("nop\n" * 50)
    assert e.run(BASE, 20) == 20                   # stopped by the limit
    e = engine("nop\nnop\nhlt\nnop")
    assert e.run(BASE, 100) == 3                   # HLT ends emu_start silently, counted
    assert e.reg("rip") == BASE + 3 and not e.ran_out
    assert e.run(BASE, 3) == 3 and not e.ran_out   # at the limit's last instruction too
    assert e.run(BASE, 2) == 2 and e.ran_out


def test_interrupt_stops_a_run_from_a_hook_only():
    """Engine.interrupt, for a SIGINT handler: in a hook's frame the run
    stops as a hook's stop does, counted at the request; in run's own frame
    (Python may run a handler between run's bytecodes, around emu_start,
    which would drop the stop and leave the last run's counter) and outside
    a run, nothing happens."""
    e = engine("nop\nmov dx, 0x3f8\nout dx, al\nnop\nnop\nhlt")
    seen = []

    def out(port, size, value):
        hook = run = sys._getframe()
        while run.f_code is not Engine.run.__code__:
            run = run.f_back
        seen.append(e.interrupt(run))
        seen.append(e.interrupt(hook))
    e.on_out(out)
    assert e.run(BASE, 100) == 3                   # nop, mov, out
    assert seen == [False, True] and e.reg("rip") == BASE + 6
    assert not e.interrupt(sys._getframe())


def test_fill_failure_stops_at_the_faulting_instruction():
    e = engine("nop\nmov rax, qword ptr [rbx]\nhlt", python_mmu=True)
    e.set_reg("rbx", 0x5000)
    fills = []

    def fill(vaddr, access):
        fills.append((vaddr, access))
        if vaddr == 0x5000:
            return None
        return vaddr & ~0xFFF, 7
    e.on_fill(fill)
    e.run(BASE, 100)
    assert e.reg("rip") == BASE + 1
    assert fills == [(BASE, 2), (0x5000, 0)]       # fetch, then the read that failed


def test_stop_from_a_hook_fetches_nothing_more():
    """With an `until` address Unicorn translated a block at until-1 after
    emu_stop; the engine runs without one (UC_CTL_UC_USE_EXITS)."""
    e = engine("mov dx, 0x3f8\nout dx, al\nnop\nhlt", python_mmu=True)
    fills = []
    e.on_fill(lambda vaddr, access: (fills.append(vaddr), (vaddr & ~0xFFF, 7))[1])
    e.on_out(lambda port, size, value: e.stop())
    e.run(BASE, 100)
    assert fills == [BASE]
    assert e.reg("rip") == BASE + 5                # just after the OUT


def test_hook_added_inside_the_fill_callback_fires():
    e = engine("nop\nnop\nnop\nhlt", python_mmu=True)
    hits = []

    def fill(vaddr, access):
        if access == 2 and not hits:
            hits.append("added")
            e.hook_code_at(BASE + 2, lambda addr: hits.append(addr))
        return vaddr & ~0xFFF, 7
    e.on_fill(fill)
    e.run(BASE, 100)
    assert hits == ["added", BASE + 2]


def test_exception_in_a_callback_is_raised_by_run():
    e = engine("nop\nhlt", python_mmu=True)

    def fill(vaddr, access):
        raise ZeroDivisionError("from the fill callback")
    e.on_fill(fill)
    with pytest.raises(ZeroDivisionError):
        e.run(BASE, 10)


def test_fill_sees_the_page_and_a_failed_fill_leaves_the_address():
    """Why Engine.fault_address exists: the fill callback gets only the page
    of a data access; when it fails, Unicorn stops at the instruction, which
    has done nothing, and keeps the access's address in uc_struct."""
    e = engine("mov qword ptr [rbx + 0x123], rax\nhlt", python_mmu=True)
    e.set_reg("rbx", 0x5000)
    fills = []

    def fill(vaddr, access):
        fills.append(vaddr)
        return None if vaddr == 0x5000 else (vaddr & ~0xFFF, 7)
    e.on_fill(fill)
    assert e.run(BASE, 10) == 1
    assert fills == [BASE, 0x5000]
    assert e.fault_address() == 0x5123 and e.reg("rip") == BASE


def test_a_split_store_fills_its_second_page_before_writing():
    """Why a write across a page boundary whose second page faults stores
    nothing: QEMU fills the second page first; the fault address is that
    page's first byte."""
    e = engine("mov qword ptr [rbx], rax\nhlt", python_mmu=True)
    e.set_reg("rbx", 0x5FFC)
    e.set_reg("rax", 0x1122334455667788)
    e.on_fill(lambda vaddr, access: None if vaddr == 0x6000 else (vaddr & ~0xFFF, 7))
    e.run(BASE, 10)
    assert e.fault_address() == 0x6000 and e.reg("rip") == BASE
    assert e._mem.read(0x5FFC, 4) == bytes(4)


def test_writing_cs_and_ss_does_not_change_the_cpl_but_set_cpl_does():
    """Why exception delivery calls Engine.set_cpl: QEMU keeps CPL in hflags."""
    e = engine("mov rax, cr0\nhlt")             # privileged: #GP(0) at CPL 3
    seen = []
    e.on_interrupt(lambda vector: (seen.append(vector), e.stop()))
    e.set_reg("cs", 0x23)                       # RPL 3: CPL is unchanged
    e.run(BASE, 10)
    assert seen == []
    e.set_cpl(3)
    e.run(BASE, 10)
    assert seen == [13]
    e.clear_exception()
    e.set_cpl(0)
    e.run(BASE, 10)
    assert seen == [13] and e.reg("rip") == BASE + 4


def test_flush_page_drops_one_translation_only():
    """Engine.flush_page (QEMU's tlb_flush_page through uc_struct.cpu):
    the flushed page is filled again, the others are not."""
    e = engine("mov rax, qword ptr [0x5000]\nmov rax, qword ptr [0x6000]\nhlt", python_mmu=True)
    fills = []
    e.on_fill(lambda vaddr, access: (fills.append(vaddr & ~0xFFF), (vaddr & ~0xFFF, 7))[1])
    e.run(BASE, 100)
    assert sorted(set(fills)) == [BASE, 0x5000, 0x6000]
    fills.clear()
    e.flush_page(0x5000)
    e.run(BASE, 100)
    assert fills == [0x5000]
    fills.clear()
    e.flush_tlb()
    e.run(BASE, 100)
    assert sorted(fills) == [BASE, 0x5000, 0x6000]


def test_direct_register_access_matches_the_binding():
    from unicorn import x86_const as x86c

    from hv.hw.engine import _REGS
    e = engine("nop")
    for name, value in (("rax", 2**64 - 1), ("r15", 0x1234), ("rip", BASE + 1), ("cr2", 0xDEAD000)):
        e.set_reg(name, value)
        assert e.reg(name) == e.uc.reg_read(_REGS[name]) == value
    # Selectors, and the descriptor tables and TR, are read in place too.
    e.uc.reg_write(x86c.UC_X86_REG_GDTR, (0, 0x12345000, 0x7F, 0))
    e.uc.reg_write(x86c.UC_X86_REG_IDTR, (0, 0xFFFF_8000_0000_1000, 0xFFF, 0))
    e.uc.reg_write(x86c.UC_X86_REG_TR, (0x28, 0x6000, 0x67, 0x8B00))
    assert e.gdtr() == (0x12345000, 0x7F) and e.idtr() == (0xFFFF_8000_0000_1000, 0xFFF)
    assert e.tr_base() == 0x6000
    for name, value in (("cs", 0x33), ("ss", 0x2B)):
        e.set_reg(name, value)
        assert e.reg(name) == e.uc.reg_read(_REGS[name]) == value


def test_the_cpu_probe_finds_the_same_cpu_beside_earlier_engines(monkeypatch):
    """The probe for QEMU's CPU state in a uc_struct, done again and again
    while the heap moves on and holds the engines of earlier probes, alive
    (as a process's earlier guests are) or freed: their states, and stray
    pointers, must not be taken for this one's."""
    import unicorn

    from hv.hw import engine as engine_mod
    layout, uc_class, held = engine_mod._cpu_layout(), unicorn.Uc, []
    rng = random.Random(1)

    def sometimes_kept(*args):
        uc = uc_class(*args)
        if rng.random() < 0.3:
            held.append(uc)
        return uc

    monkeypatch.setattr(engine_mod.uc_mod, "Uc", sometimes_kept)
    for _ in range(300):
        held.append(bytearray(rng.randrange(200_000)))
        if rng.random() < 0.5:
            held.pop(rng.randrange(len(held)))
        monkeypatch.setattr(engine_mod, "_CPU_LAYOUT", None)
        assert engine_mod._cpu_layout() == layout


def test_host_writes_leave_translated_code_stale_until_invalidated():
    """Why the VMM drops translations after writing guest code through host
    memory (VM._vmm_wrote, Engine.invalidate_code): QEMU does not see it."""
    e = engine("mov eax, 1\nhlt")
    e.run(BASE, 10)
    e._mem.write(BASE, bytes(_ks.asm("mov eax, 2\nhlt", BASE)[0]))
    e.set_reg("rax", 0)
    e.run(BASE, 10)
    assert e.reg("rax") == 1                    # the old translation ran
    e.invalidate_code(BASE, 16)
    e.set_reg("rax", 0)
    e.run(BASE, 10)
    assert e.reg("rax") == 2


def test_qemu_marks_an_int_n_as_a_software_interrupt():
    """Why VCpu._interrupt can tell INT 0x0e from a #PF: QEMU's
    exception_is_int (no error code, CR2 untouched, no VMCS bitmap exit)."""
    seen = {}
    for src in ("int 0x0e\nhlt", "xor eax, eax\ndiv eax\nhlt"):
        e = engine(src)
        e.on_interrupt(lambda vector, e=e, src=src: seen.setdefault(src, e.software_interrupt())
                       or e.stop())
        e.run(BASE, 10)
    assert seen == {"int 0x0e\nhlt": True, "xor eax, eax\ndiv eax\nhlt": False}


def test_the_interrupt_hook_sees_an_int_n_after_it_and_a_fault_at_it():
    """Unicorn moves RIP past an INT n before its interrupt hook runs (the
    INT's own address is lost: VCpu._interrupt takes the length of CC or
    CD n off), and leaves it at a faulting instruction."""
    for src, at in (("nop\nint3\nhlt", 2), ("nop\nint 3\nhlt", 3), ("nop\nint 0x21\nhlt", 3),
                    ("nop\nxor eax, eax\ndiv eax\nhlt", 3)):
        e = engine(src)
        seen = []
        e.on_interrupt(lambda vector, e=e, seen=seen: seen.append(e.reg("rip")) or e.stop())
        e.run(BASE, 10)
        assert seen == [BASE + at], src


_ks32 = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
# A flat 32-bit code (0x08) and data (0x10) segment, and a 64-bit code segment (0x18).
_GDT = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF9A000000FFFF)
# INC EAX (40) is INC in 32-bit code and a REX prefix in 64-bit code.
_TO_LONG_MODE = """
    mov eax, 1
    inc eax
    push eax
    pop ebx
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
"""


def _protected_mode_engine(leave: bool) -> Engine:
    """An engine made as hv makes one (64-bit), then given 32-bit state
    through the register API: EFER 0, CR0.PE, 32-bit CS and DS (`leave`:
    after leaving long mode by CR0.PG)."""
    import struct
    mem = PhysMem(2 << 20)
    code = bytes(_ks32.asm(_TO_LONG_MODE, BASE)[0]) + b"\xea" + struct.pack("<IH", 0x3000, 0x18)
    mem.write(BASE, code)
    mem.write(0x3000, bytes(_ks.asm("mov ecx, 1\ninc ecx\nmov rdx, rcx\nhlt", 0x3000)[0]))
    mem.write(0x500, struct.pack("<4Q", *_GDT))
    e = Engine(mem.host_addr, mem.size, python_mmu=True)
    e._mem = mem
    e.on_fill(lambda vaddr, access: (vaddr, 7))     # paging is the guest's business
    e.set_gdtr(0x500, 31)
    if leave:
        e.leave_long_mode()
        e.load_segments(0x08, 0x10, struct.pack("<4Q", *_GDT))
    else:
        e.set_msr(0xC0000080, 0)
        e.set_reg("cr0", 0x11)
        e.set_reg("cs", 0x08)
        for seg in ("ds", "es", "ss"):
            e.set_reg(seg, 0x10)
    e.set_reg("rsp", 0x12000)         # above 64 KiB: a 16-bit stack would wrap
    return e


def mem_word(e: Engine, addr: int) -> int:
    return int.from_bytes(e._mem.read(addr, 4), "little")


def test_a_64_bit_engine_writing_efer_cr0_and_cs_stays_in_64_bit_mode():
    """Unicorn's register API sets EFER, CR0 and CS but not the hflags QEMU
    decodes by, and WRMSR keeps EFER.LMA: the engine stays in 64-bit mode
    (the INC is a REX prefix, and the far jump, invalid there, stops it)."""
    e = _protected_mode_engine(leave=False)
    assert e.code_bits() == 64 and e.msr(0xC0000080) & 0x400
    with pytest.raises(Exception, match="INSN_INVALID"):
        e.run(BASE, 50)
    assert e.reg("rbx") == 1


def test_leave_long_mode_runs_32_bit_code_and_the_guests_switch_to_long_mode():
    e = _protected_mode_engine(leave=True)
    assert e.code_bits() == 32 and e.msr(0xC0000080) == 0 and e.reg("cr0") == 0x11
    e.run(BASE, 50)
    assert e.reg("rbx") == 2                            # INC ran as INC
    assert mem_word(e, 0x11FFC) == 2                    # pushed on the 32-bit stack
    assert e.code_bits() == 64                          # the far jump entered 64-bit code
    assert e.reg("rcx") == e.reg("rdx") == 2 and e.reg("rip") == 0x3000 + 11
    assert e.msr(0xC0000080) & 0x500 == 0x500          # LME, and LMA set by CR0.PG


def test_a_real_mode_cs_write_leaves_the_base_and_enter_real_mode_sets_it():
    """In real mode the register API writes CS's selector but not its base
    (selector x 16): code would run from linear IP. enter_real_mode sets it."""
    mem = PhysMem(2 << 20)
    mem.write(0x8000, bytes.fromhex("b0 42 f4"))        # mov al, 0x42; hlt
    mem.write(0x0000, bytes.fromhex("b0 11 f4"))        # mov al, 0x11; hlt
    e = Engine(mem.host_addr, mem.size, python_mmu=True)
    e._mem = mem
    e.on_fill(lambda vaddr, access: (vaddr, 7))
    e.leave_long_mode()
    e.set_reg("cr0", 0x10)
    e.set_reg("cs", 0x800)
    assert e._cs_base.value == 0
    e.enter_real_mode(0x800)
    assert e._cs_base.value == 0x8000 and e.code_bits() == 16
    e.run(0, 10)
    assert e.reg("rax") & 0xFF == 0x42


def test_the_default_cpu_has_no_stac_broadwell_no_pke_and_the_engines_model_both():
    import unicorn
    from unicorn import x86_const

    def bare(model=None):
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        if model is not None:
            uc.ctl_set_cpu_model(model)
        uc.mem_map(0x1000, 0x1000)
        return uc
    uc = bare()
    uc.mem_write(0x1000, bytes.fromhex("0f01cb f4"))       # stac; hlt
    with pytest.raises(unicorn.UcError, match="INSN_INVALID"):
        uc.emu_start(0x1000, 0x2000, count=1)
    uc = bare(x86_const.UC_CPU_X86_BROADWELL)
    uc.mem_write(0x1000, bytes(_ks.asm("mov rax, cr4\nor rax, 0x400000\nmov cr4, rax\n"
                                       "mov rbx, cr4\nhlt", 0x1000)[0]))
    uc.emu_start(0x1000, 0x2000, count=4)
    assert not uc.reg_read(x86_const.UC_X86_REG_RBX) & 1 << 22     # MOV to CR4 drops PKE
    e = engine("stac\nmov rax, cr4\nor rax, 0x400000\nmov cr4, rax\nmov rbx, cr4\n"
               "xor ecx, ecx\nxor edx, edx\nmov eax, 12\nwrpkru\nxor eax, eax\nrdpkru\nhlt")
    e.run(BASE, 100)
    assert e.alignment_check() and e.reg("rflags") & 1 << 18
    assert e.reg("rbx") & 1 << 22 and e.reg("rax") == 12


def test_a_stop_from_a_device_write_runs_the_write_again():
    """A stop requested in an MMIO write callback ends the run before the
    instruction completes: RIP stays on it and the next run writes again
    (hv.vmm.vcpu ends such a slice at the next instruction instead)."""
    e = engine("mov dword ptr [0x200000], 7\nnop\nhlt")
    writes = []
    e.map_mmio(0x200000, 0x1000, lambda off, n: 0,
               lambda off, n, value: (writes.append(value), e.stop()))
    assert e.run(BASE, 100) == 1
    assert e.reg("rip") == BASE and writes == [7]
    e.run(BASE, 100)
    assert writes == [7, 7]


def test_a_device_write_that_moves_rip_on_and_stops_is_done_once():
    """What hv.vmm.vcpu does instead: the store is done, RIP moves past it."""
    e = engine("mov dword ptr [0x200000], 7\nnop\nnop\nhlt")
    writes = []

    def write(off, n, value):
        writes.append(value)
        e.set_reg("rip", BASE + 10)         # the 10-byte MOV's end
        e.stop()
    e.map_mmio(0x200000, 0x1000, lambda off, n: 0, write)
    assert e.run(BASE, 100) == 1 and e.reg("rip") == BASE + 10
    assert e.run(BASE + 10, 100) == 3 and writes == [7]


def test_a_hook_added_from_a_device_write_misses_its_block():
    """Unicorn does not retranslate the block running: a code hook added
    in a device-memory callback does not fire in it (one added in a code
    hook does: hv.hw.after sets its hooks there)."""
    e = engine("mov dword ptr [0x200000], 7\nnop\nnop\nhlt")
    fired = []
    e.map_mmio(0x200000, 0x1000, lambda off, n: 0,
               lambda off, n, value: e.hook_code_at(BASE + 10, fired.append))
    e.run(BASE, 100)
    assert fired == []
    e = engine("nop\nnop\nnop\nhlt")
    e.hook_code_at(BASE, lambda _a: not fired and e.hook_code_at(BASE + 1, fired.append))
    e.run(BASE, 100)
    assert fired == [BASE + 1]


def test_a_move_from_cr8_reads_zero_under_unicorn():
    """QEMU under Unicorn keeps no TPR: hv carries out MOV to and from CR8."""
    e = engine("mov rax, 9\nmov cr8, rax\nmov rbx, cr8\nhlt")
    e.run(BASE, 100)
    assert e.reg("rbx") == 0


def test_the_compiled_site_hook_is_built_where_a_c_compiler_is():
    import shutil
    import sysconfig
    from hv.hw import engine as hw_engine
    if shutil.which(sysconfig.get_config_var("CC").split()[0]) is None:
        pytest.skip("no C compiler here: hv runs with a Unicorn hook per address (slower)")
    assert hw_engine._sites is not None, "hv/hw/_sites.c was not built at install (pip install -e .)"


@pytest.mark.parametrize("guest,mmu", [("ctxswitch", "shadow"), ("forkwait", "ept"),
                                       ("pgfault", "native")])
def test_a_hook_per_address_counts_the_same_as_the_compiled_hook(monkeypatch, guest, mmu):
    """The fallback of an install without a C compiler (hv.hw.engine)."""
    import hv
    from hv.hw import engine as hw_engine
    compiled = hv.run(guest, mmu)
    monkeypatch.setattr(hw_engine, "_sites", None)
    per_address = hv.run(guest, mmu)
    assert compiled.to_json() == per_address.to_json()


def test_qemu_keeps_cr3_bit_63_and_does_not_decode_invpcid():
    """With CR4.PCIDE, bit 63 of MOV to CR3 says "do not flush" and is never
    loaded (SDM Vol.2B "MOV-Move to/from Control Registers"); QEMU 5 loads
    it, so hv hands QEMU the value without it (hv.vmm.vcpu). QEMU 5 does not
    decode INVPCID at all: hv carries it out."""
    e = engine("mov rax, cr4\nor rax, 0x20000\nmov cr4, rax\n"
               "mov rax, 0x8000000000000005\nmov cr3, rax\nmov rbx, cr3\nhlt")
    e.run(BASE, 100)
    assert e.reg("rbx") == 0x8000_0000_0000_0005
    e = engine("invpcid rax, [rsi]\nhlt")
    with pytest.raises(Exception, match="INSN_INVALID"):
        e.run(BASE, 100)
