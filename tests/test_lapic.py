"""The local APIC model: registers, priorities, IPIs, the timer, IA32_APIC_BASE."""
import pytest

from hv.devices.lapic import (
    APIC_DEFAULT_BASE, APR, BASE_BSP, BASE_ENABLE, DFR, DM_FIXED, DM_INIT, DM_NMI,
    DM_STARTUP, EOI, ESR, ESR_RECV_ILLEGAL, ESR_SEND_ILLEGAL, ICR_HI, ICR_LO, ID, IRR, ISR,
    LDR, LVT_CMCI, LVT_ERROR, LVT_LINT0, LVT_LINT1, LVT_MASKED, LVT_PERF, LVT_THERMAL,
    LVT_TIMER, PPR, RRD, SH_NONE, SH_OTHERS, SH_SELF, SPIV, TIMER_CURRENT, TIMER_DIVIDE,
    TIMER_INITIAL, TIMER_PERIODIC, TIMER_TSC_DEADLINE, TMR, TPR, VER, Ipi, LocalApic,
    base_msr_valid, timer_divisor)

LVTS = (LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR)
DIV_1 = 0xB


class Clock:
    def __init__(self) -> None:
        self.now = 1000

    def __call__(self) -> int:
        return self.now


def make(apic_id=0, bsp=True, enabled=True):
    """An APIC on a fake clock, software-enabled with spurious vector 0xFF;
    returns it, its clock and the list of IPIs it sent."""
    clock, sent = Clock(), []
    apic = LocalApic(apic_id, clock, sent.append, bsp=bsp)
    if enabled:
        apic.write(SPIV, 0x1FF)
    return apic, clock, sent


