"""The vCPU engine: the only module that touches Unicorn.

One Engine per vCPU. It maps the VM's memory, installs hooks that call
plain Python callables, reads and writes registers by name, runs the guest
for a bounded number of instructions and reports how many it started.

These facts about Unicorn 2.1.4 shape this module (tests/test_engine.py
pins each, BENCHMARKS.md measures the cost of counting; ARCHITECTURE.md,
"Exceptions", says why they matter):

- unicorn#1883: CPUX86State.old_exception is never cleared, so the second
  exception is reported as #DF and the third stops the guest silently.
  `clear_exception()` resets it in place.
- Unicorn does not say how many instructions `emu_start(count=N)` ran when
  a hook stopped it early; its counter lives in `uc_struct.emu_counter`,
  found once per process by `_counter_offset()`.
- With Unicorn's own MMU a #PF's error code is only in CPUX86State.error_code.
- The TLB fill callback gets the page of the access; the failed access's
  address is in `uc_struct.invalid_addr` (`fault_address()`), found once
  per process by `_fault_offset()`.
- Writing CS or SS does not change QEMU's CPL (hflags); `set_cpl` does.
- Unicorn's default x86 CPU decodes no STAC or CLAC and drops CR4.SMAP (so
  QEMU never keeps its TLB apart by EFLAGS.AC); Broadwell drops CR4.PKE
  and decodes no RDPKRU or WRPKRU: the engine runs QEMU's Skylake-Server
  model, whose features cover what hv may present.
- QEMU 5 loads bit 63 of a MOV to CR3 with CR4.PCIDE (the no-flush bit,
  which CR3 never holds) and does not decode INVPCID (an invalid opcode):
  hv.vmm.vcpu hands QEMU the value without the bit, and runs INVPCID itself.
- An engine created in 64-bit mode keeps decoding 64-bit code after EFER,
  CR0 and CS are written: QEMU decodes by hflags (HF_LMA, HF_CS64), and
  WRMSR never clears EFER.LMA. Clearing CR0.PG with LMA set leaves long
  mode as on a CPU (`leave_long_mode`); segments loaded after that get
  legacy hflags, and the guest's own switch to IA-32e mode (CR0.PG with
  EFER.LME, a far jump to a 64-bit code segment) runs as on a CPU. But a
  register write of SS leaves HF_SS32 (32-bit stack) clear: pushes would
  wrap at 64 KiB; `load_segments` sets it from the descriptor's B bit.
  Nor does a write of CS in real mode clear the 32-bit code flag or load
  CS's base (selector x 16): `enter_real_mode` sets all three.
- For INT n the interrupt hook sees RIP after the instruction (QEMU's
  exception_next_eip), for a fault RIP at it; `software_interrupt()` tells them apart.
- Writes through host memory (the VMM's) leave QEMU's translated code of
  that memory stale; QEMU's tb_invalidate_phys_range is exported and takes
  the uc_struct and physical addresses (RAM is mapped at 0): `invalidate_code`.
- uc_ctl can only flush Unicorn's whole TLB; QEMU's tlb_flush_page is
  exported, and needs the CPUState that `uc_struct.cpu` points at, found
  once per process by `_cpu_layout()`, with the CPUX86State (`env`) in it.
- Counting instructions (emu_start's count) calls a helper on every
  instruction that walks the whole list of code hooks, so each hooked
  address slows every instruction: `hook_code_at` keeps
  its addresses in one compiled hook's table (hv/hw/_sites.c). A code hook
  added from a device-memory callback misses the block running; one added
  from a code hook does not. A stop requested from a device write makes
  QEMU run the store again unless RIP was moved past it.
- The binding's reg_read, context save/restore and hook wrappers cost
  microseconds; QEMU keeps the registers, hflags (CPL) and its exception
  state in `env`, so the engine reads those fields in place and registers
  every hook with uc_hook_add itself, each a single ctypes callback.
"""
from __future__ import annotations

import ctypes
import functools
import os
import struct
from typing import Callable

import unicorn as uc_mod
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86c

from ..errors import HvError

