"""Hypothesis strategies for the PCI core, and the few helpers the tests share.

The helpers play a guest's config cycles against a bus of PCI test devices
(slot = device id), so tests read like the kernel code they imitate.
"""

from __future__ import annotations

from typing import Final

from hypothesis import strategies as st

from devserver.devices.testdev import IO_BAR, MEM_BAR, MSIX_BAR, PciTestDevice
from devserver.effects import AddressRange, BarDecodeChanged, BarKind, Effect
from devserver.pci.bus import BarKey, PciBus
from devserver.pci.function import Presentation
from devserver.pci.regs import (
    EXT_CONFIG_SPACE_SIZE,
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY,
    PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS_ENABLE,
    ROM_BAR_INDEX,
)

SLOT_A: Final = 1
SLOT_B: Final = 2
ROM_BAR: Final = ROM_BAR_INDEX
DECODE: Final = PCI_COMMAND_IO | PCI_COMMAND_MEMORY

# The test device's BARs: index -> low register.
BAR_REGISTER: Final = {
    IO_BAR: PCI_BASE_ADDRESS_0 + 4 * IO_BAR,
    MEM_BAR: PCI_BASE_ADDRESS_0 + 4 * MEM_BAR,
    MSIX_BAR: PCI_BASE_ADDRESS_0 + 4 * MSIX_BAR,
    ROM_BAR: PCI_ROM_ADDRESS,
}
# Every BAR register of a type-0 header, implemented or not.
ALL_BAR_REGISTERS: Final = (*range(PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_0 + 24, 4), PCI_ROM_ADDRESS)


# -- helpers


def make_bus(devices: int, presentation: Presentation = Presentation()) -> PciBus:
    """A bus with `devices` test devices at slots 1..devices."""
    bus = PciBus()
    for slot in range(1, devices + 1):
        bus.plug(PciTestDevice(presentation, serial=slot), slot)
    return bus


def testdev(bus: PciBus, slot: int) -> PciTestDevice:
    function = bus.function(slot)
    assert isinstance(function, PciTestDevice)
    return function


def cfg_read(bus: PciBus, slot: int, offset: int, size: int) -> int:
    return bus.config_read(0, slot, 0, offset, size)


def cfg_write(bus: PciBus, slot: int, offset: int, size: int, value: int) -> list[Effect]:
    return bus.config_write(0, slot, 0, offset, size, value)


def set_command(bus: PciBus, slot: int, command: int) -> list[Effect]:
    return cfg_write(bus, slot, PCI_COMMAND, 2, command)


def bar_address_writes(bus: PciBus, slot: int, bar: int, address: int) -> list[tuple[int, int]]:
    """The dword writes (register, value) that give a BAR `address`, as Linux orders them.

    Low dword first, then the high one of a 64-bit BAR; the expansion ROM is
    written with its enable bit set.
    """
    register = BAR_REGISTER[bar]
    if bar == ROM_BAR:
        return [(register, address | PCI_ROM_ADDRESS_ENABLE)]
    writes = [(register, address & 0xFFFF_FFFF)]
    if bus.function(slot).bar_spec(bar).kind is BarKind.MEM64:
        writes.append((register + 4, address >> 32))
    return writes


def program_bar(bus: PciBus, slot: int, bar: int, address: int) -> list[Effect]:
    """Give a BAR `address` (see bar_address_writes); return every write's effects."""
    effects: list[Effect] = []
    for register, value in bar_address_writes(bus, slot, bar, address):
        effects += cfg_write(bus, slot, register, 4, value)
    return effects


def bar_events(effects: list[Effect]) -> list[BarDecodeChanged]:
    return [e for e in effects if isinstance(e, BarDecodeChanged)]


Move = tuple[int, int, AddressRange | None, AddressRange | None]


def moves(effects: list[Effect]) -> list[Move]:
    """The BAR events as (device, bar, old, new): what routing tables see."""
    return [(e.device_id, e.bar, e.old, e.new) for e in bar_events(effects)]


def replay(bus: PciBus, routing: dict[BarKey, AddressRange], effects: list[Effect]) -> None:
    """Apply BAR events to a frontend-style routing table, checking each `old`.

    After every single event the table must hold no two overlapping ranges in
    one space, as a frontend's routing (or KVM's memslots) could not.
    """
    for event in bar_events(effects):
        key = BarKey(event.device_id, event.bar)
        assert routing.get(key) == event.old, f"{event} but routing had {routing.get(key)}"
        if event.new is None:
            del routing[key]
        else:
            routing[key] = event.new
        assert overlapping_pairs(bus, routing) == [], f"overlap after {event}"


def is_io(bus: PciBus, key: BarKey) -> bool:
    return bus.function(key.device_id).bar_spec(key.bar).kind is BarKind.IO


def overlapping_pairs(
    bus: PciBus, ranges: dict[BarKey, AddressRange]
) -> list[tuple[BarKey, BarKey]]:
    """Pairs of BARs in the same address space (IO or memory) whose ranges overlap."""
    keys = sorted(ranges)
    return [
        (a, b)
        for i, a in enumerate(keys)
        for b in keys[i + 1 :]
        if is_io(bus, a) == is_io(bus, b) and ranges[a].overlaps(ranges[b])
    ]


# -- strategies

config_sizes = st.sampled_from((1, 2, 4))


@st.composite
def config_writes(draw: st.DrawFn, limit: int = EXT_CONFIG_SPACE_SIZE) -> tuple[int, int, int]:
    """A naturally aligned config write (offset, size, value) below `limit`."""
    size = draw(config_sizes)
    offset = draw(st.integers(0, limit // size - 1)) * size
    value = draw(st.integers(0, (1 << (8 * size)) - 1))
    return offset, size, value


# Bases chosen so the test devices' BARs (256 B IO; 64 KiB, 4 KiB and 2 KiB
# memory) land on each other often: a 64 KiB BAR at 0xFE000000 covers all the
# smaller ones below 0xFE010000.
INTERESTING_MEM: Final = (0xFE00_0000, 0xFE00_0800, 0xFE00_1000, 0xFE00_8000, 0xFE01_0000)
INTERESTING_IO: Final = (0xC000, 0xC080, 0xC100, 0xFF00)
SPECIAL: Final = (0, 0xFFFF_FFFF, 0xFFFF_F800, 0x0000_0001)

mem_bases = st.sampled_from(INTERESTING_MEM)
io_bases = st.sampled_from(INTERESTING_IO)

bar_values = st.one_of(
    mem_bases,
    mem_bases.map(lambda base: base | PCI_ROM_ADDRESS_ENABLE),
    io_bases,
    st.sampled_from(SPECIAL),
    st.integers(0, 0xFFFF_FFFF),
)
"""Raw values for any BAR register: mostly colliding bases, sizing probes, zero."""

high_dword_values = st.one_of(st.sampled_from((0, 0, 1, 0xFFFF_FFFF)), st.integers(0, 0xFFFF_FFFF))
"""Values for the high half of a 64-bit BAR: mostly below 4 GiB."""

command_values = st.one_of(
    st.sampled_from((0, PCI_COMMAND_IO, PCI_COMMAND_MEMORY, DECODE)),
    st.integers(0, 0xFFFF),
)
