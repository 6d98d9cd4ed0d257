"""A local APIC in xAPIC mode, one per vCPU: registers, priorities, IPIs, timer.

Source of truth: Intel SDM Vol.3A chapter 11 ("Advanced Programmable
Interrupt Controller"); where the SDM leaves a choice, KVM's
arch/x86/kvm/lapic.c (what kvm-unit-tests are written against) decides.
Pure Python: the vCPU maps the 4 KiB page at `base` and sends every aligned
32-bit access to `read`/`write`, asks `pending`/`ack` at instruction
boundaries, and calls `tick` when its clock reaches `deadline()`.

What hv models, and what it leaves out:
- Fixed interrupts are edge-triggered: TMR reads 0, and EOI goes to no
  I/O APIC. LINT0, LINT1, thermal and performance LVTs hold what is written
  and never fire (nothing drives them); CMCI is absent (VERSION says 6 LVT
  entries, as KVM without MCG_CMCI_P): it reads 0 and ignores writes.
- A reserved or write-only register reads 0 and ignores writes; ESR bit 7
  (illegal register address) is never set.
- IPIs leave through `send_ipi` as decoded `Ipi`s, a self-IPI too: the VMM
  routes them (and gives fixed ones to the target's `accept`). Not sent:
  logical destinations without a shorthand (hv routes physical IDs only),
  INIT level de-assert (no effect on an xAPIC, SDM Vol.3A §11.6.1), and
  fixed or lowest-priority IPIs with a vector below 16 (ESR bit 5).
- The timer counts the vCPU's clock (TSC cycles) divided by the divide
  configuration. Periodic mode re-arms from the previous deadline, and
  periods missed between two `tick`s coalesce into one interrupt (IRR holds
  one bit per vector). Mode 2 (TSC-deadline, not in hv's CPUID) and the
  reserved mode 3 keep their bits but run no timer.
- A software-disabled APIC (SPIV bit 8 clear) accepts no fixed interrupt
  (as KVM) and `pending` is None; IRR and ISR keep what they held.
- Clearing the global enable (APIC_BASE bit 11) returns the APIC to its
  power-up state, which SDM Vol.3A §11.4.3 allows, except TPR: CR8 still
  works without the APIC. While disabled the page stays mapped: reads are
  all ones and writes are dropped (KVM's default MMIO-hole behaviour, which
  kvm-unit-tests' apic_disable checks). x2APIC (bit 10) is not supported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..arch.paging import PAGE_SIZE, PHYS_MASK

APIC_DEFAULT_BASE = 0xFEE0_0000

# IA32_APIC_BASE (MSR 0x1B), SDM Vol.3A §11.4.4, Figure 11-5.
BASE_BSP = 1 << 8
BASE_ENABLE = 1 << 11
_BASE_ADDR = PHYS_MASK & ~(PAGE_SIZE - 1)

VERSION = 0x0005_0014       # xAPIC version 0x14, max LVT entry 5, no EOI-broadcast suppression

# Register offsets, SDM Vol.3A Table 11-1.
ID, VER, TPR, APR, PPR, EOI, RRD, LDR, DFR, SPIV = (
    0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0)
ISR, TMR, IRR, ESR = 0x100, 0x180, 0x200, 0x280
LVT_CMCI, ICR_LO, ICR_HI = 0x2F0, 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = (
    0x320, 0x330, 0x340, 0x350, 0x360, 0x370)
TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE = 0x380, 0x390, 0x3E0

SPIV_ENABLE = 1 << 8
LVT_MASKED = 1 << 16
TIMER_MODE = 3 << 17
TIMER_PERIODIC = 1 << 17
TIMER_TSC_DEADLINE = 2 << 17

# ESR bits, SDM Vol.3A §11.5.3, Figure 11-9.
ESR_SEND_ILLEGAL = 1 << 5
ESR_RECV_ILLEGAL = 1 << 6

# ICR fields, SDM Vol.3A §11.6.1, Figure 11-12.
DM_FIXED, DM_LOWEST, DM_NMI, DM_INIT, DM_STARTUP = 0, 1, 4, 5, 6
SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = 0, 1, 2, 3
ICR_LOGICAL = 1 << 11
ICR_ASSERT = 1 << 14
ICR_LEVEL_TRIGGER = 1 << 15
# Writable ICR bits: vector, delivery mode, destination mode, level, trigger
# mode, shorthand. Delivery status (bit 12) reads 0: delivery is immediate.
_ICR_BITS = 0x000C_CFFF

# Writable bits of each LVT entry, SDM Vol.3A Figure 11-8: vector and mask
# everywhere; delivery mode but timer and error; polarity and trigger mode
# on LINT0/1. Delivery status and remote IRR read 0.
_LVT_BITS = (
    0x0001_00FF | TIMER_MODE,  # timer
    0x0001_07FF,               # thermal
    0x0001_07FF,               # performance counters
    0x0001_A7FF,               # LINT0
    0x0001_A7FF,               # LINT1
    0x0001_00FF,               # error
)
_TIMER, _ERROR = 0, 5           # indices in LocalApic._lvt
_MASK32 = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class Ipi:
    """An ICR write, decoded (SDM Vol.3A §11.6.1). `dest` is ICR bits 63:56,
    a physical APIC ID (0xFF: all); with a shorthand the VMM ignores it.
    `mode` is the raw delivery mode: the VMM delivers DM_FIXED and DM_LOWEST
    as fixed (a physical destination names one APIC), DM_NMI, DM_INIT and
    DM_STARTUP (`vector` is then the start page), and drops the rest.
    `level` needs no look: the one message it changes, INIT de-assert, is
    never sent."""
    source: int         # the sender's APIC ID
    shorthand: int      # SH_*
    dest: int
    mode: int           # DM_*
    vector: int
    level: int          # ICR bit 14


def base_msr_valid(value: int) -> bool:
    """Whether WRMSR of `value` to IA32_APIC_BASE is legal; else #GP. The
    reserved bits are 7:0, 9, 10 (x2APIC enable: hv's CPUID has no x2APIC)
    and 63:MAXPHYADDR (SDM Vol.3A §11.4.4)."""
    return not value & ~(_BASE_ADDR | BASE_BSP | BASE_ENABLE)


def timer_divisor(divide_config: int) -> int:
    """The divide configuration register's bits 3, 1, 0 as 000 -> 2, 001 ->
    4, ... 110 -> 128, 111 -> 1 (SDM Vol.3A §11.5.4, Figure 11-10)."""
    code = divide_config & 3 | divide_config >> 1 & 4
    return 1 << (code + 1 & 7)


class LocalApic:
    """One vCPU's APIC. Before asking `pending`, the vCPU calls `tick` so
    that a timer expiry up to now is in IRR."""
    __slots__ = ("apic_id", "_initial_id", "_clock", "_send_ipi", "_base_msr",
                 "_tpr", "_ldr", "_dfr", "_spiv", "_isr", "_irr", "_esr", "_esr_new",
                 "_icr", "_icr2", "_lvt", "_tmict", "_tdcr", "_divisor", "_period",
                 "_deadline")

    def __init__(self, apic_id: int, clock: Callable[[], int], send_ipi: Callable[[Ipi], None],
                 *, bsp: bool) -> None:
        """`clock()` is the vCPU's virtual time in TSC cycles; `send_ipi`
        takes every IPI this APIC sends."""
        self.apic_id = self._initial_id = apic_id
        self._clock, self._send_ipi = clock, send_ipi
        self._base_msr = APIC_DEFAULT_BASE | BASE_ENABLE | (BASE_BSP if bsp else 0)
        self.reset()

    def reset(self) -> None:
        """INIT: every register to its power-up value but the APIC ID
        (SDM Vol.3A §11.4.7.1, §11.4.7.3); IA32_APIC_BASE is unchanged."""
        self._tpr = self._ldr = self._isr = self._irr = 0
        self._esr = self._esr_new = self._icr = self._icr2 = 0
        self._dfr = _MASK32
        self._spiv = 0xFF
        self._lvt = [LVT_MASKED] * len(_LVT_BITS)
        self._tmict = self._tdcr = self._period = 0
        self._divisor = timer_divisor(0)
        self._deadline: int | None = None

    # --- IA32_APIC_BASE ---

    @property
    def base_msr(self) -> int:
        return self._base_msr

    @property
    def base(self) -> int:
        """The physical address of the register page."""
        return self._base_msr & _BASE_ADDR

    @property
    def hw_enabled(self) -> bool:
        """IA32_APIC_BASE bit 11: a disabled APIC takes no IPI of any kind
        (the VMM skips it when routing) and its page reads all ones."""
        return bool(self._base_msr & BASE_ENABLE)

    def set_base_msr(self, value: int) -> None:
        """WRMSR IA32_APIC_BASE; the caller raised #GP if not
        `base_msr_valid(value)`. A new base moves the page: the caller
        remaps it. The BSP flag is stored as written, as KVM does."""
        if not base_msr_valid(value):
            raise ValueError(f"reserved bits in IA32_APIC_BASE {value:#x}")
        disabling = self.hw_enabled and not value & BASE_ENABLE
        self._base_msr = value
        if disabling:
            tpr = self._tpr
            self.reset()
            self.apic_id, self._tpr = self._initial_id, tpr

    # --- CR8 ---

    @property
    def tpr(self) -> int:
        return self._tpr

    @tpr.setter
    def tpr(self, value: int) -> None:
        self._tpr = value & 0xFF

    @property
    def cr8(self) -> int:
        """CR8 is TPR bits 7:4 (SDM Vol.3A §11.8.6); a write clears TPR 3:0."""
        return self._tpr >> 4

    @cr8.setter
    def cr8(self, value: int) -> None:
        self._tpr = (value & 0xF) << 4

    # --- MMIO ---

    def read(self, offset: int) -> int:
        """A 32-bit read at `offset` (16-byte aligned) in the page."""
        if not self._base_msr & BASE_ENABLE:
            return _MASK32
        reader = _READERS.get(offset)
        return reader(self) if reader else 0

    def write(self, offset: int, value: int) -> None:
        """A 32-bit write at `offset` (16-byte aligned) in the page."""
        if self._base_msr & BASE_ENABLE:
            writer = _WRITERS.get(offset)
            if writer:
                writer(self, value & _MASK32)

    # --- interrupts ---

    def accept(self, vector: int) -> None:
        """A fixed interrupt (an IPI, the timer, the error LVT) arrives."""
        if not self._spiv & SPIV_ENABLE:
            return
        if vector < 16:
            self._error(ESR_RECV_ILLEGAL)
        else:
            self._irr |= 1 << vector

    def pending(self) -> int | None:
        """The vector the APIC presents to the CPU: the highest in IRR, if
        its priority class is above the processor priority's (SDM Vol.3A
        §11.8.3). Whether RFLAGS.IF lets it in is the caller's business."""
        irr = self._irr
        if not irr or not self._spiv & SPIV_ENABLE:
            return None
        vector = irr.bit_length() - 1
        return vector if vector & 0xF0 > self._ppr() & 0xF0 else None

    def ack(self) -> int:
        """The CPU acknowledges: the pending vector moves from IRR to ISR.
        With nothing pending (TPR rose in between) the CPU gets the spurious
        vector and ISR is left alone (SDM Vol.3A §11.9)."""
        vector = self.pending()
        if vector is None:
            return self._spiv & 0xFF
        self._irr &= ~(1 << vector)
        self._isr |= 1 << vector
        return vector

    def _ppr(self) -> int:
        """SDM Vol.3A §11.8.3.1: TPR if its class is at least that of the
        highest in-service vector, else that vector's class."""
        isrv = (self._isr.bit_length() - 1) & 0xF0 if self._isr else 0
        return self._tpr if self._tpr & 0xF0 >= isrv else isrv

    def _eoi(self, _value: int) -> None:
        if self._isr:
            self._isr &= ~(1 << self._isr.bit_length() - 1)

    def _error(self, bit: int) -> None:
        """Log an error for the next ESR write to latch, and signal it
        through the error LVT (SDM Vol.3A §11.5.3)."""
        self._esr_new |= bit
        lvt = self._lvt[_ERROR]
        if not lvt & LVT_MASKED:
            vector = lvt & 0xFF
            if vector < 16:     # the error vector itself is illegal: no loop
                self._esr_new |= ESR_RECV_ILLEGAL
            else:
                self._irr |= 1 << vector

    # --- timer (SDM Vol.3A §11.5.4) ---

    def deadline(self) -> int | None:
        """The clock value at which the timer next fires; None if it is
        stopped or masked (a masked timer counts, but raises nothing)."""
        return None if self._lvt[_TIMER] & LVT_MASKED else self._deadline

    def tick(self) -> None:
        """Fire the timer if its deadline has passed."""
        deadline = self._deadline
        if deadline is None:
            return
        now = self._clock()
        if now < deadline:
            return
        lvt = self._lvt[_TIMER]
        if lvt & TIMER_MODE == TIMER_PERIODIC:
            period = self._period
            self._deadline = deadline + ((now - deadline) // period + 1) * period
        else:
            self._deadline = None
        if not lvt & LVT_MASKED:
            self.accept(lvt & 0xFF)

    def _current_count(self) -> int:
        """The count falls by one every `divisor` cycles from the initial
        count, reaching 0 at the deadline; periodic mode reloads it there."""
        deadline = self._deadline
        if deadline is None:
            return 0
        left = deadline - self._clock()
        if self._lvt[_TIMER] & TIMER_MODE == TIMER_PERIODIC:
            left = (left - 1) % self._period + 1    # a reload tick() has not done yet
        elif left <= 0:
            return 0
        return -(-left // self._divisor)

    def _write_initial_count(self, value: int) -> None:
        self.tick()     # an expiry before this write happened before it
        if not _timer_runs(self._lvt[_TIMER]):
            return      # ignored in TSC-deadline mode (SDM Vol.3A §11.5.4.1)
        self._tmict = value
        self._period = value * self._divisor
        self._deadline = self._clock() + self._period if value else None

    def _write_divide(self, value: int) -> None:
        """A new divisor applies to the rest of the current count too (as
        KVM: the remaining time scales)."""
        self.tick()
        old, self._tdcr = self._divisor, value & 0xB
        self._divisor = timer_divisor(self._tdcr)
        self._period = self._tmict * self._divisor
        if self._deadline is not None:
            now = self._clock()
            self._deadline = now + (self._deadline - now) * self._divisor // old

    def _write_lvt_timer(self, value: int) -> None:
        """Switching between one-shot and periodic keeps the count running
        (kvm-unit-tests apic_change_mode); entering or leaving mode 2 or 3
        stops the timer and clears the initial count, as KVM does for
        TSC-deadline (SDM Vol.3A §11.5.4.1: the transition disarms it)."""
        self.tick()     # settle an expiry under the old mask and mode
        old = self._lvt[_TIMER]
        self._write_lvt(_TIMER, value)
        if _timer_runs(old) != _timer_runs(self._lvt[_TIMER]):
            self._tmict, self._deadline = 0, None

    # --- register writes ---

    def _write_lvt(self, index: int, value: int) -> None:
        """A software-disabled APIC keeps every LVT masked (SDM Vol.3A §11.4.7.2)."""
        forced = 0 if self._spiv & SPIV_ENABLE else LVT_MASKED
        self._lvt[index] = value & _LVT_BITS[index] | forced

    def _write_spiv(self, value: int) -> None:
        """Bits 9:0 are writable: spurious vector, APIC software enable,
        focus processor checking (kept, no lowest-priority arbitration)."""
        self.tick()     # an expiry before the masking raised its interrupt
        self._spiv = value & 0x3FF
        if not value & SPIV_ENABLE:
            self._lvt = [lvt | LVT_MASKED for lvt in self._lvt]

    def _write_esr(self, _value: int) -> None:
        """A write makes the errors logged since the last one readable
        (SDM Vol.3A §11.5.3)."""
        self._esr, self._esr_new = self._esr_new, 0

    def _write_icr(self, value: int) -> None:
        self._icr = value & _ICR_BITS
        mode, vector = value >> 8 & 7, value & 0xFF
        shorthand = value >> 18 & 3
        if mode == DM_INIT and value & ICR_LEVEL_TRIGGER and not value & ICR_ASSERT:
            return      # INIT level de-assert
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            self._error(ESR_SEND_ILLEGAL)
            return
        if value & ICR_LOGICAL and shorthand == SH_NONE:
            return      # logical destinations: not modelled
        self._send_ipi(Ipi(self.apic_id, shorthand, self._icr2 >> 24, mode, vector,
                           value >> 14 & 1))


def _timer_runs(lvt: int) -> bool:
    """One-shot and periodic count down; modes 2 and 3 do not."""
    return lvt & TIMER_MODE < TIMER_TSC_DEADLINE


def _set_id(apic: LocalApic, value: int) -> None:
    apic.apic_id = value >> 24      # bits 31:24 (SDM Vol.3A §11.4.6)


def _set_tpr(apic: LocalApic, value: int) -> None:
    apic.tpr = value


def _set_ldr(apic: LocalApic, value: int) -> None:
    apic._ldr = value & 0xFF00_0000


def _set_dfr(apic: LocalApic, value: int) -> None:
    apic._dfr = value | 0x0FFF_FFFF     # only the model (31:28) is writable


def _set_icr2(apic: LocalApic, value: int) -> None:
    apic._icr2 = value & 0xFF00_0000


def _lvt_writer(index: int) -> Callable[[LocalApic, int], None]:
    return lambda apic, value: apic._write_lvt(index, value)


def _lvt_reader(index: int) -> Callable[[LocalApic], int]:
    return lambda apic: apic._lvt[index]


def _word_reader(attr: str, word: int) -> Callable[[LocalApic], int]:
    """Bits 32*word+31:32*word of a 256-bit register (ISR, IRR)."""
    shift = 32 * word
    return lambda apic: getattr(apic, attr) >> shift & _MASK32


_READERS: dict[int, Callable[[LocalApic], int]] = {
    ID: lambda apic: apic.apic_id << 24,
    VER: lambda apic: VERSION,
    TPR: lambda apic: apic._tpr,
    PPR: LocalApic._ppr,
    LDR: lambda apic: apic._ldr,
    DFR: lambda apic: apic._dfr,
    SPIV: lambda apic: apic._spiv,
    ESR: lambda apic: apic._esr,
    ICR_LO: lambda apic: apic._icr,
    ICR_HI: lambda apic: apic._icr2,
    TIMER_INITIAL: lambda apic: apic._tmict,
    TIMER_CURRENT: LocalApic._current_count,
    TIMER_DIVIDE: lambda apic: apic._tdcr,
}
_READERS.update({ISR + 0x10 * w: _word_reader("_isr", w) for w in range(8)})
_READERS.update({IRR + 0x10 * w: _word_reader("_irr", w) for w in range(8)})
_READERS.update({LVT_TIMER + 0x10 * i: _lvt_reader(i) for i in range(len(_LVT_BITS))})

_WRITERS: dict[int, Callable[[LocalApic, int], None]] = {
    ID: _set_id,
    TPR: _set_tpr,
    EOI: LocalApic._eoi,
    LDR: _set_ldr,
    DFR: _set_dfr,
    SPIV: LocalApic._write_spiv,
    ESR: LocalApic._write_esr,
    ICR_LO: LocalApic._write_icr,
    ICR_HI: _set_icr2,
    LVT_TIMER: LocalApic._write_lvt_timer,
    TIMER_INITIAL: LocalApic._write_initial_count,
    TIMER_DIVIDE: LocalApic._write_divide,
}
_WRITERS.update({LVT_TIMER + 0x10 * i: _lvt_writer(i) for i in range(1, len(_LVT_BITS))})