# Offsets in CPUX86State (`env`) for unicorn 2.1.4 (qemu/target/i386/cpu.h);
# a saved context is a copy of env after a 40-byte header.
_CTX_SIZE = 5608
_ENV_RIP = 128                  # after regs[16]
_ENV_EFLAGS = 136               # after eip: IF, AC and the other system flags, kept
_ENV_HFLAGS = 176               # HF_CPL_MASK: bits 1:0
# After hflags2: segs[6] (ES, CS, SS, DS, FS, GS), ldt, tr, gdt, idt, each a
# SegmentCache of 24 bytes: selector (u32), base (u64, at 8), limit (u32, at
# 16), flags (u32, at 20).
_ENV_SEGS, _SEG_SIZE = 184, 24
_SEG_CS, _SEG_SS, _SEG_TR, _SEG_GDT, _SEG_IDT = 1, 2, 7, 8, 9
_ENV_CS_BASE = _ENV_SEGS + _SEG_CS * _SEG_SIZE + 8
_ENV_SS_FLAGS = _ENV_SEGS + _SEG_SS * _SEG_SIZE + 20    # DPL in bits 14:13
_ENV_ERROR_CODE = 5384
_ENV_EXCEPTION_IS_INT = 5388    # 1 when the exception is an INT n (INT3, INTO)
_ENV_OLD_EXCEPTION = 5496
# hflags bits (qemu/target/i386/cpu.h): what QEMU decodes code as.
_HF_INHIBIT_IRQ, _HF_CS32, _HF_SS32, _HF_CS64 = 1 << 3, 1 << 4, 1 << 5, 1 << 15
_HF_PE, _HF_LMA = 1 << 7, 1 << 14
_AC = 1 << 18                   # EFLAGS.AC
# General registers in env.regs order (QEMU's R_EAX..R_R15).
_GPRS = "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split()


_REGS = {name: getattr(x86c, f"UC_X86_REG_{name.upper()}") for name in (
    "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags "
    "cs ds es fs gs ss cr0 cr2 cr3 cr4 fs_base gs_base").split()}
# Sub-registers that instruction operands may name (capstone's names).
for _w in ("eax ebx ecx edx esi edi ebp esp r8d r9d r10d r11d r12d r13d r14d r15d "
           "ax bx cx dx si di bp sp r8w r9w r10w r11w r12w r13w r14w r15w al bl cl dl").split():
    _REGS[_w] = getattr(x86c, f"UC_X86_REG_{_w.upper()}")

UC_MEM_READ = ucc.UC_MEM_READ        # access codes of the TLB-fill callback
_uclib = uc_mod.unicorn_py3.unicorn.uclib


class EngineError(HvError):
    """Unicorn stopped for a reason the VMM did not arrange."""


def _counter_offset() -> int:
    """Offset of `uc_struct.emu_counter`, found by running a known number of
    instructions twice and looking for the counter and the limit side by side
    (hook_count_cb counts the instruction it stops before)."""
    global _COUNTER_OFFSET
    if _COUNTER_OFFSET is None:
        found = None
        for count in (37, 101):
            uc = uc_mod.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
            uc.mem_map(0x1000, 0x1000)
            uc.mem_write(0x1000, b"\x90" * 0x1000)
            uc.emu_start(0x1000, 0, count=count)
            raw = ctypes.string_at(ctypes.cast(uc._uch, ctypes.c_void_p).value, 8192)
            hits = {off for off in range(0, len(raw) - 16, 8)
                    if struct.unpack_from("<QQ", raw, off) == (count + 1, count)}
            found = hits if found is None else found & hits
        if len(found) != 1:
            raise HvError("this unicorn build is not supported: pin unicorn==2.1.4")
        _COUNTER_OFFSET = found.pop()
    return _COUNTER_OFFSET


_COUNTER_OFFSET: int | None = None


def _fault_offset() -> int:
    """Offset of `uc_struct.invalid_addr`: the full address of the access
    whose TLB fill failed (the fill callback only gets its page), found by
    failing fills at two known addresses and looking for both in the same
    place after the instruction counter."""
    global _FAULT_OFFSET
    if _FAULT_OFFSET is None:
        found = None
        start = _counter_offset()
        for address in (0x5A5A_1234_5678, 0x3C3C_8765_4321):
            uc = uc_mod.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
            uc.mem_map(0x1000, 0x1000)
            uc.mem_write(0x1000, bytes.fromhex("488b03f4"))     # mov rax, [rbx]; hlt
            uc.reg_write(x86c.UC_X86_REG_RBX, address)
            uc.ctl_set_tlb_mode(ucc.UC_TLB_VIRTUAL)
            uc.hook_add(ucc.UC_HOOK_TLB_FILL, lambda uc, va, access, entry, _d:
                        va < 0x2000 and setattr(entry, "paddr", va) is None
                        and setattr(entry, "perms", 7) is None)
            try:
                uc.emu_start(0x1000, 0)
            except uc_mod.UcError:
                pass
            raw = ctypes.string_at(ctypes.cast(uc._uch, ctypes.c_void_p).value + start, 512)
            hits = {start + off for off in range(0, len(raw) - 8, 8)
                    if struct.unpack_from("<Q", raw, off)[0] == address}
            found = hits if found is None else found & hits
        if len(found) != 1:
            raise HvError("this unicorn build is not supported: pin unicorn==2.1.4")
        _FAULT_OFFSET = found.pop()
    return _FAULT_OFFSET


