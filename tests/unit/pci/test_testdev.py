"""The PCI test device's registers and RAM, reset, and hostile BAR accesses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devserver.devices.testdev import (
    ID_VALUE,
    IO_BAR,
    MEM_BAR,
    MSIX_BAR,
    RAM_OFFSET,
    RAM_SIZE,
    REG_BAR_INDEX,
    REG_DOORBELL,
    REG_ID,
    REG_RESETS,
    REG_SCRATCH,
    PciTestDevice,
)
from devserver.errors import AccessError
from devserver.pci.bus import PciBus
from devserver.pci.regs import PCI_COMMAND, PCI_INTERRUPT_LINE
from tests.strategies import (
    DECODE,
    SLOT_A,
    bar_events,
    cfg_read,
    cfg_write,
    make_bus,
    program_bar,
    set_command,
)

REGISTER_BARS = pytest.mark.parametrize("bar", [IO_BAR, MEM_BAR], ids=["io", "mem"])

# -- registers


@REGISTER_BARS
def test_id_register(bus: PciBus, bar: int) -> None:
    assert bus.bar_read(SLOT_A, bar, REG_ID, 4) == ID_VALUE


@REGISTER_BARS
def test_bar_index_register_names_the_bar(bus: PciBus, bar: int) -> None:
    assert bus.bar_read(SLOT_A, bar, REG_BAR_INDEX, 4) == bar


@REGISTER_BARS
def test_scratch_register_holds_a_value(bus: PciBus, bar: int) -> None:
    bus.bar_write(SLOT_A, bar, REG_SCRATCH, 4, 0xCAFE_F00D)
    assert bus.bar_read(SLOT_A, bar, REG_SCRATCH, 4) == 0xCAFE_F00D


def test_scratch_is_shared_by_both_bars(bus: PciBus) -> None:
    bus.bar_write(SLOT_A, IO_BAR, REG_SCRATCH, 4, 0x1234_5678)
    assert bus.bar_read(SLOT_A, MEM_BAR, REG_SCRATCH, 4) == 0x1234_5678


def test_id_register_ignores_writes(bus: PciBus) -> None:
    bus.bar_write(SLOT_A, MEM_BAR, REG_ID, 4, 0)
    assert bus.bar_read(SLOT_A, MEM_BAR, REG_ID, 4) == ID_VALUE


def test_narrow_reads_see_part_of_a_register(bus: PciBus) -> None:
    assert bus.bar_read(SLOT_A, IO_BAR, REG_ID + 3, 1) == ID_VALUE >> 24
    assert bus.bar_read(SLOT_A, IO_BAR, REG_ID + 2, 2) == ID_VALUE >> 16


def test_doorbell_reads_back_the_count_rung(bus: PciBus) -> None:
    for _ in range(3):
        bus.bar_write(SLOT_A, MEM_BAR, REG_DOORBELL, 4, 0)
    assert bus.bar_read(SLOT_A, MEM_BAR, REG_DOORBELL, 4) == 3


def test_msix_bar_outside_table_and_pba_reads_zero(bus: PciBus) -> None:
    assert bus.bar_read(SLOT_A, MSIX_BAR, 0xFF8, 8) == 0


# -- RAM


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_ram_roundtrip_of_every_width(bus: PciBus, size: int) -> None:
    value = 0x0123_4567_89AB_CDEF & ((1 << (8 * size)) - 1)
    bus.bar_write(SLOT_A, MEM_BAR, RAM_OFFSET + 8, size, value)
    assert bus.bar_read(SLOT_A, MEM_BAR, RAM_OFFSET + 8, size) == value


def test_ram_qword_at_the_start_and_end(bus: PciBus) -> None:
    last = RAM_OFFSET + RAM_SIZE - 8
    bus.bar_write(SLOT_A, MEM_BAR, RAM_OFFSET, 8, 0x1111_2222_3333_4444)
    bus.bar_write(SLOT_A, MEM_BAR, last, 8, 0x5555_6666_7777_8888)
    assert bus.bar_read(SLOT_A, MEM_BAR, RAM_OFFSET, 8) == 0x1111_2222_3333_4444
    assert bus.bar_read(SLOT_A, MEM_BAR, last, 8) == 0x5555_6666_7777_8888


def test_ram_is_little_endian_bytes(bus: PciBus) -> None:
    bus.bar_write(SLOT_A, MEM_BAR, RAM_OFFSET, 8, 0x0807_0605_0403_0201)
    got = [bus.bar_read(SLOT_A, MEM_BAR, RAM_OFFSET + i, 1) for i in range(8)]
    assert got == list(range(1, 9))


def test_bar_offsets_past_ram_read_zero(bus: PciBus) -> None:
    bus.bar_write(SLOT_A, MEM_BAR, RAM_OFFSET + RAM_SIZE, 8, 0xFFFF)
    assert bus.bar_read(SLOT_A, MEM_BAR, RAM_OFFSET + RAM_SIZE, 8) == 0


@given(
    bar=st.sampled_from((IO_BAR, MEM_BAR)),
    offset=st.integers(0, 0x20),
    size=st.sampled_from((2, 4, 8)),
    scratch=st.integers(0, 0xFFFF_FFFF),
)
def test_wide_register_read_equals_its_bytes(
    bar: int, offset: int, size: int, scratch: int
) -> None:
    # However a guest slices the register block, it sees the same bytes.
    bus = make_bus(1)
    bus.bar_write(SLOT_A, bar, REG_SCRATCH, 4, scratch)
    bytewise = [bus.bar_read(SLOT_A, bar, offset + i, 1) for i in range(size)]
    assert bus.bar_read(SLOT_A, bar, offset, size) == int.from_bytes(bytes(bytewise), "little")


# -- reset


def test_reset_stops_every_decoding_bar(bus: PciBus) -> None:
    for bar, address in ((IO_BAR, 0xC000), (MEM_BAR, 0xFE01_0000), (MSIX_BAR, 0xFE00_0000)):
        program_bar(bus, SLOT_A, bar, address)
    set_command(bus, SLOT_A, DECODE)
    events = bar_events(bus.reset(SLOT_A))
    assert [(e.bar, e.new) for e in events] == [(IO_BAR, None), (MEM_BAR, None), (MSIX_BAR, None)]
    assert bus.decoding() == {}


def test_reset_reports_only_bar_off_events(bus: PciBus) -> None:
    # BAR2 covers BAR4 of the same function, which is shadowed: a reset must
    # not wake BAR4 for a moment on its way out.
    program_bar(bus, SLOT_A, MSIX_BAR, 0xFE00_1000)
    set_command(bus, SLOT_A, DECODE)
    program_bar(bus, SLOT_A, MEM_BAR, 0xFE00_0000)
    events = bar_events(bus.reset(SLOT_A))
    assert [(e.bar, e.new) for e in events] == [(MEM_BAR, None)]


def test_reset_restores_power_on_config_space(bus: PciBus, dev: PciTestDevice) -> None:
    power_on = dev.cs.snapshot()
    program_bar(bus, SLOT_A, MEM_BAR, 0x1_0000_0000)
    cfg_write(bus, SLOT_A, PCI_COMMAND, 2, 0xFFFF)
    cfg_write(bus, SLOT_A, PCI_INTERRUPT_LINE, 1, 11)
    bus.reset(SLOT_A)
    assert dev.cs.snapshot() == power_on
    assert cfg_read(bus, SLOT_A, PCI_COMMAND, 2) == 0


def test_reset_clears_scratch_ram_and_doorbells(bus: PciBus) -> None:
    bus.bar_write(SLOT_A, MEM_BAR, REG_SCRATCH, 4, 0xFFFF_FFFF)
    bus.bar_write(SLOT_A, MEM_BAR, RAM_OFFSET, 8, 0xFFFF_FFFF)
    bus.bar_write(SLOT_A, MEM_BAR, REG_DOORBELL, 4, 0)
    bus.reset(SLOT_A)
    assert bus.bar_read(SLOT_A, MEM_BAR, REG_SCRATCH, 4) == 0
    assert bus.bar_read(SLOT_A, MEM_BAR, RAM_OFFSET, 8) == 0
    assert bus.bar_read(SLOT_A, MEM_BAR, REG_DOORBELL, 4) == 0


def test_reset_counter_survives_reset(bus: PciBus) -> None:
    bus.reset(SLOT_A)
    bus.reset(SLOT_A)
    assert bus.bar_read(SLOT_A, IO_BAR, REG_RESETS, 4) == 2


def test_reset_of_one_device_leaves_the_other(bus: PciBus, dev_b: PciTestDevice) -> None:
    program_bar(bus, 2, MSIX_BAR, 0xFE00_0000)
    set_command(bus, 2, DECODE)
    bus.bar_write(2, MEM_BAR, REG_SCRATCH, 4, 7)
    assert bar_events(bus.reset(SLOT_A)) == []
    assert dev_b.scratch == 7
    assert bus.is_decoding(2, MSIX_BAR)


# -- hostile BAR accesses


@pytest.mark.parametrize(
    ("device", "bar", "offset", "size"),
    [
        pytest.param(9, MEM_BAR, 0, 4, id="unknown device"),
        pytest.param(SLOT_A, 1, 0, 4, id="unimplemented BAR1"),
        pytest.param(SLOT_A, 3, 0, 4, id="high half of BAR2"),
        pytest.param(SLOT_A, 5, 0, 4, id="unimplemented BAR5"),
        pytest.param(SLOT_A, 7, 0, 4, id="BAR7"),
        pytest.param(SLOT_A, IO_BAR, 0x100, 1, id="offset past IO BAR"),
        pytest.param(SLOT_A, IO_BAR, 0xFC, 8, id="qword over IO BAR end"),
        pytest.param(SLOT_A, MEM_BAR, -1, 1, id="negative offset"),
        pytest.param(SLOT_A, MEM_BAR, 0, 16, id="size 16"),
        pytest.param(SLOT_A, MEM_BAR, 0, 3, id="size 3"),
        pytest.param(SLOT_A, MEM_BAR, 0, 0, id="size 0"),
        pytest.param(SLOT_A, 6, 0x800, 1, id="offset past ROM"),
    ],
)
def test_malformed_bar_access_raises(
    bus: PciBus, device: int, bar: int, offset: int, size: int
) -> None:
    with pytest.raises(AccessError):
        bus.bar_read(device, bar, offset, size)
    with pytest.raises(AccessError):
        bus.bar_write(device, bar, offset, size, 0)


def test_bar_write_value_is_truncated_to_its_size(bus: PciBus) -> None:
    bus.bar_write(SLOT_A, MEM_BAR, RAM_OFFSET, 1, 0x1FF)
    assert bus.bar_read(SLOT_A, MEM_BAR, RAM_OFFSET, 2) == 0xFF


def test_bar_accesses_work_whether_or_not_the_bar_decodes(bus: PciBus) -> None:
    # The frontend routes by address; the core addresses BARs by index only.
    assert not bus.is_decoding(SLOT_A, MEM_BAR)
    assert bus.bar_read(SLOT_A, MEM_BAR, REG_ID, 4) == ID_VALUE
