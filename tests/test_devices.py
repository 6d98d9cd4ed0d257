"""The port bus and the PC devices behind it (hv.devices), driven as guests
drive them: kvm-unit-tests' own port sequences (lib/x86/io.c, fwcfg.c,
apic.c) where it has one."""
import ast
from pathlib import Path

import pytest

import hv
from hv.devices import (DebugExit, Device, Pic8259Pair, PortBus, ShutdownPort, Uart16550,
                        pc_platform)

MiB = 1 << 20


class FakePlatform:
    def __init__(self):
        self.console = bytearray()
        self.finishes = []

    def console_write(self, byte):
        self.console.append(byte)

    def finish(self, reason, detail, exit_code=None):
        self.finishes.append((reason, detail, exit_code))

    now = 0

    def clock(self):
        return self.now


@pytest.fixture
def vm():
    return FakePlatform()


@pytest.fixture
def bus(vm):
    return pc_platform(vm, cpus=2, ram=64 * MiB, ghz=2.0)


# -- kvm-unit-tests' sequences, as lib/x86 writes them ------------------------
def kut_serial_init(bus):
    """serial_init() of lib/x86/io.c."""
    base = 0x3F8
    lcr = bus.read(base + 3, 1) | 0x80          # set DLAB
    bus.write(base + 3, 1, lcr)
    bus.write(base + 0, 1, 0x01)                # 115200 baud
    bus.write(base + 1, 1, 0x00)
    lcr = bus.read(base + 3, 1) & ~0x80 & 0xFF  # clear DLAB
    bus.write(base + 3, 1, lcr)
    bus.write(base + 1, 1, 0x00)                # IER: no interrupts
    bus.write(base + 3, 1, 0x03)                # LCR: 8N1
    bus.write(base + 2, 1, 0x00)                # FCR: no FIFOs
    bus.write(base + 4, 1, 0x03)                # MCR: RTS, DTR


def kut_puts(bus, text):
    """serial_put()/serial_outb() of lib/x86/io.c: wait for THRE, then write."""
    for ch in text.encode():
        for c in ([ord("\r")] if ch == ord("\n") else []) + [ch]:
            polls = 0
            while not bus.read(0x3FD, 1) & 0x20:
                polls += 1
                assert polls < 10, "THRE never set"
            bus.write(0x3F8, 1, c)


def kut_fwcfg(bus, key, nbytes):
    """fwcfg_get_u() of lib/x86/fwcfg.c: a 16-bit OUT of the key, 8-bit INs."""
    bus.write(0x510, 2, key)
    return sum(bus.read(0x511, 1) << (8 * i) for i in range(nbytes))


def read_item(bus, key, nbytes):
    bus.write(0x510, 2, key)
    return bytes(bus.read(0x511, 1) for _ in range(nbytes))


# -- the bus ------------------------------------------------------------------
@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF)])
def test_an_unmapped_port_floats_high(bus, size, ones):
    assert bus.device(0x80) is None
    assert bus.read(0x80, size) == ones


def test_a_write_to_an_unmapped_port_is_dropped(bus, vm):
    bus.write(0x80, 1, 0x42)        # POST code
    bus.write(0x2000, 1, 1)         # pc-testdev's IRQ lines: not modelled
    assert vm.console == b"" and vm.finishes == []


def test_overlapping_devices_are_refused_naming_both(vm):
    with pytest.raises(ValueError, match=r"uart16550@0x3fc and uart16550@0x3f8.*0x3fc"):
        PortBus([Uart16550(vm), Uart16550(vm, base=0x3FC)])
    with pytest.raises(ValueError, match="isa-debug-exit@0xf6 and isa-debug-exit@0xf4"):
        PortBus([DebugExit(vm), DebugExit(vm, port=0xF6)])


def test_the_pc_platform_port_map(bus):
    names = {port: bus.device(port).name for port in
             [0x20, 0x21, 0xA0, 0xA1, 0xF4, 0xF7, 0x3F8, 0x3FF, 0x510, 0x511, 0xCF8, 0xCFF, 0x8900]}
    assert names == {0x20: "pic8259", 0x21: "pic8259", 0xA0: "pic8259", 0xA1: "pic8259",
                     0xF4: "isa-debug-exit@0xf4", 0xF7: "isa-debug-exit@0xf4",
                     0x3F8: "uart16550@0x3f8", 0x3FF: "uart16550@0x3f8",
                     0x510: "fw_cfg", 0x511: "fw_cfg",
                     0xCF8: "pci-host", 0xCFF: "pci-host", 0x8900: "shutdown@0x8900"}
    for port in (0x1F, 0x22, 0xF3, 0xF8, 0x3F7, 0x400, 0x512, 0x514, 0xCF7, 0xD00, 0x8901):
        assert bus.device(port) is None, hex(port)