_FAULT_OFFSET: int | None = None


def _read_process(addr: int, length: int) -> bytes:
    """Bytes of this process's memory, or b"" where nothing is mapped
    (/proc/self/mem fails where a pointer dereference would crash)."""
    try:
        with open("/proc/self/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(length)
    except (OSError, ValueError, OverflowError):
        return b""


def _cpu_layout() -> tuple[int, int]:
    """(offset of `uc_struct.cpu` (QEMU's CPUState), offset of its
    CPUX86State `env` from the CPUState): cpu is the one pointer in
    uc_struct to a structure that embeds the CPU state (found by register
    values written for the purpose), points at it from near its start
    (`env_ptr`) and back at the uc_struct (`uc`). The values are fresh,
    so an earlier engine's state cannot match; a stray pointer a little
    before the CPUState (found in 1 of 300 probes) is told apart by its
    longer way to the same env."""
    global _CPU_LAYOUT
    if _CPU_LAYOUT is None:
        uc = uc_mod.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
        values = struct.unpack("<4Q", os.urandom(32))
        for reg, value in zip((x86c.UC_X86_REG_RAX, x86c.UC_X86_REG_RCX, x86c.UC_X86_REG_RDX,
                               x86c.UC_X86_REG_RBX), values):
            uc.reg_write(reg, value)
        pattern = struct.pack("<4Q", *values)
        handle = ctypes.cast(uc._uch, ctypes.c_void_p).value
        raw = ctypes.string_at(handle, _counter_offset())
        found = []
        for off in range(0, len(raw), 8):
            (ptr,) = struct.unpack_from("<Q", raw, off)
            if ptr & 7 or not 0x10000 < ptr < 1 << 47:
                continue
            data = _read_process(ptr, 0x40000)
            env = data.find(pattern)
            if env <= 0 or env % 8:
                continue
            words = struct.unpack_from(f"<{env // 8}Q", data)
            if ptr + env in words[:0x200] and handle in words:
                found.append((ptr + env, env, off))
        if not found or len({env_at for env_at, _, _ in found}) != 1:
            raise HvError("this unicorn build is not supported: pin unicorn==2.1.4")
        _, env, off = min(found)
        _CPU_LAYOUT = off, env
    return _CPU_LAYOUT


_CPU_LAYOUT: tuple[int, int] | None = None
_tb_invalidate_phys_range = _uclib.tb_invalidate_phys_range_x86_64
_tb_invalidate_phys_range.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)
_tb_invalidate_phys_range.restype = None
_tlb_flush_page = _uclib.tlb_flush_page_x86_64
_tlb_flush_page.argtypes = (ctypes.c_void_p, ctypes.c_uint64)
_tlb_flush_page.restype = None
_uc_reg_read = _uclib.uc_reg_read
# Called from Engine.run itself: no binding frame between run's and the
# hooks' (Engine.interrupt tells them apart).
_uc_emu_start = _uclib.uc_emu_start
_uc_ctl = _uclib.uc_ctl
# uc_ctl's code for "flush the TLB": UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0) in unicorn.h.
_CTL_TLB_FLUSH = ucc.UC_CTL_IO_WRITE << 30 | ucc.UC_CTL_TLB_FLUSH


class _TlbEntry(ctypes.Structure):
    _fields_ = (("paddr", ctypes.c_uint64), ("perms", ctypes.c_uint32))


