"""INTx: the doorbell's fallback when MSI-X is off, INTx-disable, and acks."""

from __future__ import annotations

from devserver.devices.testdev import IO_BAR, MEM_BAR, REG_DOORBELL, REG_IRQ_STATUS, PciTestDevice
from devserver.effects import BarKind, Effect, IntxChanged
from devserver.pci.bars import BarSpec
from devserver.pci.bus import PciBus
from devserver.pci.function import PciFunction, PciIdentity
from devserver.pci.regs import PCI_COMMAND_INTX_DISABLE, PCI_STATUS, PCI_STATUS_INTERRUPT
from tests.strategies import SLOT_A, cfg_read, cfg_write, set_command

ASSERTED = IntxChanged(SLOT_A, 1, asserted=True)
DEASSERTED = IntxChanged(SLOT_A, 1, asserted=False)


def ring(bus: PciBus, vector: int) -> list[Effect]:
    return bus.bar_write(SLOT_A, MEM_BAR, REG_DOORBELL, 4, vector)


def ack(bus: PciBus, bits: int) -> list[Effect]:
    return bus.bar_write(SLOT_A, IO_BAR, REG_IRQ_STATUS, 4, bits)


def status_interrupt(bus: PciBus) -> bool:
    return bool(cfg_read(bus, SLOT_A, PCI_STATUS, 2) & PCI_STATUS_INTERRUPT)


def test_doorbell_without_msix_asserts_intx(bus: PciBus) -> None:
    assert ring(bus, 0) == [ASSERTED]


def test_doorbell_sets_status_interrupt_bit(bus: PciBus) -> None:
    assert not status_interrupt(bus)
    ring(bus, 0)
    assert status_interrupt(bus)


def test_doorbell_records_its_cause(bus: PciBus) -> None:
    ring(bus, 3)
    assert bus.bar_read(SLOT_A, MEM_BAR, REG_IRQ_STATUS, 4) == 1 << 3


def test_second_doorbell_does_not_repeat_the_assertion(bus: PciBus) -> None:
    ring(bus, 0)
    assert ring(bus, 1) == []


def test_intx_disable_hides_an_asserted_line(bus: PciBus) -> None:
    ring(bus, 0)
    assert set_command(bus, SLOT_A, PCI_COMMAND_INTX_DISABLE) == [DEASSERTED]


def test_intx_disable_leaves_status_interrupt_bit(bus: PciBus) -> None:
    # The status bit reports the device's line, whatever the command register says.
    ring(bus, 0)
    set_command(bus, SLOT_A, PCI_COMMAND_INTX_DISABLE)
    assert status_interrupt(bus)


def test_reenabling_intx_shows_the_line_again(bus: PciBus) -> None:
    ring(bus, 0)
    set_command(bus, SLOT_A, PCI_COMMAND_INTX_DISABLE)
    assert set_command(bus, SLOT_A, 0) == [ASSERTED]


def test_doorbell_while_disabled_reports_nothing_until_enabled(bus: PciBus) -> None:
    set_command(bus, SLOT_A, PCI_COMMAND_INTX_DISABLE)
    assert ring(bus, 0) == []
    assert set_command(bus, SLOT_A, 0) == [ASSERTED]


def test_ack_of_last_cause_deasserts(bus: PciBus) -> None:
    ring(bus, 0)
    assert ack(bus, 1) == [DEASSERTED]
    assert not status_interrupt(bus)
    assert bus.bar_read(SLOT_A, IO_BAR, REG_IRQ_STATUS, 4) == 0


def test_partial_ack_keeps_the_line_asserted(bus: PciBus) -> None:
    ring(bus, 0)
    ring(bus, 1)
    assert ack(bus, 1 << 0) == []
    assert status_interrupt(bus)
    assert ack(bus, 1 << 1) == [DEASSERTED]


def test_status_interrupt_bit_ignores_writes(bus: PciBus) -> None:
    ring(bus, 0)
    cfg_write(bus, SLOT_A, PCI_STATUS, 2, PCI_STATUS_INTERRUPT)
    assert status_interrupt(bus)


def test_reset_deasserts_intx(bus: PciBus, dev: PciTestDevice) -> None:
    ring(bus, 0)
    assert DEASSERTED in bus.reset(SLOT_A)
    assert not status_interrupt(bus)


def test_function_without_interrupt_pin_reports_no_intx() -> None:
    function = PciFunction(
        PciIdentity(vendor_id=0x1AF4, device_id=1, class_code=0, interrupt_pin=0),
        [BarSpec(0, BarKind.MEM32, 0x1000)],
    )
    function.signal(0)
    assert function.take_effects() == []