def test_a_wide_access_goes_to_the_device_of_its_first_port(bus, vm):
    bus.write(0x3F8, 2, 0x4241)     # a 16-bit OUT to the UART: its low byte is the THR write
    assert vm.console == b"A"
    assert bus.read(0x3FD, 4) == 0x60   # LSR, zero-extended
    assert bus.read(0x3F6, 4) == 0xFFFF_FFFF    # first port unmapped: floats, though 0x3F8 is not


def test_the_bus_masks_a_value_to_the_access_size(vm):
    class Wide(Device):
        name, ports = "wide", range(0x100, 0x101)
        written = None

        def read(self, port, size):
            return 0x1234_5678_9A

        def write(self, port, size, value):
            self.written = value

    dev = Wide()
    bus = PortBus([dev])
    assert bus.read(0x100, 1) == 0x9A and bus.read(0x100, 2) == 0x789A
    bus.write(0x100, 2, 0xABCDEF)
    assert dev.written == 0xCDEF


def test_the_base_device_drives_nothing():
    dev = Device()
    assert [dev.read(0, s) for s in (1, 2, 4)] == [0xFF, 0xFFFF, 0xFFFF_FFFF]
    assert dev.write(0, 1, 0) is None


def test_no_device_module_imports_the_vmm_the_hardware_or_unicorn():
    for path in sorted((Path(hv.__file__).parent / "devices").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert not name.startswith(("hv.vmm", "hv.hw", "..vmm", "..hw", "unicorn")), \
                    f"{path.name} imports {name}"


# -- 16550 UART ---------------------------------------------------------------
def test_kvm_unit_tests_serial_init_prints_nothing_and_then_prints(bus, vm):
    kut_serial_init(bus)
    assert vm.console == b""
    uart = bus.device(0x3F8)
    assert (uart.divisor, uart.lcr, uart.ier, uart.mcr, uart.fifos) == (1, 0x03, 0, 0x03, False)
    kut_puts(bus, "PASS: ok\n")
    assert vm.console == b"PASS: ok\r\n"


def test_the_divisor_latch_reads_back_and_never_reaches_the_console(bus, vm):
    bus.write(0x3FB, 1, 0x80)           # DLAB
    assert (bus.read(0x3F8, 1), bus.read(0x3F9, 1)) == (0x0C, 0x00)    # 9600 baud at reset
    bus.write(0x3F8, 1, 0x34)
    bus.write(0x3F9, 1, 0x12)
    assert (bus.read(0x3F8, 1), bus.read(0x3F9, 1)) == (0x34, 0x12)
    assert bus.device(0x3F8).divisor == 0x1234
    bus.write(0x3FB, 1, 0x03)           # DLAB clear: +0/+1 are RBR/THR and IER again
    assert (bus.read(0x3F8, 1), bus.read(0x3F9, 1)) == (0, 0)
    assert vm.console == b""
    bus.write(0x3F8, 1, ord("x"))
    assert vm.console == b"x"


def test_uart_status_registers(bus):
    assert bus.read(0x3FD, 1) == 0x60   # LSR: THR and transmitter empty, no data
    assert bus.read(0x3FA, 1) == 0x01   # IIR: no interrupt pending
    assert bus.read(0x3FE, 1) == 0xB0   # MSR: DCD, DSR, CTS
    assert bus.read(0x3F8, 1) == 0      # RBR: nothing received
    assert bus.read(0x3FC, 1) == 0x08   # MCR: OUT2 at reset
    bus.write(0x3F8, 1, ord("a"))
    assert bus.read(0x3FD, 1) == 0x60   # still empty: the byte left at once


def test_uart_fifo_enable_shows_in_iir(bus):
    bus.write(0x3FA, 1, 0xC7)           # FCR: enable, clear both FIFOs, trigger 14
    assert bus.read(0x3FA, 1) == 0xC1
    bus.write(0x3FA, 1, 0x00)
    assert bus.read(0x3FA, 1) == 0x01


def test_uart_registers_read_back(bus):
    bus.write(0x3FF, 1, 0x5A)
    bus.write(0x3F9, 1, 0xFF)           # IER keeps its 4 bits
    bus.write(0x3FB, 1, 0x1B)
    bus.write(0x3FC, 1, 0xFF)           # MCR keeps its 5 bits
    assert [bus.read(p, 1) for p in (0x3FF, 0x3F9, 0x3FB, 0x3FC)] == [0x5A, 0x0F, 0x1B, 0x1F]
    bus.write(0x3FC, 1, 0x03)
    bus.write(0x3FD, 1, 0x00)           # LSR and MSR are read-only
    bus.write(0x3FE, 1, 0x00)
    assert (bus.read(0x3FD, 1), bus.read(0x3FE, 1)) == (0x60, 0xB0)


def test_uart_loopback_wires_mcr_to_msr_and_transmits_nothing(bus, vm):
    bus.write(0x3FC, 1, 0x10 | 0x0A)    # Linux 8250 autoconfig: LOOP | OUT2 | RTS
    assert bus.read(0x3FE, 1) & 0xF0 == 0x90    # DCD | CTS, what it checks
    bus.write(0x3F8, 1, ord("x"))
    assert vm.console == b""
    bus.write(0x3FC, 1, 0x03)
    assert bus.read(0x3FE, 1) == 0xB0
    bus.write(0x3F8, 1, ord("y"))
    assert vm.console == b"y"


def test_a_second_uart_at_com2(vm):
    bus = PortBus([Uart16550(vm), Uart16550(vm, base=0x2F8)])
    bus.write(0x2F8, 1, ord("2"))
    bus.write(0x3F8, 1, ord("1"))
    assert vm.console == b"21" and bus.read(0x2FD, 1) == 0x60


# -- isa-debug-exit -----------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 4])
def test_debug_exit_ends_the_vm_with_the_value_written(bus, vm, size):
    bus.write(0xF4, size, 7)
    assert vm.finishes == [("exit", "the guest wrote 7 to port 0xf4", 7)]


def test_debug_exit_32_bit_value_is_the_exit_code_itself(bus, vm):
    bus.write(0xF4, 4, 63)              # kvm-unit-tests' abort: QEMU would exit 127
    bus.write(0xF4, 4, 0x1234_5678)
    assert [f[2] for f in vm.finishes] == [63, 0x1234_5678]
    assert vm.finishes[1][1] == f"the guest wrote {0x1234_5678} to port 0xf4"


def test_debug_exit_decodes_iosize_ports_and_reads_0(vm):
    dev = DebugExit(vm)
    assert list(dev.ports) == [0xF4, 0xF5, 0xF6, 0xF7]
    assert PortBus([dev]).read(0xF4, 4) == 0
    dev.write(0xF6, 1, 1)
    assert vm.finishes == [("exit", "the guest wrote 1 to port 0xf6", 1)]


# -- 8259A PIC pair -----------------------------------------------------------
def test_pic_mask_reads_back_what_kvm_unit_tests_writes(bus):
    assert (bus.read(0x21, 1), bus.read(0xA1, 1)) == (0, 0)     # QEMU's power-on mask
    bus.write(0x21, 1, 0xFF)            # mask_pic_interrupts() of lib/x86/apic.c
    bus.write(0xA1, 1, 0xFF)
    assert (bus.read(0x21, 1), bus.read(0xA1, 1)) == (0xFF, 0xFF)
    bus.write(0xA1, 1, 0x5A)
    assert (bus.read(0x21, 1), bus.read(0xA1, 1)) == (0xFF, 0x5A)


def test_pic_initialisation_sequence(bus):
    bus.write(0x21, 1, 0xFF)
    for base, vector, icw3 in ((0x20, 0x20, 0x04), (0xA0, 0x28, 0x02)):   # Linux's init_8259A
        bus.write(base, 1, 0x11)            # ICW1: edge, cascade, ICW4 needed
        assert bus.read(base + 1, 1) == 0   # ICW1 cleared the mask
        bus.write(base + 1, 1, vector)      # ICW2
        bus.write(base + 1, 1, icw3)        # ICW3
        bus.write(base + 1, 1, 0x01)        # ICW4: 8086 mode
        assert bus.read(base + 1, 1) == 0   # no ICW was taken for a mask
        bus.write(base + 1, 1, 0xFB)        # OCW1
        assert bus.read(base + 1, 1) == 0xFB
    pic = bus.device(0x20)
    assert (pic.master.vector_base, pic.slave.vector_base) == (0x20, 0x28)


def test_pic_single_mode_without_icw4_takes_only_icw2():
    pic = Pic8259Pair()
    pic.write(0x20, 1, 0x12)            # ICW1: single, no ICW4
    pic.write(0x21, 1, 0x47)            # ICW2 (vector bits 7:3)
    pic.write(0x21, 1, 0x3C)            # OCW1 at once
    assert (pic.master.vector_base, pic.read(0x21, 1)) == (0x40, 0x3C)


def test_pic_irr_isr_and_poll_read_0(bus):
    bus.write(0x21, 1, 0xA5)
    assert bus.read(0x20, 1) == 0       # IRR (the reset selection)
    bus.write(0x20, 1, 0x0B)            # OCW3: read ISR
    assert bus.read(0x20, 1) == 0
    bus.write(0x20, 1, 0x0C)            # OCW3: poll
    assert bus.read(0x21, 1) == 0       # the poll word, not the mask: no request
    assert bus.read(0x21, 1) == 0xA5    # poll is over
    bus.write(0x20, 1, 0x20)            # OCW2: non-specific EOI
    assert bus.read(0x21, 1) == 0xA5


# -- fw_cfg -------------------------------------------------------------------
@pytest.mark.parametrize("cpus", [1, 2, 3])
def test_fwcfg_nb_cpus_as_kvm_unit_tests_reads_it(vm, cpus):
    bus = pc_platform(vm, cpus=cpus, ram=64 * MiB, ghz=2.0)
    assert kut_fwcfg(bus, 0x05, 2) == cpus
    assert kut_fwcfg(bus, 0x0F, 2) == cpus          # MAX_CPUS


@pytest.mark.parametrize("ram", [34 * MiB, 5 << 30])
def test_fwcfg_ram_size_is_8_bytes(vm, ram):
    bus = pc_platform(vm, cpus=1, ram=ram, ghz=2.0)
    assert kut_fwcfg(bus, 0x03, 8) == ram
    assert read_item(bus, 0x03, 9) == ram.to_bytes(8, "little") + b"\0"


def test_fwcfg_signature_id_and_file_dir(bus):
    assert bytes(bus.read(0x511, 1) for _ in range(4)) == b"QEMU"   # selected at reset
    assert read_item(bus, 0x00, 5) == b"QEMU\0"
    assert kut_fwcfg(bus, 0x01, 4) == 1         # traditional interface, no DMA
    assert read_item(bus, 0x19, 4) == b"\0\0\0\0"   # no files


def test_fwcfg_select_rewinds_and_unknown_items_read_0(bus):
    bus.write(0x510, 2, 0x00)
    assert bus.read(0x511, 1) == ord("Q")
    bus.write(0x510, 2, 0x00)
    assert bus.read(0x511, 1) == ord("Q")
    assert read_item(bus, 0x1234, 4) == b"\0\0\0\0"
    assert read_item(bus, 0x8000, 2) == b"\0\0"     # no arch-local items


def test_fwcfg_widths_as_qemu(bus):
    bus.write(0x510, 2, 0x00)
    bus.write(0x510, 1, 0x05)           # an 8-bit write is a (removed) data write
    assert bus.read(0x511, 1) == ord("Q")
    assert bus.read(0x510, 1) == ord("E")   # either port reads data
    assert bus.read(0x511, 2) == 0 and bus.read(0x511, 4) == 0   # refused: no byte consumed
    assert bus.read(0x511, 1) == ord("M")
    bus.write(0x510, 4, 0x05)           # refused
    assert bus.read(0x511, 1) == ord("U")


# -- PCI host, no devices -----------------------------------------------------
def test_pci_config_address_reads_back_without_reserved_bits(bus):
    assert bus.read(0xCF8, 4) == 0
    bus.write(0xCF8, 4, 0x8000_1234)
    assert bus.read(0xCF8, 4) == 0x8000_1234
    bus.write(0xCF8, 4, 0xFFFF_FFFF)
    assert bus.read(0xCF8, 4) == 0x80FF_FFFC


def test_pci_no_function_answers(bus):
    for address in (0x8000_0000, 0x8000_0800, 0x0000_0000):   # 00:00.0, 00:01.0, disabled
        bus.write(0xCF8, 4, address)
        assert bus.read(0xCFC, 4) == 0xFFFF_FFFF
        assert bus.read(0xCFC, 2) == 0xFFFF and bus.read(0xCFE, 2) == 0xFFFF
        assert bus.read(0xCFF, 1) == 0xFF
    bus.write(0xCFC, 4, 0)              # dropped
    assert bus.read(0xCFC, 4) == 0xFFFF_FFFF


def test_pci_narrow_config_address_accesses_are_plain_io(bus):
    bus.write(0xCF8, 4, 0x8000_0000)
    bus.write(0xCFB, 1, 0x01)           # Linux's pci_check_type1 pokes this
    bus.write(0xCF8, 2, 0x1234)
    assert bus.read(0xCF8, 4) == 0x8000_0000
    assert bus.read(0xCF8, 2) == 0xFFFF and bus.read(0xCF9, 1) == 0xFF


# -- the Bochs shutdown port --------------------------------------------------
def test_shutdown_spelled_across_writes(bus, vm):
    for i, ch in enumerate(b"Shutdown"):
        assert vm.finishes == [], i
        bus.write(0x8900, 1, ch)
    assert vm.finishes == [("shutdown", "the guest wrote 'Shutdown' to port 0x8900", None)]


def test_shutdown_needs_the_word_last(vm):
    dev = ShutdownPort(vm)
    for ch in b"xxShutdowX":
        dev.write(0x8900, 1, ch)
    assert vm.finishes == []
    for ch in b"SShutdown":
        dev.write(0x8900, 2, 0x4100 | ch)   # the low byte of each write
    assert [f[0] for f in vm.finishes] == ["shutdown"]
    assert dev.read(0x8900, 1) == 0xFF


def test_kvm_unit_tests_exit_sequence(bus, vm):
    """exit() of lib/x86/io.c: OUT 0xF4 (32-bit), then "Shutdown" to 0x8900."""
    bus.write(0xF4, 4, 1)
    for ch in b"Shutdown":
        bus.write(0x8900, 1, ch)
    assert vm.finishes == [("exit", "the guest wrote 1 to port 0xf4", 1),
                           ("shutdown", "the guest wrote 'Shutdown' to port 0x8900", None)]


# -- ACPI: the tables and the PM timer -----------------------------------------
def test_acpi_tables_as_kvm_unit_tests_finds_them():
    """lib/acpi.c: the RSDP on a 16-byte boundary from 0xE0000, its RSDT,
    the FADT there by signature, PM_TMR_BLK at offset 76; every checksum 0."""
    import struct
    from hv.devices import acpi
    mem = acpi.tables()
    at = lambda addr, n: mem[addr - acpi.RSDP_ADDR:addr - acpi.RSDP_ADDR + n]
    rsdp = at(acpi.RSDP_ADDR, 20)
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp) & 0xFF == 0
    rsdt_addr = struct.unpack_from("<I", rsdp, 16)[0]
    sig, length = struct.unpack_from("<4sI", at(rsdt_addr, 8))
    rsdt = at(rsdt_addr, length)
    assert sig == b"RSDT" and sum(rsdt) & 0xFF == 0
    (fadt_addr,) = struct.unpack_from("<I", rsdt, 36)
    sig, length = struct.unpack_from("<4sI", at(fadt_addr, 8))
    fadt = at(fadt_addr, length)
    assert sig == b"FACP" and length == 116 and sum(fadt) & 0xFF == 0
    assert struct.unpack_from("<I", fadt, 76)[0] == acpi.PM_TIMER_PORT == 0xB008
    assert fadt[91] == 4


def test_the_pm_timer_counts_the_clock_at_3_579545_mhz(vm, bus):
    vm.now = 2_000_000_000                      # one second at 2 GHz
    assert bus.read(0xB008, 4) == 3_579_545
    vm.now *= 5                                 # 24 bits: it wraps
    assert bus.read(0xB008, 4) == 5 * 3_579_545 & 0xFF_FFFF
    assert bus.read(0xB009, 1) == (5 * 3_579_545 & 0xFF_FFFF) >> 8 & 0xFF