# Callback prototypes (unicorn.h): the engine, the event's arguments, user data.
_P, _U64, _U32, _INT = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
_FILL_CB = ctypes.CFUNCTYPE(ctypes.c_bool, _P, _U64, _INT, _P, _P)      # uc_cb_tlbevent_t
_CODE_CB = ctypes.CFUNCTYPE(None, _P, _U64, _U32, _P)                   # uc_cb_hookcode_t
_INTR_CB = ctypes.CFUNCTYPE(None, _P, _U32, _P)                         # uc_cb_hookintr_t
_IN_CB = ctypes.CFUNCTYPE(_U32, _P, _U32, _INT, _P)                     # uc_cb_insn_in_t
_OUT_CB = ctypes.CFUNCTYPE(None, _P, _U32, _INT, _U32, _P)              # uc_cb_insn_out_t
_INVALID_CB = ctypes.CFUNCTYPE(ctypes.c_bool, _P, _P)                   # uc_cb_hookinsn_invalid_t
_CPUID_CB = ctypes.CFUNCTYPE(_U32, _P, _P)                              # uc_cb_insn_cpuid_t

try:
    from . import _sites            # the compiled code hook (hv/hw/_sites.c)
except ImportError:                 # no C compiler at install: a hook per address
    _sites = None


class _Sites(ctypes.Structure):
    """struct hv_sites of hv/hw/_sites.c: the hooked addresses."""
    _fields_ = (("slots", ctypes.POINTER(ctypes.c_uint64)), ("shift", ctypes.c_uint64),
                ("site", _CODE_CB))


_FIB = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1

_uc_reg_write = _uclib.uc_reg_write
# Registers read and written as one 64-bit value through a direct call
# (the binding's reg_read costs several times more).
_WIDE = frozenset(getattr(x86c, f"UC_X86_REG_{n.upper()}") for n in (
    "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags "
    "cr0 cr2 cr3 cr4 fs_base gs_base").split())
# Segment selectors are written the same way (Unicorn reads 16 bits of the
# value and loads the descriptor); read in place (Engine._fast).
_DIRECT_WRITE = _WIDE | {getattr(x86c, f"UC_X86_REG_{n.upper()}")
                         for n in "cs ss ds es fs gs".split()}