def isr_bit(apic, vector):
    return apic.read(ISR + 0x10 * (vector // 32)) >> vector % 32 & 1


def irr_bit(apic, vector):
    return apic.read(IRR + 0x10 * (vector // 32)) >> vector % 32 & 1


# --- registers ---

def test_power_up_values():
    """SDM Vol.3A §11.4.7.1: LVTs masked, SPIV 0xFF, DFR all ones, the rest 0."""
    apic, _, _ = make(apic_id=3, enabled=False)
    assert apic.read(ID) == 3 << 24
    assert apic.read(VER) == 0x0005_0014
    assert apic.read(SPIV) == 0xFF
    assert apic.read(DFR) == 0xFFFF_FFFF
    for lvt in LVTS:
        assert apic.read(lvt) == LVT_MASKED
    zero = (TPR, APR, PPR, EOI, RRD, LDR, ESR, ICR_LO, ICR_HI, LVT_CMCI,
            TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE)
    zero += tuple(base + 0x10 * w for base in (ISR, TMR, IRR) for w in range(8))
    assert [apic.read(r) for r in zero] == [0] * len(zero)
    assert apic.pending() is None and apic.deadline() is None


def test_id_tpr_ldr_dfr_read_back_their_writable_bits():
    apic, _, _ = make()
    apic.write(ID, 0x0512_3456)
    assert apic.read(ID) == 0x0500_0000 and apic.apic_id == 5
    apic.write(TPR, 0x1_23)
    assert apic.read(TPR) == 0x23 and apic.tpr == 0x23
    apic.write(LDR, 0x8123_4567)
    assert apic.read(LDR) == 0x8100_0000
    apic.write(DFR, 0x0000_0000)
    assert apic.read(DFR) == 0x0FFF_FFFF    # cluster model; 27:0 read as ones
    apic.write(SPIV, 0xFFFF_F3AB)
    assert apic.read(SPIV) == 0x3AB


def test_read_only_reserved_and_unaligned_offsets():
    apic, _, _ = make()
    apic.accept(0x40)
    for reg in (VER, PPR, APR, RRD, IRR + 0x10 * 2, TMR, TIMER_CURRENT, LVT_CMCI):
        apic.write(reg, 0xFFFF_FFFF)
    assert apic.read(VER) == 0x0005_0014 and apic.read(PPR) == 0
    assert apic.read(APR) == apic.read(RRD) == apic.read(LVT_CMCI) == apic.read(TMR) == 0
    assert irr_bit(apic, 0x40) and apic.read(TIMER_CURRENT) == 0
    assert apic.read(ID + 4) == apic.read(0x3F0) == apic.read(0x1000) == 0
    assert apic.read(EOI) == 0


def test_lvt_writable_bits():
    """SDM Vol.3A Figure 11-8: delivery status and remote IRR read 0; the
    timer and error entries have no delivery mode."""
    apic, _, _ = make()
    for lvt in LVTS:
        apic.write(lvt, 0xFFFF_FFFF)
    assert apic.read(LVT_TIMER) == 0x0007_00FF
    assert apic.read(LVT_THERMAL) == apic.read(LVT_PERF) == 0x0001_07FF
    assert apic.read(LVT_LINT0) == apic.read(LVT_LINT1) == 0x0001_A7FF
    assert apic.read(LVT_ERROR) == 0x0001_00FF


def test_software_disable_masks_every_lvt_and_keeps_them_masked():
    """SDM Vol.3A §11.4.7.2."""
    apic, _, _ = make()
    for lvt in LVTS:
        apic.write(lvt, 0x40)
    assert all(apic.read(lvt) == 0x40 for lvt in LVTS)
    apic.write(SPIV, 0xFF)
    assert all(apic.read(lvt) == LVT_MASKED | 0x40 for lvt in LVTS)
    apic.write(LVT_LINT0, 0x41)
    assert apic.read(LVT_LINT0) == LVT_MASKED | 0x41
    apic.write(SPIV, 0x1FF)     # enabling unmasks nothing by itself
    assert apic.read(LVT_LINT1) == LVT_MASKED | 0x40
    apic.write(LVT_LINT1, 0x42)
    assert apic.read(LVT_LINT1) == 0x42


# --- priorities ---

def test_accept_pending_ack_eoi():
    apic, _, _ = make()
    apic.accept(0x41)
    apic.accept(0x62)
    assert irr_bit(apic, 0x41) and irr_bit(apic, 0x62)
    assert apic.read(IRR + 0x30) == 1 << 2      # 0x62 is bit 2 of the fourth word
    assert apic.pending() == 0x62
    assert apic.ack() == 0x62
    assert isr_bit(apic, 0x62) and not irr_bit(apic, 0x62)
    assert apic.read(PPR) == 0x60
    assert apic.pending() is None       # 0x41 is below the in-service class
    apic.write(EOI, 0)
    assert not isr_bit(apic, 0x62) and apic.read(PPR) == 0
    assert apic.ack() == 0x41
    apic.write(EOI, 0)
    assert apic.read(ISR + 0x20) == 0 and apic.pending() is None


def test_tpr_blocks_its_class_and_below():
    """TPR 0x30: vector 0x35 (class 3) waits, 0x45 (class 4) goes."""
    apic, _, _ = make()
    apic.write(TPR, 0x30)
    apic.accept(0x35)
    assert apic.pending() is None and apic.read(PPR) == 0x30
    apic.accept(0x45)
    assert apic.pending() == 0x45 and apic.ack() == 0x45
    apic.write(EOI, 0)
    assert apic.pending() is None
    apic.write(TPR, 0x2F)
    assert apic.pending() == 0x35


def test_in_service_vector_blocks_its_class_until_eoi():
    apic, _, _ = make()
    apic.accept(0x50)
    assert apic.ack() == 0x50
    apic.accept(0x55)
    assert apic.pending() is None
    apic.accept(0x61)
    assert apic.pending() == 0x61       # a higher class nests
    assert apic.ack() == 0x61 and apic.read(PPR) == 0x60
    apic.write(EOI, 0)                  # ends 0x61, the highest in service
    assert isr_bit(apic, 0x50) and apic.pending() is None
    apic.write(EOI, 0)
    assert apic.pending() == 0x55


def test_ppr_is_tpr_when_its_class_is_not_below_isr():
    """SDM Vol.3A §11.8.3.1."""
    apic, _, _ = make()
    apic.accept(0x52)
    apic.ack()
    apic.write(TPR, 0x4F)
    assert apic.read(PPR) == 0x50
    apic.write(TPR, 0x57)
    assert apic.read(PPR) == 0x57


def test_ack_with_nothing_pending_gives_the_spurious_vector():
    """SDM Vol.3A §11.9: ISR is untouched."""
    apic, _, _ = make()
    apic.write(SPIV, 0x1E7)
    apic.write(TPR, 0xF0)
    apic.accept(0x80)
    assert apic.ack() == 0xE7
    assert apic.read(ISR + 0x40) == 0 and irr_bit(apic, 0x80)


def test_software_disabled_apic_takes_and_presents_nothing():
    apic, _, _ = make()
    apic.accept(0x40)
    apic.write(SPIV, 0xFF)
    assert apic.pending() is None
    apic.accept(0x50)
    apic.write(SPIV, 0x1FF)
    assert apic.pending() == 0x40 and not irr_bit(apic, 0x50)


def test_illegal_vector_is_logged_and_latched_by_an_esr_write():
    """SDM Vol.3A §11.5.3: a write makes the errors since the last write readable."""
    apic, _, _ = make()
    apic.accept(0x0F)
    assert apic.read(IRR) == 0 and apic.pending() is None
    assert apic.read(ESR) == 0
    apic.write(ESR, 0)
    assert apic.read(ESR) == ESR_RECV_ILLEGAL
    apic.write(ESR, 0)
    assert apic.read(ESR) == 0


def test_error_lvt_signals_an_error():
    apic, _, _ = make()
    apic.write(LVT_ERROR, 0xFE)
    apic.accept(3)
    assert apic.pending() == 0xFE
    apic.ack()
    apic.write(LVT_ERROR, 0x02)         # an illegal error vector: logged, not raised
    apic.accept(3)
    apic.write(ESR, 0)
    assert apic.pending() is None and apic.read(ESR) == ESR_RECV_ILLEGAL


# --- IPIs ---

def test_icr_write_sends_a_decoded_ipi():
    apic, _, sent = make(apic_id=1)
    apic.write(ICR_HI, 0x0212_3456)
    assert apic.read(ICR_HI) == 0x0200_0000
    apic.write(ICR_LO, 0x0000_4041)             # fixed, assert, physical
    assert sent == [Ipi(1, SH_NONE, 2, DM_FIXED, 0x41, 1)]
    assert apic.read(ICR_LO) == 0x4041          # delivery status (bit 12) reads 0
    apic.write(ICR_LO, 0x0004_5042)             # self; busy bit written: reads 0
    assert sent[-1] == Ipi(1, SH_SELF, 2, DM_FIXED, 0x42, 1)
    assert apic.read(ICR_LO) & 0x1000 == 0


def test_init_and_sipi_to_all_but_self():
    """The kvm-unit-tests boot sequence (lib/x86/smp.c)."""
    apic, _, sent = make()
    apic.write(ICR_HI, 0)
    apic.write(ICR_LO, 0x000C_4500)     # INIT, assert, all excluding self
    apic.write(ICR_LO, 0x000C_0600)     # STARTUP, vector 0 (start page 0)
    apic.write(ICR_LO, 0x000C_069A)
    apic.write(ICR_LO, 0x0000_4400)     # NMI to APIC 0
    assert sent == [Ipi(0, SH_OTHERS, 0, DM_INIT, 0, 1), Ipi(0, SH_OTHERS, 0, DM_STARTUP, 0, 0),
                    Ipi(0, SH_OTHERS, 0, DM_STARTUP, 0x9A, 0), Ipi(0, SH_NONE, 0, DM_NMI, 0, 1)]


def test_ipis_not_sent():
    apic, _, sent = make()
    apic.write(ICR_LO, 0x0000_8500)     # INIT level de-assert
    apic.write(ICR_LO, 0x0000_4841)     # logical destination
    apic.write(ICR_LO, 0x0004_4005)     # self, illegal vector
    assert sent == []
    apic.write(ESR, 0)
    assert apic.read(ESR) == ESR_SEND_ILLEGAL
    apic.write(ICR_LO, 0x000C_4841)     # a shorthand ignores the destination mode
    assert len(sent) == 1


def test_icr_ignored_while_hardware_disabled():
    apic, _, sent = make()
    apic.set_base_msr(APIC_DEFAULT_BASE)
    apic.write(ICR_LO, 0x000C_4500)
    assert sent == []


# --- the timer ---

@pytest.mark.parametrize("tdcr, divisor", [
    (0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xA, 128), (0xB, 1),
    (0x4 | 0x3, 16)])   # bit 2 is not part of the divide value
def test_divide_configuration(tdcr, divisor):
    assert timer_divisor(tdcr) == divisor
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, tdcr)
    apic.write(LVT_TIMER, 0x40)
    apic.write(TIMER_INITIAL, 10)
    assert apic.deadline() == clock.now + 10 * divisor


def test_one_shot_counts_down_and_fires_at_the_deadline():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, 0x1)       # by 4
    apic.write(LVT_TIMER, 0xEE)
    start = clock.now
    apic.write(TIMER_INITIAL, 100)
    assert apic.read(TIMER_INITIAL) == 100
    assert apic.read(TIMER_CURRENT) == 100
    clock.now = start + 3
    assert apic.read(TIMER_CURRENT) == 100     # the first decrement comes after 4 cycles
    clock.now = start + 4
    assert apic.read(TIMER_CURRENT) == 99
    clock.now = start + 399
    assert apic.read(TIMER_CURRENT) == 1
    apic.tick()
    assert apic.pending() is None and apic.deadline() == start + 400
    clock.now = start + 400
    assert apic.read(TIMER_CURRENT) == 0
    apic.tick()
    assert apic.pending() == 0xEE
    assert apic.deadline() is None and apic.read(TIMER_CURRENT) == 0
    apic.ack()
    clock.now += 10_000
    apic.tick()
    assert apic.pending() is None


def test_periodic_rearms_from_the_previous_deadline():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, TIMER_PERIODIC | 0x30)
    start = clock.now
    apic.write(TIMER_INITIAL, 1000)
    clock.now = start + 1007            # the vCPU noticed 7 cycles late
    apic.tick()
    assert apic.ack() == 0x30
    apic.write(EOI, 0)
    assert apic.deadline() == start + 2000      # no drift
    assert apic.read(TIMER_CURRENT) == 993
    clock.now = start + 4500            # two periods missed: one interrupt
    apic.tick()
    assert apic.ack() == 0x30 and apic.pending() is None
    assert apic.deadline() == start + 5000
    assert apic.read(TIMER_CURRENT) == 500


def test_periodic_count_reloads_before_tick():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, TIMER_PERIODIC | 0x30)
    start = clock.now
    apic.write(TIMER_INITIAL, 1000)
    clock.now = start + 1000
    assert apic.read(TIMER_CURRENT) == 1000
    clock.now = start + 1250
    assert apic.read(TIMER_CURRENT) == 750


