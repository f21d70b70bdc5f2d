"""Type-0 header write rules, and config accesses no PCI bus can carry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devserver.devices.testdev import DEVICE_ID, VENDOR_ID, PciTestDevice
from devserver.errors import AccessError
from devserver.pci.bus import PciBus
from devserver.pci.config_space import ConfigSpace
from devserver.pci.regs import (
    PCI_CACHE_LINE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_SERR,
    PCI_COMMAND_WRITABLE,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_W1C,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)
from tests.strategies import SLOT_A, cfg_read, cfg_write, config_writes, make_bus, overlapping_pairs

EMPTY_SLOT = 7

# -- read-only identification registers


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        pytest.param(PCI_VENDOR_ID, 4, id="vendor+device id"),
        pytest.param(PCI_REVISION_ID, 4, id="revision+class"),
        pytest.param(PCI_HEADER_TYPE, 1, id="header type"),
        pytest.param(PCI_SUBSYSTEM_VENDOR_ID, 4, id="subsystem ids"),
        pytest.param(PCI_INTERRUPT_PIN, 1, id="interrupt pin"),
    ],
)
@pytest.mark.parametrize("value", [0, 0xFFFF_FFFF, 0x5A5A_5A5A])
def test_read_only_registers_ignore_writes(bus: PciBus, offset: int, size: int, value: int) -> None:
    before = cfg_read(bus, SLOT_A, offset, size)
    cfg_write(bus, SLOT_A, offset, size, value & ((1 << (8 * size)) - 1))
    assert cfg_read(bus, SLOT_A, offset, size) == before


def test_identity_registers_hold_the_test_device_ids(bus: PciBus) -> None:
    assert cfg_read(bus, SLOT_A, PCI_VENDOR_ID, 4) == DEVICE_ID << 16 | VENDOR_ID
    assert cfg_read(bus, SLOT_A, PCI_REVISION_ID, 1) == 1
    assert cfg_read(bus, SLOT_A, PCI_CLASS_PROG, 1) == 0x00
    assert cfg_read(bus, SLOT_A, PCI_HEADER_TYPE, 1) == 0x00
    assert cfg_read(bus, SLOT_A, PCI_SUBSYSTEM_VENDOR_ID, 2) == VENDOR_ID
    assert cfg_read(bus, SLOT_A, PCI_SUBSYSTEM_ID, 2) == 0x0001
    assert cfg_read(bus, SLOT_A, PCI_INTERRUPT_PIN, 1) == 1


# -- writable registers


def test_command_keeps_only_writable_bits(bus: PciBus) -> None:
    cfg_write(bus, SLOT_A, PCI_COMMAND, 2, 0xFFFF)
    assert cfg_read(bus, SLOT_A, PCI_COMMAND, 2) == PCI_COMMAND_WRITABLE


def test_command_bits_clear_again(bus: PciBus) -> None:
    cfg_write(bus, SLOT_A, PCI_COMMAND, 2, 0xFFFF)
    cfg_write(bus, SLOT_A, PCI_COMMAND, 2, 0)
    assert cfg_read(bus, SLOT_A, PCI_COMMAND, 2) == 0


def test_command_high_byte_write_applies_its_own_mask(bus: PciBus) -> None:
    # A byte write to 0x05 reaches SERR and INTx-disable only, low byte untouched.
    cfg_write(bus, SLOT_A, PCI_COMMAND + 1, 1, 0xFF)
    assert cfg_read(bus, SLOT_A, PCI_COMMAND, 2) == PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE


@pytest.mark.parametrize("offset", [PCI_CACHE_LINE_SIZE, PCI_INTERRUPT_LINE])
def test_byte_register_is_writable(bus: PciBus, offset: int) -> None:
    cfg_write(bus, SLOT_A, offset, 1, 0xA5)
    assert cfg_read(bus, SLOT_A, offset, 1) == 0xA5


def test_latency_timer_and_bist_are_hardwired(bus: PciBus) -> None:
    # A PCIe function's latency timer and our missing BIST read zero.
    cfg_write(bus, SLOT_A, PCI_CACHE_LINE_SIZE, 4, 0xFFFF_FFFF)
    assert cfg_read(bus, SLOT_A, PCI_CACHE_LINE_SIZE, 4) == 0x0000_00FF


# -- status


def test_status_reports_capability_list(bus: PciBus) -> None:
    assert cfg_read(bus, SLOT_A, PCI_STATUS, 2) & PCI_STATUS_CAP_LIST


def test_status_w1c_bits_clear_when_written_with_one(dev: PciTestDevice, bus: PciBus) -> None:
    dev.cs.set(PCI_STATUS, 2, dev.cs.get(PCI_STATUS, 2) | PCI_STATUS_W1C)
    cfg_write(bus, SLOT_A, PCI_STATUS, 2, PCI_STATUS_W1C)
    assert cfg_read(bus, SLOT_A, PCI_STATUS, 2) == PCI_STATUS_CAP_LIST


def test_status_w1c_bits_survive_a_zero_write(dev: PciTestDevice, bus: PciBus) -> None:
    dev.cs.set(PCI_STATUS, 2, dev.cs.get(PCI_STATUS, 2) | PCI_STATUS_W1C)
    cfg_write(bus, SLOT_A, PCI_STATUS, 2, 0)
    assert cfg_read(bus, SLOT_A, PCI_STATUS, 2) == PCI_STATUS_CAP_LIST | PCI_STATUS_W1C


def test_status_w1c_clears_only_the_bits_written(dev: PciTestDevice, bus: PciBus) -> None:
    dev.cs.set(PCI_STATUS, 2, dev.cs.get(PCI_STATUS, 2) | PCI_STATUS_W1C)
    cfg_write(bus, SLOT_A, PCI_STATUS + 1, 1, 0x80)  # detected parity error only
    assert cfg_read(bus, SLOT_A, PCI_STATUS, 2) == PCI_STATUS_CAP_LIST | (PCI_STATUS_W1C & ~0x8000)


def test_status_cap_list_bit_ignores_writes(bus: PciBus) -> None:
    cfg_write(bus, SLOT_A, PCI_STATUS, 2, 0xFFFF)
    assert cfg_read(bus, SLOT_A, PCI_STATUS, 2) == PCI_STATUS_CAP_LIST


def test_dword_write_over_command_and_status(dev: PciTestDevice, bus: PciBus) -> None:
    # Linux's pci_write_config_dword(PCI_COMMAND) hits both registers at once.
    dev.cs.set(PCI_STATUS, 2, dev.cs.get(PCI_STATUS, 2) | PCI_STATUS_W1C)
    cfg_write(bus, SLOT_A, PCI_COMMAND, 4, 0xFFFF_FFFF)
    assert cfg_read(bus, SLOT_A, PCI_COMMAND, 4) == PCI_STATUS_CAP_LIST << 16 | PCI_COMMAND_WRITABLE


# -- the ConfigSpace primitive


def test_config_space_write_honours_per_byte_masks() -> None:
    cs = ConfigSpace(16)
    cs.set(0, 4, 0x1234_5678)
    cs.set_writable(0, 4, 0x00FF_0F00)
    cs.write(0, 4, 0xFFFF_FFFF)
    assert cs.read(0, 4) == 0x12FF_5F78


def test_config_space_set_rejects_out_of_range() -> None:
    cs = ConfigSpace(16)
    with pytest.raises(IndexError):
        cs.set(14, 4, 0)
    with pytest.raises(IndexError):
        cs.get(-1, 1)


# -- accesses the bus refuses


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        pytest.param(4096, 1, id="offset past 4095"),
        pytest.param(0xFFE, 4, id="dword crossing the end"),
        pytest.param(-1, 1, id="negative offset"),
        pytest.param(0, 3, id="size 3"),
        pytest.param(0, 8, id="size 8"),
        pytest.param(0, 0, id="size 0"),
        pytest.param(2, 4, id="misaligned dword"),
        pytest.param(1, 2, id="misaligned word"),
    ],
)
def test_malformed_config_access_raises(bus: PciBus, offset: int, size: int) -> None:
    with pytest.raises(AccessError):
        cfg_read(bus, SLOT_A, offset, size)
    with pytest.raises(AccessError):
        cfg_write(bus, SLOT_A, offset, size, 0)


@pytest.mark.parametrize(
    ("bus_nr", "device", "function"),
    [(256, 0, 0), (-1, 0, 0), (0, 32, 0), (0, -1, 0), (0, 0, 8), (0, 0, -1)],
)
def test_address_outside_pci_raises(bus: PciBus, bus_nr: int, device: int, function: int) -> None:
    with pytest.raises(AccessError):
        bus.config_read(bus_nr, device, function, 0, 4)
    with pytest.raises(AccessError):
        bus.config_write(bus_nr, device, function, 0, 4, 0)


def test_malformed_access_to_empty_slot_still_raises(bus: PciBus) -> None:
    # The access is checked before the slot is looked up: no all-ones for size 3.
    with pytest.raises(AccessError):
        cfg_read(bus, EMPTY_SLOT, 0, 3)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_empty_slot_reads_all_ones(bus: PciBus, size: int) -> None:
    assert cfg_read(bus, EMPTY_SLOT, 0, size) == (1 << (8 * size)) - 1


@pytest.mark.parametrize(("bus_nr", "function"), [(1, 0), (0, 1)])
def test_other_bus_or_function_reads_all_ones(bus: PciBus, bus_nr: int, function: int) -> None:
    assert bus.config_read(bus_nr, SLOT_A, function, 0, 4) == 0xFFFF_FFFF


def test_write_to_empty_slot_is_dropped(bus: PciBus) -> None:
    assert cfg_write(bus, EMPTY_SLOT, PCI_COMMAND, 2, 0xFFFF) == []
    assert cfg_read(bus, EMPTY_SLOT, PCI_COMMAND, 2) == 0xFFFF
    assert cfg_read(bus, SLOT_A, PCI_COMMAND, 2) == 0


def test_unknown_device_id_raises(bus: PciBus) -> None:
    with pytest.raises(AccessError):
        bus.function(EMPTY_SLOT)
    with pytest.raises(AccessError):
        bus.reset(EMPTY_SLOT)


@given(st.lists(config_writes(), max_size=30))
def test_random_config_writes_never_raise(writes: list[tuple[int, int, int]]) -> None:
    bus = make_bus(2)
    for offset, size, value in writes:
        cfg_write(bus, SLOT_A, offset, size, value)
        assert cfg_read(bus, SLOT_A, offset, size) < 1 << (8 * size)
    # Whatever the guest scribbled, identity holds and decoding stays sane.
    assert cfg_read(bus, SLOT_A, PCI_VENDOR_ID, 4) == DEVICE_ID << 16 | VENDOR_ID
    assert overlapping_pairs(bus, bus.decoding()) == []