class Engine:
    """One vCPU on Unicorn.

    `python_mmu`: Unicorn's TLB is filled by the `on_fill` callback
    (UC_TLB_VIRTUAL); otherwise QEMU's own MMU walks the guest tables (the
    oracle).
    """

    def __init__(self, host_addr: int, size: int, python_mmu: bool = True):
        self.uc = uc = uc_mod.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
        # QEMU's Skylake-Server: the instructions and CR4 bits of every
        # feature hv may present (STAC and CLAC for SMAP, CR4.PKE, RDPKRU and
        # WRPKRU); hv's CPUID says which the guest has.
        uc.ctl_set_cpu_model(x86c.UC_CPU_X86_SKYLAKE_SERVER)
        uc.mem_map_ptr(0, size, ucc.UC_PROT_ALL, host_addr)
        self.python_mmu = python_mmu
        if python_mmu:
            uc.ctl_set_tlb_mode(ucc.UC_TLB_VIRTUAL)
        # No `until` address: with an `until` Unicorn translates a block at
        # until-1 when a hook stops it, a fetch the guest never made.
        uc.ctl(ucc.UC_CTL_UC_USE_EXITS, ucc.UC_CTL_IO_WRITE, 1)
        self._counter = ctypes.c_uint64.from_address(
            ctypes.cast(uc._uch, ctypes.c_void_p).value + _counter_offset())
        self._fault_address = ctypes.c_uint64.from_address(
            ctypes.cast(uc._uch, ctypes.c_void_p).value + _fault_offset())
        self.error: BaseException | None = None   # first exception raised in a hook
        self._stopped_at: int | None = None     # the counter when a hook asked to stop
        self.ran_out = False            # the last run ended at its limit
        self._hooks = []                           # keep ctypes callbacks alive
        self._site_fns: dict[int, list[Callable[[int], None]]] | None = None   # hook_code_at
        self._handle = uc._uch
        self._uc_ptr = ctypes.cast(uc._uch, ctypes.c_void_p).value    # the uc_struct
        self._running = False
        self._stale: list[tuple[int, int]] = []    # code ranges to drop after this run
        self._value = ctypes.c_uint64()
        self._value_ref = ctypes.byref(self._value)
        cpu_offset, env_offset = _cpu_layout()
        self._cpu = ctypes.c_void_p.from_address(
            ctypes.cast(uc._uch, ctypes.c_void_p).value + cpu_offset).value
        # flush_page(vaddr): drop Unicorn's translation of the 4 KiB page of
        # vaddr, in every MMU index (legal inside the fill callback: Unicorn's
        # fills are 4 KiB). QEMU's function bound to this CPU: one Python
        # call less on every TLB eviction.
        self.flush_page = functools.partial(_tlb_flush_page, self._cpu)
        env = self._cpu + env_offset
        # Live views of QEMU's state: reading one costs a tenth of a reg_read.
        self._fast = {name: ctypes.c_uint64.from_address(env + 8 * i)
                      for i, name in enumerate(_GPRS)}
        # Writes of RIP go through Unicorn, which must end the block it is in.
        self._fast_gprs = dict(self._fast)
        self._fast["rip"] = ctypes.c_uint64.from_address(env + _ENV_RIP)
        # Selectors read in place (written through Unicorn, which loads the
        # descriptor); the descriptor tables' and TR's base and limit too.
        for name, seg in (("cs", _SEG_CS), ("ss", _SEG_SS)):
            self._fast[name] = ctypes.c_uint32.from_address(env + _ENV_SEGS + seg * _SEG_SIZE)
        self._tables = {seg: (ctypes.c_uint64.from_address(env + _ENV_SEGS + seg * _SEG_SIZE + 8),
                              ctypes.c_uint32.from_address(env + _ENV_SEGS + seg * _SEG_SIZE + 16))
                        for seg in (_SEG_TR, _SEG_GDT, _SEG_IDT)}
        self.hflags = ctypes.c_uint32.from_address(env + _ENV_HFLAGS)
        self._eflags = ctypes.c_uint64.from_address(env + _ENV_EFLAGS)
        self._ss_flags = ctypes.c_uint32.from_address(env + _ENV_SS_FLAGS)
        self._cs_base = ctypes.c_uint64.from_address(env + _ENV_CS_BASE)
        self._error_code = ctypes.c_int32.from_address(env + _ENV_ERROR_CODE)
        self._exception_is_int = ctypes.c_int32.from_address(env + _ENV_EXCEPTION_IS_INT)
        self._old_exception = ctypes.c_int32.from_address(env + _ENV_OLD_EXCEPTION)
        if uc.context_save().size != _CTX_SIZE:
            raise HvError("this unicorn build is not supported (CPU state layout): "
                          "pin unicorn==2.1.4")

    # -- registers -----------------------------------------------------------
    def reg(self, name: str) -> int:
        fast = self._fast.get(name)
        if fast is not None:
            return fast.value
        reg = _REGS[name]
        if reg in _WIDE:
            _uc_reg_read(self._handle, reg, self._value_ref)
            return self._value.value
        return self.uc.reg_read(reg)

    def set_reg(self, name: str, value: int) -> None:
        fast = self._fast_gprs.get(name)
        if fast is not None:
            fast.value = value & 0xFFFF_FFFF_FFFF_FFFF
            return
        reg = _REGS[name]
        if reg in _DIRECT_WRITE:
            self._value.value = value & 0xFFFF_FFFF_FFFF_FFFF
            if _uc_reg_write(self._handle, reg, self._value_ref):
                raise EngineError(f"cannot write {name}")
            return
        self.uc.reg_write(reg, value)

    def msr(self, index: int) -> int:
        return self.uc.reg_read(x86c.UC_X86_REG_MSR, index)

    def set_msr(self, index: int, value: int) -> None:
        self.uc.reg_write(x86c.UC_X86_REG_MSR, (index, value))

    def _table(self, seg: int) -> tuple[int, int]:
        base, limit = self._tables[seg]
        return base.value, limit.value

    def gdtr(self) -> tuple[int, int]:
        return self._table(_SEG_GDT)

    def idtr(self) -> tuple[int, int]:
        return self._table(_SEG_IDT)

    def tr_base(self) -> int:
        return self._table(_SEG_TR)[0]

    def set_gdtr(self, base: int, limit: int) -> None:
        self.uc.reg_write(x86c.UC_X86_REG_GDTR, (0, base, limit, 0))

    def cpl(self) -> int:
        return self.hflags.value & 3

    def alignment_check(self) -> bool:
        """EFLAGS.AC (STAC sets it; SMAP lets a supervisor access user
        pages while it is set), read in place: QEMU keeps it in env."""
        return bool(self._eflags.value & _AC)

    def interrupt_shadow(self) -> bool:
        """Whether the last instruction was STI or a load of SS, which
        blocks interrupts until the next one has run (SDM Vol.3A §6.8.3)."""
        return bool(self.hflags.value & _HF_INHIBIT_IRQ)

    def code_bits(self) -> int:
        """What the CPU decodes code as now: 64, 32 or 16 (bits)."""
        flags = self.hflags.value
        return 64 if flags & _HF_CS64 else 32 if flags & _HF_CS32 else 16

    def cpu_mode(self) -> str:
        """"long" (IA-32e: EFER.LMA), "protected" (CR0.PE) or "real"."""
        flags = self.hflags.value
        return "long" if flags & _HF_LMA else "protected" if flags & _HF_PE else "real"

    def leave_long_mode(self) -> None:
        """Leave IA-32e mode as a CPU does, by clearing CR0.PG (QEMU then
        clears EFER.LMA and decodes legacy code); segments loaded after it
        get 32- or 16-bit hflags from their descriptors (this module's
        docstring). EFER, CR4 and CR0 are clear after it, but for CR0.PE."""
        self.set_reg("cr4", 0x20)               # PAE, without which QEMU refuses PG
        self.set_reg("cr0", 0x8000_0011)        # long mode: the state to leave
        self.set_reg("cr0", 0x11)
        self.set_reg("cr4", 0)
        self.set_msr(0xC000_0080, 0)

    def load_segments(self, cs: int, ds: int, gdt: bytes) -> None:
        """Load CS, and DS, ES, FS, GS and SS with `ds`, from `gdt` (the
        bytes of the GDT the engine has): QEMU's 32-bit stack flag from SS's
        descriptor, which the register API does not set."""
        self.set_reg("cs", cs)
        for seg in ("ss", "ds", "es", "fs", "gs"):
            self.set_reg(seg, ds)
        (desc,) = struct.unpack_from("<Q", gdt, ds & ~7)
        self.stack_flag(desc)

    def stack_flag(self, ss_desc: int) -> None:
        """QEMU's 32-bit stack flag for SS just written, from its descriptor's
        B bit (the register API leaves it as it was)."""
        if ss_desc >> 54 & 1 and self.code_bits() != 64:
            self.hflags.value |= _HF_SS32
        else:
            self.hflags.value &= ~_HF_SS32

    def enter_real_mode(self, cs: int) -> None:
        """The state INIT leaves (SDM Vol.3A §9.1.1, Table 9-1), at cs:0:
        real mode, 16-bit segments of base selector x 16."""
        self.leave_long_mode()
        self.set_reg("cr0", 0x10)
        self.set_reg("cs", cs)
        for seg in ("ds", "es", "ss", "fs", "gs"):
            self.set_reg(seg, 0)
        # The register API leaves CS's base (an engine made in 64-bit mode)
        # and the 32-bit code and stack flags: base selector x 16, 16-bit
        # code from here.
        self._cs_base.value = cs << 4
        self.hflags.value &= ~(_HF_CS32 | _HF_SS32)
        self.set_reg("rflags", 2)
        self.set_reg("rip", 0)

    # -- hooks (each callback's exceptions are kept, then re-raised by run) --
    # Hooks are registered with uc_hook_add directly, each a ctypes callback
    # that calls one plain function: the binding's wrappers cost a fraction
    # of a microsecond per event, on every TLB miss and every exit.
    def _guarded(self, fn: Callable, failed=None) -> Callable:
        """fn, keeping its exception for run() and stopping the engine (then
        `failed` goes back to Unicorn)."""
        def guarded(*args):
            try:
                return fn(*args)
            except BaseException as e:    # noqa: BLE001 - re-raised by run()
                if self.error is None:
                    self.error = e
                self.stop()
                return failed
        return guarded

    def _add(self, kind: int, prototype, fn: Callable, failed=None, begin: int = 1,
             end: int = 0, *extra) -> int:
        return self._register(kind, prototype(self._guarded(fn, failed)), begin, end, *extra)

    def _register(self, kind: int, cb, begin: int = 1, end: int = 0, *extra,
                  user_data: int | None = None) -> int:
        self._hooks.append(cb)
        handle = ctypes.c_size_t()
        err = _uclib.uc_hook_add(self._handle, ctypes.byref(handle), kind,
                                 ctypes.cast(cb, ctypes.c_void_p), user_data,
                                 ctypes.c_uint64(begin), ctypes.c_uint64(end), *extra)
        if err:
            raise EngineError(f"cannot add a hook: {uc_mod.UcError(err)}")
        return handle.value

    def on_fill(self, fill: Callable[[int, int], tuple[int, int] | None]) -> None:
        """fill(vaddr, access 0/1/2 = read/write/fetch) -> (paddr, perms) or None (fault).
        (Its own guard: one Python frame less on every TLB miss.)"""
        entries: dict[int, _TlbEntry] = {}     # Unicorn passes one or two addresses

        def cb(_uc, vaddr, access, entry_addr, _data):
            try:
                result = fill(vaddr, access - UC_MEM_READ)
            except BaseException as e:    # noqa: BLE001 - re-raised by run()
                if self.error is None:
                    self.error = e
                self.stop()
                return False
            if result is None:
                return False
            entry = entries.get(entry_addr)
            if entry is None:
                entry = entries[entry_addr] = _TlbEntry.from_address(entry_addr)
            entry.paddr, entry.perms = result
            return True
        self._register(ucc.UC_HOOK_TLB_FILL, _FILL_CB(cb))

    def on_out(self, out: Callable[[int, int, int], None]) -> None:
        self._add(ucc.UC_HOOK_INSN, _OUT_CB, lambda _uc, port, size, value, _d: out(port, size, value),
                  None, 1, 0, ctypes.c_int(x86c.UC_X86_INS_OUT))

    def on_in(self, in_: Callable[[int, int], int]) -> None:
        self._add(ucc.UC_HOOK_INSN, _IN_CB, lambda _uc, port, size, _d: in_(port, size),
                  0, 1, 0, ctypes.c_int(x86c.UC_X86_INS_IN))

    def on_interrupt(self, intr: Callable[[int], None]) -> None:
        self._add(ucc.UC_HOOK_INTR, _INTR_CB, lambda _uc, vector, _d: intr(vector))

    def on_invalid(self, invalid: Callable[[], bool]) -> None:
        """invalid() -> True if handled (RIP already moved), False to fault."""
        self._add(ucc.UC_HOOK_INSN_INVALID, _INVALID_CB, lambda _uc, _d: invalid(), False)

    def on_cpuid(self, cpuid: Callable[[], None]) -> None:
        """cpuid() runs CPUID in QEMU's place (it sets EAX..EDX; RIP moves on)."""
        def run(_uc, _d):
            cpuid()
            return 1        # QEMU's own CPUID is skipped
        self._add(ucc.UC_HOOK_INSN, _CPUID_CB, run, 1, 1, 0, ctypes.c_int(x86c.UC_X86_INS_CPUID))

    def map_mmio(self, paddr: int, size: int, read: Callable[[int, int], int],
                 write: Callable[[int, int, int], None]) -> None:
        """Device memory at physical [paddr, paddr+size): every access the
        guest makes there, once QEMU decoded it, is read(offset, size) or
        write(offset, size, value), never cached."""
        self.uc.mmio_map(paddr, size, self._guarded(lambda _uc, off, n, _d: read(off, n), 0), None,
                         self._guarded(lambda _uc, off, n, value, _d: write(off, n, value)), None)

    def hook_code_at(self, address: int, fn: Callable[[int], None]) -> None:
        """Call fn(address) before the instruction that starts at `address`
        runs, from this run on. With hv/hw/_sites.c built, one code hook
        looks every hooked address up; else each address has its own."""
        if _sites is None:
            self._add(ucc.UC_HOOK_CODE, _CODE_CB, lambda _uc, addr, _size, _d: fn(addr),
                      None, address, address)
            return
        if self._site_fns is None:
            self._site_fns = {}
            self._sites = _Sites(site=_CODE_CB(self._guarded(self._site)))
            self._grow_sites(6)
            self._register(ucc.UC_HOOK_CODE, _sites.HOOK, user_data=ctypes.addressof(self._sites))
        fns = self._site_fns.get(address)
        if fns is not None:
            fns.append(fn)
            return
        self._site_fns[address] = [fn]
        if 2 * len(self._site_fns) > len(self._slots):
            self._grow_sites(len(self._slots).bit_length())
        else:
            self._place_site(address)

    def _site(self, _uc, address: int, _size, _data) -> None:
        for fn in self._site_fns[address]:
            fn(address)
            if self._stopped_at is not None:
                break       # as Unicorn skips the hooks after one that stops

    def _grow_sites(self, bits: int) -> None:
        """A table of 2**bits slots with every hooked address (C reads it
        at each instruction; this runs between instructions)."""
        self._slots = (ctypes.c_uint64 * (1 << bits))()
        self._sites.slots = self._slots
        self._sites.shift = 64 - bits
        for address in self._site_fns:
            self._place_site(address)

    def _place_site(self, address: int) -> None:
        slots, shift = self._slots, self._sites.shift
        i = ((address * _FIB) & _M64) >> shift
        while slots[i]:
            i = (i + 1) % len(slots)
        slots[i] = address + 1

    # -- running -------------------------------------------------------------
    def run(self, pc: int, count: int) -> int:
        """Run from `pc` for at most `count` instructions; return how many
        started (an instruction that faults counts; the limit's is not run)."""
        self.error = None
        self._stopped_at = None
        self._running = True
        try:
            err = _uc_emu_start(self._handle, pc, 0, 0, count)
        finally:
            self._running = False
            for begin, end in self._stale:
                _tb_invalidate_phys_range(self._uc_ptr, begin, end)
            self._stale.clear()
        if err and self.error is None and err != ucc.UC_ERR_EXCEPTION:
            self.error = EngineError(f"unicorn stopped at rip={self.reg('rip'):#x}: "
                                     f"{uc_mod.UcError(err)}")
        # A stop requested by a hook takes effect after Unicorn has counted
        # the next instruction of the block, which never runs: count up to
        # the request.
        ran = min(self._counter.value if self._stopped_at is None else self._stopped_at, count)
        # Unicorn's limit counts the instruction it stops before: a run that
        # ended by itself (HLT), even at its last instruction, counted no more.
        self.ran_out = self._stopped_at is None and self._counter.value > count
        if self.error is not None:
            raise self.error
        return ran

    def fault_address(self) -> int:
        """The address of the access whose TLB fill failed last (the fill
        callback only sees its page)."""
        return self._fault_address.value

    def started(self) -> int:
        """Instructions started so far in the current run (call from a hook)."""
        return self._counter.value

    def stop(self) -> None:
        """End the run. From an instruction's code hook: before it runs,
        counted as started (it faults); from a memory callback: the access
        and its instruction are redone at the next run, unless RIP was moved
        past it."""
        if self._stopped_at is None:
            self._stopped_at = self._counter.value
        self.uc.emu_stop()

    def interrupt(self, frame) -> bool:
        """Stop the run from a signal handler whose interrupted frame is
        `frame`; whether it stopped. Python runs handlers between bytecodes:
        while emu_start runs those are a hook's, and the stop counts as a
        hook's. In run's own bytecodes, before emu_start (which clears a stop
        request and the counter) or after it, a stop would be lost or count
        the last run's instructions: the caller ends the slice after run."""
        if self._running and frame is not None and frame.f_code is not _RUN_CODE:
            self.stop()
            return True
        return False

    def invalidate_code(self, paddr: int, length: int, now: bool = False) -> None:
        """Drop the code Unicorn translated from physical [paddr, paddr+length):
        the VMM wrote there through host memory, which QEMU does not see.
        While this engine runs (a hook), after its emu_start returns: QEMU
        may be in such code; `now` from a fetch's TLB fill, where it is
        about to look up the code it drops (QEMU finishes the block it runs)."""
        if self._running and not now:
            self._stale.append((paddr, paddr + length))
        else:
            _tb_invalidate_phys_range(self._uc_ptr, paddr, paddr + length)

    def flush_tlb(self) -> None:
        """Drop every translation in Unicorn's TLB (legal inside the fill callback)."""
        _uc_ctl(self._handle, _CTL_TLB_FLUSH)

    # -- unicorn#1883 and QEMU's exception state ------------------------------
    def clear_exception(self) -> None:
        """Forget the exception QEMU thinks is in flight (unicorn#1883)."""
        self._old_exception.value = -1

    def set_cpl(self, cpl: int) -> None:
        """Make `cpl` the current privilege level. QEMU keeps CPL in hflags
        (from SS's DPL), which writing CS or SS with reg_write leaves alone."""
        self.hflags.value = (self.hflags.value & ~3) | cpl
        self._ss_flags.value = (self._ss_flags.value & ~(3 << 13)) | (cpl << 13)

    def software_interrupt(self) -> bool:
        """Whether the exception QEMU just raised is an INT n instruction's."""
        return bool(self._exception_is_int.value)

    def pending_error_code(self) -> int:
        """The error code QEMU computed for the exception it just raised."""
        return self._error_code.value & 0xFFFF_FFFF


_RUN_CODE = Engine.run.__code__