def test_masked_timer_counts_without_interrupts():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, LVT_MASKED | 0x30)
    start = clock.now
    apic.write(TIMER_INITIAL, 100)
    assert apic.deadline() is None      # nothing to wake the vCPU for
    clock.now = start + 40
    assert apic.read(TIMER_CURRENT) == 60
    clock.now = start + 100
    apic.tick()
    assert apic.read(IRR + 0x10) == 0 and apic.read(TIMER_CURRENT) == 0


def test_unmasking_after_a_masked_expiry_raises_nothing():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, LVT_MASKED | 0x30)
    apic.write(TIMER_INITIAL, 100)
    clock.now += 500                    # expired unseen
    apic.write(LVT_TIMER, 0x30)
    apic.tick()
    assert apic.pending() is None and apic.deadline() is None


def test_expiry_before_a_restart_is_not_lost():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, 0x30)
    apic.write(TIMER_INITIAL, 100)
    clock.now += 150
    apic.write(TIMER_INITIAL, 100)
    assert apic.pending() == 0x30 and apic.deadline() == clock.now + 100


def test_initial_count_zero_stops_the_timer():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, TIMER_PERIODIC | 0x30)
    apic.write(TIMER_INITIAL, 100)
    clock.now += 50
    apic.write(TIMER_INITIAL, 0)
    assert apic.deadline() is None and apic.read(TIMER_CURRENT) == 0
    clock.now += 1000
    apic.tick()
    assert apic.pending() is None


