"""What decodes: command gating, moves, 64-bit halves, and overlap arbitration."""

from __future__ import annotations

import pytest

from devserver.devices.testdev import IO_BAR, MEM_BAR, MSIX_BAR, PciTestDevice
from devserver.effects import AddressRange, BarKind
from devserver.errors import ConfigError
from devserver.pci.bars import BarSpec
from devserver.pci.bus import BarKey, PciBus
from devserver.pci.function import PciFunction, PciIdentity, Presentation
from devserver.pci.regs import PCI_COMMAND_IO, PCI_COMMAND_MEMORY
from tests.strategies import (
    BAR_REGISTER,
    DECODE,
    ROM_BAR,
    SLOT_A,
    SLOT_B,
    bar_events,
    cfg_read,
    cfg_write,
    make_bus,
    moves,
    overlapping_pairs,
    program_bar,
    replay,
    set_command,
)

A, B = SLOT_A, SLOT_B
IO_A = AddressRange(0xC000, 0x100)
MEM2_A = AddressRange(0xFE01_0000, 0x10000)  # BAR2, 64 KiB
MEM4_A = AddressRange(0xFE00_0000, 0x1000)  # BAR4, 4 KiB
ROM_A = AddressRange(0xFE00_1800, 0x800)
MEM4_B = AddressRange(0xFE10_0000, 0x1000)
ELSEWHERE = AddressRange(0xFE20_0000, 0x1000)


def program_a(bus: PciBus) -> None:
    program_bar(bus, A, IO_BAR, IO_A.base)
    program_bar(bus, A, MEM_BAR, MEM2_A.base)
    program_bar(bus, A, MSIX_BAR, MEM4_A.base)
    program_bar(bus, A, ROM_BAR, ROM_A.base)


# -- command register gating


def test_programming_with_decoding_off_reports_nothing(bus: PciBus) -> None:
    effects = program_bar(bus, A, MSIX_BAR, MEM4_A.base)
    assert effects == []
    assert bus.decoding() == {}


def test_memory_enable_starts_every_memory_bar(bus: PciBus) -> None:
    program_a(bus)
    assert moves(set_command(bus, A, PCI_COMMAND_MEMORY)) == [
        (A, MEM_BAR, None, MEM2_A),
        (A, MSIX_BAR, None, MEM4_A),
        (A, ROM_BAR, None, ROM_A),
    ]


def test_memory_disable_stops_every_memory_bar(bus: PciBus) -> None:
    program_a(bus)
    set_command(bus, A, DECODE)
    assert moves(set_command(bus, A, PCI_COMMAND_IO)) == [
        (A, MEM_BAR, MEM2_A, None),
        (A, MSIX_BAR, MEM4_A, None),
        (A, ROM_BAR, ROM_A, None),
    ]
    assert bus.decoding() == {BarKey(A, IO_BAR): IO_A}


def test_io_enable_toggles_only_the_io_bar(bus: PciBus) -> None:
    program_a(bus)
    assert moves(set_command(bus, A, PCI_COMMAND_IO)) == [(A, IO_BAR, None, IO_A)]
    assert moves(set_command(bus, A, 0)) == [(A, IO_BAR, IO_A, None)]


def test_rewriting_the_same_command_reports_nothing(bus: PciBus) -> None:
    program_a(bus)
    set_command(bus, A, DECODE)
    assert set_command(bus, A, DECODE) == []


def test_events_describe_the_bar(bus: PciBus) -> None:
    program_a(bus)
    events = {e.bar: e for e in bar_events(set_command(bus, A, DECODE))}
    assert [(e.kind, e.prefetchable, e.backing) for e in events.values()] == [
        (BarKind.IO, False, None),
        (BarKind.MEM64, True, None),
        (BarKind.MEM32, False, None),
        (BarKind.ROM, False, None),
    ]
    assert all(e.device_id == A and e.decoding for e in events.values())


def test_generation_counts_every_decode_change(bus: PciBus) -> None:
    program_a(bus)
    on = bar_events(set_command(bus, A, DECODE))
    off = bar_events(set_command(bus, A, 0))
    assert [e.generation for e in on + off] == list(range(1, 9))
    assert bus.generation == 8


def test_address_zero_never_decodes(bus: PciBus) -> None:
    # Power-on BARs hold zero; turning decoding on must not claim address 0.
    assert set_command(bus, A, DECODE) == []
    assert bus.decoding() == {}


