"""MSI-X: vector table, masking, pending bits and delivery (PCI 3.0 §6.8.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devserver.devices.testdev import MEM_BAR, MSIX_BAR, MSIX_VECTORS, REG_DOORBELL, PciTestDevice
from devserver.effects import Effect, IntxChanged, MsiRaised
from devserver.pci.bus import PciBus
from devserver.pci.regs import (
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
)
from tests.strategies import SLOT_A, cfg_read, cfg_write, make_bus

PBA = 0x800
ADDRESS = 0xFEE0_1000
DATA = 0x4041


def flags_offset(dev: PciTestDevice) -> int:
    assert dev.msix is not None
    return dev.msix.cap_offset + PCI_MSIX_FLAGS


def set_flags(bus: PciBus, dev: PciTestDevice, flags: int) -> list[Effect]:
    return cfg_write(bus, SLOT_A, flags_offset(dev), 2, flags)


def entry(vector: int) -> int:
    return vector * PCI_MSIX_ENTRY_SIZE


def program_vector(bus: PciBus, vector: int, address: int, data: int) -> None:
    bus.bar_write(SLOT_A, MSIX_BAR, entry(vector), 8, address)
    bus.bar_write(SLOT_A, MSIX_BAR, entry(vector) + 8, 4, data)


def set_vector_mask(bus: PciBus, vector: int, masked: bool) -> list[Effect]:
    return bus.bar_write(SLOT_A, MSIX_BAR, entry(vector) + 12, 4, int(masked))


def ring(bus: PciBus, vector: int) -> list[Effect]:
    return bus.bar_write(SLOT_A, MEM_BAR, REG_DOORBELL, 4, vector)


def pba(bus: PciBus) -> int:
    return bus.bar_read(SLOT_A, MSIX_BAR, PBA, 8)


@pytest.fixture
def armed(bus: PciBus, dev: PciTestDevice) -> PciBus:
    """MSI-X enabled, every vector programmed with (ADDRESS + v, DATA + v), still masked."""
    for vector in range(MSIX_VECTORS):
        program_vector(bus, vector, ADDRESS + 4 * vector, DATA + vector)
    set_flags(bus, dev, PCI_MSIX_FLAGS_ENABLE)
    return bus


def msi(vector: int) -> MsiRaised:
    return MsiRaised(SLOT_A, vector, ADDRESS + 4 * vector, DATA + vector)


def test_table_entries_start_masked(bus: PciBus) -> None:
    for vector in range(MSIX_VECTORS):
        assert bus.bar_read(SLOT_A, MSIX_BAR, entry(vector) + 12, 4) == 1


def test_msix_starts_disabled(bus: PciBus, dev: PciTestDevice) -> None:
    assert cfg_read(bus, SLOT_A, flags_offset(dev), 2) & PCI_MSIX_FLAGS_ENABLE == 0


def test_table_entry_reads_back_what_was_programmed(bus: PciBus) -> None:
    program_vector(bus, 2, 0x1_FEE0_0000, 0xDEAD_BEEF)
    assert bus.bar_read(SLOT_A, MSIX_BAR, entry(2), 8) == 0x1_FEE0_0000
    assert bus.bar_read(SLOT_A, MSIX_BAR, entry(2) + 8, 4) == 0xDEAD_BEEF


def test_table_address_low_bits_and_reserved_control_bits_are_hardwired(bus: PciBus) -> None:
    bus.bar_write(SLOT_A, MSIX_BAR, entry(0), 4, 0xFEE0_0003)
    bus.bar_write(SLOT_A, MSIX_BAR, entry(0) + 12, 4, 0xFFFF_FFFE)
    assert bus.bar_read(SLOT_A, MSIX_BAR, entry(0), 4) == 0xFEE0_0000
    assert bus.bar_read(SLOT_A, MSIX_BAR, entry(0) + 12, 4) == 0


def test_unmasked_vector_raises_its_message(armed: PciBus) -> None:
    set_vector_mask(armed, 1, masked=False)
    assert ring(armed, 1) == [msi(1)]


def test_msi_does_not_touch_intx(armed: PciBus) -> None:
    set_vector_mask(armed, 0, masked=False)
    assert not any(isinstance(e, IntxChanged) for e in ring(armed, 0))


def test_masked_vector_sets_its_pending_bit(armed: PciBus) -> None:
    assert ring(armed, 2) == []
    assert pba(armed) == 1 << 2


def test_unmasking_delivers_the_pending_vector_once(armed: PciBus) -> None:
    ring(armed, 2)
    assert set_vector_mask(armed, 2, masked=False) == [msi(2)]
    assert pba(armed) == 0
    assert set_vector_mask(armed, 2, masked=False) == []


def test_function_mask_holds_vectors_pending(armed: PciBus, dev: PciTestDevice) -> None:
    set_vector_mask(armed, 0, masked=False)
    set_vector_mask(armed, 3, masked=False)
    set_flags(armed, dev, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    assert ring(armed, 0) + ring(armed, 3) == []
    assert pba(armed) == 0b1001


def test_clearing_function_mask_delivers_pending_vectors(armed: PciBus, dev: PciTestDevice) -> None:
    set_vector_mask(armed, 0, masked=False)
    set_vector_mask(armed, 3, masked=False)
    set_flags(armed, dev, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    ring(armed, 3)
    ring(armed, 0)
    assert set_flags(armed, dev, PCI_MSIX_FLAGS_ENABLE) == [msi(0), msi(3)]
    assert pba(armed) == 0


def test_clearing_function_mask_keeps_masked_vectors_pending(
    armed: PciBus, dev: PciTestDevice
) -> None:
    set_flags(armed, dev, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    ring(armed, 1)  # vector 1 is also masked on its own
    assert set_flags(armed, dev, PCI_MSIX_FLAGS_ENABLE) == []
    assert pba(armed) == 1 << 1


@pytest.mark.parametrize("vector", [MSIX_VECTORS, 31, 0xFFFF_FFFF])
def test_vector_out_of_range_is_ignored(armed: PciBus, vector: int) -> None:
    for v in range(MSIX_VECTORS):
        set_vector_mask(armed, v, masked=False)
    assert ring(armed, vector) == []
    assert pba(armed) == 0


def test_pba_is_read_only(armed: PciBus) -> None:
    ring(armed, 0)
    assert armed.bar_write(SLOT_A, MSIX_BAR, PBA, 8, 0) == []
    armed.bar_write(SLOT_A, MSIX_BAR, PBA, 8, 0xFFFF_FFFF_FFFF_FFFF)
    assert pba(armed) == 1


def test_reset_disables_msix_masks_vectors_and_clears_pending(
    armed: PciBus, dev: PciTestDevice
) -> None:
    set_vector_mask(armed, 0, masked=False)
    ring(armed, 1)
    armed.reset(SLOT_A)
    assert cfg_read(armed, SLOT_A, flags_offset(dev), 2) & PCI_MSIX_FLAGS_ENABLE == 0
    assert armed.bar_read(SLOT_A, MSIX_BAR, entry(0) + 12, 4) == 1
    assert armed.bar_read(SLOT_A, MSIX_BAR, entry(0), 8) == 0
    assert pba(armed) == 0


@given(
    offset=st.integers(0, MSIX_VECTORS * PCI_MSIX_ENTRY_SIZE - 1),
    size=st.sampled_from((1, 2, 4, 8)),
    value=st.integers(0, (1 << 64) - 1),
)
def test_table_accesses_of_any_width_and_alignment_do_not_raise(
    offset: int, size: int, value: int
) -> None:
    bus = make_bus(1)
    offset = min(offset, 0x1000 - size)
    bus.bar_write(SLOT_A, MSIX_BAR, offset, size, value)
    assert bus.bar_read(SLOT_A, MSIX_BAR, offset, size) < 1 << (8 * size)
    # Whatever landed in the table, control words keep only the mask bit.
    for vector in range(MSIX_VECTORS):
        assert bus.bar_read(SLOT_A, MSIX_BAR, entry(vector) + 12, 4) in (0, 1)


def test_access_straddling_table_end_does_not_raise(bus: PciBus) -> None:
    end = MSIX_VECTORS * PCI_MSIX_ENTRY_SIZE
    bus.bar_write(SLOT_A, MSIX_BAR, end - 4, 8, 0xFFFF_FFFF_FFFF_FFFF)
    assert bus.bar_read(SLOT_A, MSIX_BAR, end - 4, 8) >= 0