def test_mode_change_keeps_the_count():
    """kvm-unit-tests x86/apic.c test_apic_change_mode."""
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, LVT_MASKED)
    apic.write(TIMER_INITIAL, 1000)
    clock.now += 600
    apic.write(LVT_TIMER, LVT_MASKED | TIMER_PERIODIC)
    assert apic.read(TIMER_INITIAL) == 1000 and apic.read(TIMER_CURRENT) == 400
    clock.now += 500                    # reloaded at 0
    assert apic.read(TIMER_CURRENT) == 900
    apic.write(LVT_TIMER, LVT_MASKED)   # back to one-shot: runs out, stays at 0
    clock.now += 900
    apic.tick()
    assert apic.read(TIMER_CURRENT) == 0
    apic.write(LVT_TIMER, LVT_MASKED | TIMER_PERIODIC)
    assert apic.read(TIMER_CURRENT) == 0


def test_divide_change_scales_the_rest_of_the_count():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, 0x30)
    apic.write(TIMER_INITIAL, 1000)
    clock.now += 400
    apic.write(TIMER_DIVIDE, 0x0)       # by 2: 600 counts left take 1200 cycles
    assert apic.read(TIMER_CURRENT) == 600
    assert apic.deadline() == clock.now + 1200


def test_tsc_deadline_mode_keeps_its_bits_and_runs_no_timer():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, 0x30)
    apic.write(TIMER_INITIAL, 1000)
    apic.write(LVT_TIMER, TIMER_TSC_DEADLINE | 0x30)
    assert apic.read(LVT_TIMER) == TIMER_TSC_DEADLINE | 0x30
    assert apic.read(TIMER_INITIAL) == 0 and apic.deadline() is None
    apic.write(TIMER_INITIAL, 1000)     # ignored (SDM Vol.3A §11.5.4.1)
    assert apic.read(TIMER_INITIAL) == 0 and apic.deadline() is None
    clock.now += 5000
    apic.tick()
    assert apic.pending() is None