def test_writing_zero_to_a_decoding_bar_stops_it(bus: PciBus) -> None:
    program_a(bus)
    set_command(bus, A, DECODE)
    assert moves(cfg_write(bus, A, BAR_REGISTER[MSIX_BAR], 4, 0)) == [(A, MSIX_BAR, MEM4_A, None)]


@pytest.mark.parametrize(
    ("bar", "at"), [(IO_BAR, IO_A), (MSIX_BAR, MEM4_A), (ROM_BAR, ROM_A)], ids=["io", "mem", "rom"]
)
def test_sizing_while_decoding_stops_decoding_and_restore_resumes(
    bus: PciBus, bar: int, at: AddressRange
) -> None:
    # The sizing value ~(size - 1) is never a real address (QEMU's rule).
    program_a(bus)
    set_command(bus, A, DECODE)
    register = BAR_REGISTER[bar]
    restore = cfg_read(bus, A, register, 4)
    assert moves(cfg_write(bus, A, register, 4, 0xFFFF_FFFF)) == [(A, bar, at, None)]
    assert moves(cfg_write(bus, A, register, 4, restore)) == [(A, bar, None, at)]


def test_sizing_a_decoding_64bit_bar_stops_it_and_restore_resumes(bus: PciBus) -> None:
    program_a(bus)
    set_command(bus, A, DECODE)
    routing = bus.decoding()
    low, high = BAR_REGISTER[MEM_BAR], BAR_REGISTER[MEM_BAR] + 4
    saved = cfg_read(bus, A, low, 4), cfg_read(bus, A, high, 4)
    for register in (low, high):
        replay(bus, routing, cfg_write(bus, A, register, 4, 0xFFFF_FFFF))
    assert not bus.is_decoding(A, MEM_BAR)
    for register, value in zip((low, high), saved, strict=True):
        replay(bus, routing, cfg_write(bus, A, register, 4, value))
    assert bus.decoding()[BarKey(A, MEM_BAR)] == MEM2_A
    assert routing == bus.decoding()


# -- moves


def test_move_while_decoding_is_a_single_event(bus: PciBus) -> None:
    program_a(bus)
    set_command(bus, A, DECODE)
    assert moves(program_bar(bus, A, MSIX_BAR, ELSEWHERE.base)) == [
        (A, MSIX_BAR, MEM4_A, ELSEWHERE)
    ]


@pytest.mark.parametrize("low_first", [True, False], ids=["low-first", "high-first"])
def test_64bit_halves_in_either_order_end_at_the_same_address(bus: PciBus, low_first: bool) -> None:
    target = AddressRange(0x1_2345_0000, 0x10000)
    set_command(bus, A, PCI_COMMAND_MEMORY)
    writes = [(BAR_REGISTER[MEM_BAR], target.base & 0xFFFF_FFFF), (BAR_REGISTER[MEM_BAR] + 4, 1)]
    routing = bus.decoding()
    for register, value in writes if low_first else writes[::-1]:
        replay(bus, routing, cfg_write(bus, A, register, 4, value))
    assert routing == bus.decoding() == {BarKey(A, MEM_BAR): target}


@pytest.mark.parametrize("low_first", [True, False], ids=["low-first", "high-first"])
def test_64bit_halves_written_with_decoding_off_enable_as_one_event(
    bus: PciBus, low_first: bool
) -> None:
    target = AddressRange(0x1_2345_0000, 0x10000)
    writes = [(BAR_REGISTER[MEM_BAR], target.base & 0xFFFF_FFFF), (BAR_REGISTER[MEM_BAR] + 4, 1)]
    for register, value in writes if low_first else writes[::-1]:
        assert cfg_write(bus, A, register, 4, value) == []
    assert moves(set_command(bus, A, PCI_COMMAND_MEMORY)) == [(A, MEM_BAR, None, target)]


def test_64bit_bar_above_4gib(bus: PciBus) -> None:
    program_bar(bus, A, MEM_BAR, 0x80_0000_0000)
    (event,) = bar_events(set_command(bus, A, PCI_COMMAND_MEMORY))
    assert event.new == AddressRange(0x80_0000_0000, 0x10000)
    assert (event.kind, event.prefetchable) == (BarKind.MEM64, True)