def test_illegal_timer_vector_is_an_error():
    apic, clock, _ = make()
    apic.write(TIMER_DIVIDE, DIV_1)
    apic.write(LVT_TIMER, 0x05)
    apic.write(TIMER_INITIAL, 10)
    clock.now += 10
    apic.tick()
    apic.write(ESR, 0)
    assert apic.pending() is None and apic.read(ESR) == ESR_RECV_ILLEGAL


# --- CR8, IA32_APIC_BASE, INIT ---

def test_cr8_is_tpr_bits_7_4():
    apic, _, _ = make()
    apic.write(TPR, 0x5A)
    assert apic.cr8 == 5
    apic.cr8 = 0xC
    assert apic.read(TPR) == 0xC0 and apic.tpr == 0xC0
    apic.accept(0xC5)
    assert apic.pending() is None
    apic.cr8 = 0
    assert apic.pending() == 0xC5


def test_base_msr():
    assert LocalApic(0, Clock(), print, bsp=True).base_msr == APIC_DEFAULT_BASE | BASE_BSP | BASE_ENABLE
    apic, _, _ = make(bsp=False)
    assert apic.base_msr == APIC_DEFAULT_BASE | BASE_ENABLE
    assert apic.base == APIC_DEFAULT_BASE and apic.hw_enabled
    assert base_msr_valid(APIC_DEFAULT_BASE | BASE_ENABLE | BASE_BSP)
    assert base_msr_valid(0xFF_FFFF_F000)
    for bad in (1 << 10, 1, 1 << 9, 0x80, 1 << 40, 1 << 63):     # x2APIC, reserved
        assert not base_msr_valid(APIC_DEFAULT_BASE | BASE_ENABLE | bad)
        with pytest.raises(ValueError):
            apic.set_base_msr(APIC_DEFAULT_BASE | BASE_ENABLE | bad)
    apic.set_base_msr(0xFED4_0000 | BASE_ENABLE)    # kvm-unit-tests' relocation
    assert apic.base == 0xFED4_0000 and apic.read(VER) == 0x0005_0014


def test_global_disable():
    """Reads all ones, writes dropped, nothing pending, CR8 still works; on
    re-enable the APIC is as at power-up but for TPR."""
    apic, clock, _ = make(apic_id=2)
    apic.write(ID, 7 << 24)
    apic.write(LVT_TIMER, 0x30)
    apic.write(TIMER_INITIAL, 10)
    apic.accept(0x40)
    apic.cr8 = 3
    apic.set_base_msr(APIC_DEFAULT_BASE)
    assert not apic.hw_enabled
    assert apic.read(VER) == apic.read(TPR) == apic.read(0x44) == 0xFFFF_FFFF
    assert apic.pending() is None and apic.deadline() is None
    apic.write(SPIV, 0x1FF)
    apic.accept(0x50)
    assert apic.pending() is None
    apic.cr8 = 9
    assert apic.cr8 == 9
    clock.now += 100
    apic.tick()
    apic.set_base_msr(APIC_DEFAULT_BASE | BASE_ENABLE)
    assert apic.read(ID) == 2 << 24 and apic.read(TPR) == 0x90
    assert apic.read(SPIV) == 0xFF and apic.read(LVT_TIMER) == LVT_MASKED
    assert apic.read(IRR + 0x20) == 0 and apic.read(TIMER_INITIAL) == 0


def test_init_reset_keeps_the_id_and_the_base():
    apic, _, _ = make(apic_id=1, bsp=False)
    apic.write(ID, 4 << 24)
    apic.set_base_msr(0xFED4_0000 | BASE_ENABLE)
    apic.write(TPR, 0x20)
    apic.write(LVT_LINT0, 0x700)
    apic.accept(0x40)
    apic.ack()
    apic.reset()
    assert apic.read(ID) == 4 << 24 and apic.base == 0xFED4_0000
    assert apic.read(TPR) == 0 and apic.read(ISR + 0x20) == 0
    assert apic.read(SPIV) == 0xFF and apic.read(LVT_LINT0) == LVT_MASKED