def test_presentation_without_bar64_makes_mem64_a_mem32_bar() -> None:
    bus = make_bus(1, Presentation(bar64=False))
    register = BAR_REGISTER[MEM_BAR]
    assert cfg_read(bus, A, register, 4) == 0x8  # prefetchable, 32-bit
    cfg_write(bus, A, register + 4, 4, 0xFFFF_FFFF)
    assert cfg_read(bus, A, register + 4, 4) == 0  # no high half any more
    cfg_write(bus, A, register, 4, MEM2_A.base)
    (event,) = bar_events(set_command(bus, A, PCI_COMMAND_MEMORY))
    assert (event.kind, event.prefetchable, event.new) == (BarKind.MEM32, True, MEM2_A)


def test_presentation_without_bar64_refuses_a_bar_over_2gib() -> None:
    with pytest.raises(ConfigError):
        PciFunction(
            PciIdentity(vendor_id=0x1AF4, device_id=1, class_code=0),
            [BarSpec(0, BarKind.MEM64, 1 << 32)],
            presentation=Presentation(bar64=False),
        )


# -- sub-dword writes into BAR registers


def test_word_writes_build_a_bar_address(bus: PciBus) -> None:
    cfg_write(bus, A, 0x20, 2, 0x1000)
    cfg_write(bus, A, 0x22, 2, 0xFE00)
    assert cfg_read(bus, A, 0x20, 4) == 0xFE00_1000


def test_byte_writes_build_a_bar_address(bus: PciBus) -> None:
    for i, byte in enumerate((0x00, 0x10, 0x00, 0xFE)):
        cfg_write(bus, A, 0x20 + i, 1, byte)
    assert cfg_read(bus, A, 0x20, 4) == 0xFE00_1000


def test_byte_write_keeps_type_bits_and_other_bytes(bus: PciBus) -> None:
    cfg_write(bus, A, 0x18, 4, 0xFE01_0000)
    cfg_write(bus, A, 0x18, 1, 0xFF)  # the low byte of a 64 KiB BAR is hardwired
    assert cfg_read(bus, A, 0x18, 4) == 0xFE01_000C


def test_word_write_to_the_high_dword(bus: PciBus) -> None:
    cfg_write(bus, A, 0x1E, 2, 0x0012)
    assert cfg_read(bus, A, 0x1C, 4) == 0x0012_0000


def test_sub_dword_write_moves_a_decoding_bar(bus: PciBus) -> None:
    program_a(bus)
    set_command(bus, A, DECODE)
    moved = AddressRange(0xFE20_0000, 0x1000)
    assert moves(cfg_write(bus, A, 0x22, 2, 0xFE20)) == [(A, MSIX_BAR, MEM4_A, moved)]


# -- overlaps during reassignment (kvmtool order)


@pytest.fixture
def two_decoding(bus: PciBus) -> PciBus:
    """BAR4 of device A at MEM4_A and of device B at MEM4_B, both decoding."""
    program_bar(bus, A, MSIX_BAR, MEM4_A.base)
    program_bar(bus, B, MSIX_BAR, MEM4_B.base)
    set_command(bus, A, PCI_COMMAND_MEMORY)
    set_command(bus, B, PCI_COMMAND_MEMORY)
    return bus


def test_moving_onto_a_decoding_bar_shadows_it(two_decoding: PciBus) -> None:
    bus = two_decoding
    assert moves(program_bar(bus, A, MSIX_BAR, MEM4_B.base)) == [
        (B, MSIX_BAR, MEM4_B, None),
        (A, MSIX_BAR, MEM4_A, MEM4_B),
    ]
    assert bus.decoding() == {BarKey(A, MSIX_BAR): MEM4_B}


def test_shadowed_bar_returns_when_the_mover_moves_away(two_decoding: PciBus) -> None:
    bus = two_decoding
    program_bar(bus, A, MSIX_BAR, MEM4_B.base)
    assert moves(program_bar(bus, A, MSIX_BAR, ELSEWHERE.base)) == [
        (A, MSIX_BAR, MEM4_B, ELSEWHERE),
        (B, MSIX_BAR, None, MEM4_B),
    ]


def test_shadowed_bar_returns_when_the_mover_stops_decoding(two_decoding: PciBus) -> None:
    bus = two_decoding
    program_bar(bus, A, MSIX_BAR, MEM4_B.base)
    assert moves(set_command(bus, A, 0)) == [
        (A, MSIX_BAR, MEM4_B, None),
        (B, MSIX_BAR, None, MEM4_B),
    ]


def test_shadowed_bar_returns_when_the_mover_is_reset(two_decoding: PciBus) -> None:
    bus = two_decoding
    program_bar(bus, A, MSIX_BAR, MEM4_B.base)
    assert moves(bus.reset(A)) == [(A, MSIX_BAR, MEM4_B, None), (B, MSIX_BAR, None, MEM4_B)]


def test_shadowed_bar_stays_off_while_anything_still_overlaps_it(bus: PciBus) -> None:
    # B's 64 KiB BAR2 is covered by A's BAR4 and A's ROM; it returns only
    # when the last of them leaves.
    big_b = AddressRange(0xFE10_0000, 0x10000)
    rom_a = AddressRange(big_b.base + 0x8000, 0x800)
    program_bar(bus, B, MEM_BAR, big_b.base)
    set_command(bus, B, PCI_COMMAND_MEMORY)
    program_bar(bus, A, MSIX_BAR, big_b.base)
    program_bar(bus, A, ROM_BAR, rom_a.base)
    set_command(bus, A, PCI_COMMAND_MEMORY)
    assert not bus.is_decoding(B, MEM_BAR)
    assert moves(program_bar(bus, A, MSIX_BAR, ELSEWHERE.base)) == [
        (A, MSIX_BAR, AddressRange(big_b.base, 0x1000), ELSEWHERE)
    ]
    assert moves(program_bar(bus, A, ROM_BAR, 0)) == [
        (A, ROM_BAR, rom_a, None),
        (B, MEM_BAR, None, big_b),
    ]


def test_larger_bar_shadows_every_bar_it_covers(two_decoding: PciBus) -> None:
    bus = two_decoding
    rom_b = AddressRange(MEM4_B.base + 0x8000, 0x800)
    program_bar(bus, B, ROM_BAR, rom_b.base)  # decodes at once: MEM is on
    moved = AddressRange(MEM4_B.base, 0x10000)
    assert moves(program_bar(bus, A, MEM_BAR, moved.base)) == [
        (B, MSIX_BAR, MEM4_B, None),
        (B, ROM_BAR, rom_b, None),
        (A, MEM_BAR, None, moved),
    ]


def test_io_and_memory_spaces_do_not_shadow_each_other(bus: PciBus) -> None:
    program_bar(bus, A, IO_BAR, 0xC000)
    program_bar(bus, B, MSIX_BAR, 0xC000)
    set_command(bus, A, DECODE)
    assert bar_events(set_command(bus, B, DECODE))[0].new == AddressRange(0xC000, 0x1000)
    assert bus.decoding() == {
        BarKey(A, IO_BAR): AddressRange(0xC000, 0x100),
        BarKey(B, MSIX_BAR): AddressRange(0xC000, 0x1000),
    }


def test_io_bars_shadow_each_other(bus: PciBus) -> None:
    program_bar(bus, A, IO_BAR, 0xC000)
    set_command(bus, A, PCI_COMMAND_IO)
    set_command(bus, B, PCI_COMMAND_IO)
    assert moves(program_bar(bus, B, IO_BAR, 0xC000)) == [
        (A, IO_BAR, IO_A, None),
        (B, IO_BAR, None, IO_A),
    ]


def test_swapping_two_bars_ends_without_overlaps(two_decoding: PciBus) -> None:
    # Linux reassigning resources: A takes B's range first, then B takes A's.
    bus = two_decoding
    routing = bus.decoding()
    replay(bus, routing, program_bar(bus, A, MSIX_BAR, MEM4_B.base))
    replay(bus, routing, program_bar(bus, B, MSIX_BAR, MEM4_A.base))
    assert routing == bus.decoding() == {BarKey(A, MSIX_BAR): MEM4_B, BarKey(B, MSIX_BAR): MEM4_A}
    assert overlapping_pairs(bus, bus.decoding()) == []


def test_disabling_memory_never_wakes_a_bar_its_sibling_shadows(
    bus: PciBus, dev: PciTestDevice
) -> None:
    # BAR2 (64 KiB) moved over BAR4 of the same function: BAR4 is shadowed.
    # Turning memory off must stop BAR2 and leave BAR4 off, not flash it on.
    program_bar(bus, A, MSIX_BAR, 0xFE00_1000)
    set_command(bus, A, PCI_COMMAND_MEMORY)
    program_bar(bus, A, MEM_BAR, 0xFE00_0000)
    assert bus.decoding() == {BarKey(A, MEM_BAR): AddressRange(0xFE00_0000, 0x10000)}
    assert moves(set_command(bus, A, 0)) == [(A, MEM_BAR, AddressRange(0xFE00_0000, 0x10000), None)]
    assert moves(program_bar(bus, A, MEM_BAR, 0)) == []
    assert dev.decoded() == {}
