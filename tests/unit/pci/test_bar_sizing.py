"""BAR sizing: all-ones in, `~(size - 1)` and the type bits out; BarSpec checks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devserver.devices.testdev import ROM_IMAGE, PciTestDevice
from devserver.effects import AddressRange, BarKind, SharedMemory
from devserver.errors import ConfigError
from devserver.pci.bars import BarSpec
from devserver.pci.bus import BarKey, PciBus
from devserver.pci.function import PciFunction, PciIdentity
from devserver.pci.regs import (
    PCI_BASE_ADDRESS_0,
    PCI_COMMAND_MEMORY,
    PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS_ENABLE,
)
from tests.strategies import ROM_BAR, SLOT_A, cfg_read, cfg_write, set_command

ALL_ONES = 0xFFFF_FFFF
ROM_BASE = 0xFEB0_0000


def size_bar(bus: PciBus, register: int, probe: int = ALL_ONES) -> int:
    cfg_write(bus, SLOT_A, register, 4, probe)
    return cfg_read(bus, SLOT_A, register, 4)


# -- the test device's BARs


@pytest.mark.parametrize(
    ("register", "power_on"),
    [
        pytest.param(0x10, 0x1, id="BAR0 io"),
        pytest.param(0x18, 0xC, id="BAR2 mem64 prefetchable"),
        pytest.param(0x1C, 0x0, id="BAR2 high dword"),
        pytest.param(0x20, 0x0, id="BAR4 mem32"),
        pytest.param(PCI_ROM_ADDRESS, 0x0, id="rom"),
    ],
)
def test_bars_power_on_with_only_their_type_bits(bus: PciBus, register: int, power_on: int) -> None:
    assert cfg_read(bus, SLOT_A, register, 4) == power_on


def test_io_bar_sizing_reads_size_mask_and_io_bit(bus: PciBus) -> None:
    assert size_bar(bus, 0x10) == ~(0x100 - 1) & ALL_ONES | 0x1


def test_mem32_bar_sizing_reads_size_mask(bus: PciBus) -> None:
    assert size_bar(bus, 0x20) == ~(0x1000 - 1) & ALL_ONES


def test_mem64_prefetchable_bar_sizing_keeps_type_bits(bus: PciBus) -> None:
    assert size_bar(bus, 0x18) == ~(0x10000 - 1) & ALL_ONES | 0xC


def test_mem64_high_dword_sizing_reads_all_ones(bus: PciBus) -> None:
    # A 64 KiB BAR has every address bit above 4 GiB writable.
    assert size_bar(bus, 0x1C) == ALL_ONES


@pytest.mark.parametrize("register", [0x14, 0x24], ids=["BAR1", "BAR5"])
def test_unimplemented_bar_reads_zero_after_sizing(bus: PciBus, register: int) -> None:
    assert size_bar(bus, register) == 0


def test_sizing_then_restore_gives_back_the_address(bus: PciBus) -> None:
    cfg_write(bus, SLOT_A, 0x20, 4, 0xFE00_0000)
    size_bar(bus, 0x20)
    cfg_write(bus, SLOT_A, 0x20, 4, 0xFE00_0000)
    assert cfg_read(bus, SLOT_A, 0x20, 4) == 0xFE00_0000


def test_bar_low_address_bits_are_hardwired(bus: PciBus) -> None:
    cfg_write(bus, SLOT_A, 0x20, 4, 0xFE00_0FFF)
    assert cfg_read(bus, SLOT_A, 0x20, 4) == 0xFE00_0000


# -- the expansion ROM BAR


def test_rom_sizing_with_linux_mask(bus: PciBus) -> None:
    # Linux probes with PCI_ROM_ADDRESS_MASK, enable bit clear.
    assert size_bar(bus, PCI_ROM_ADDRESS, 0xFFFF_F800) == 0xFFFF_F800


def test_rom_sizing_with_all_ones_keeps_enable_bit(bus: PciBus) -> None:
    assert size_bar(bus, PCI_ROM_ADDRESS) == 0xFFFF_F800 | PCI_ROM_ADDRESS_ENABLE


def test_rom_contents_readable_through_bar(dev: PciTestDevice, bus: PciBus) -> None:
    assert bus.bar_read(SLOT_A, ROM_BAR, 0, 8) == int.from_bytes(ROM_IMAGE[:8], "little")
    assert bus.bar_read(SLOT_A, ROM_BAR, 4, 1) == ROM_IMAGE[4]


def test_rom_reads_zero_past_the_image(bus: PciBus) -> None:
    assert bus.bar_read(SLOT_A, ROM_BAR, len(ROM_IMAGE), 4) == 0
    assert bus.bar_read(SLOT_A, ROM_BAR, 0x7F8, 8) == 0


def test_rom_ignores_writes(bus: PciBus) -> None:
    assert bus.bar_write(SLOT_A, ROM_BAR, 0, 4, 0) == []
    assert bus.bar_read(SLOT_A, ROM_BAR, 0, 4) == int.from_bytes(ROM_IMAGE[:4], "little")


@pytest.mark.parametrize(
    ("rom_enable", "memory", "decodes"),
    [(False, False, False), (True, False, False), (False, True, False), (True, True, True)],
)
def test_rom_decodes_only_with_enable_bit_and_memory_space(
    bus: PciBus, rom_enable: bool, memory: bool, decodes: bool
) -> None:
    cfg_write(bus, SLOT_A, PCI_ROM_ADDRESS, 4, ROM_BASE | int(rom_enable))
    set_command(bus, SLOT_A, PCI_COMMAND_MEMORY if memory else 0)
    expected = {BarKey(SLOT_A, ROM_BAR): AddressRange(ROM_BASE, 0x800)} if decodes else {}
    assert bus.decoding() == expected


# -- BarSpec validation


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"index": 0, "kind": BarKind.MEM32, "size": 0x3000}, id="not power of two"),
        pytest.param({"index": 0, "kind": BarKind.MEM32, "size": 0}, id="zero size"),
        pytest.param({"index": 0, "kind": BarKind.IO, "size": 2}, id="io too small"),
        pytest.param({"index": 0, "kind": BarKind.IO, "size": 512}, id="io too large"),
        pytest.param({"index": 0, "kind": BarKind.MEM32, "size": 8}, id="mem too small"),
        pytest.param({"index": 0, "kind": BarKind.MEM32, "size": 1 << 32}, id="mem32 too large"),
        pytest.param({"index": 6, "kind": BarKind.ROM, "size": 1024}, id="rom too small"),
        pytest.param({"index": 6, "kind": BarKind.ROM, "size": 1 << 25}, id="rom too large"),
        pytest.param({"index": 5, "kind": BarKind.MEM64, "size": 0x1000}, id="BAR5 64-bit"),
        pytest.param(
            {"index": 0, "kind": BarKind.IO, "size": 16, "prefetchable": True},
            id="prefetchable io",
        ),
        pytest.param(
            {"index": 6, "kind": BarKind.ROM, "size": 2048, "prefetchable": True},
            id="prefetchable rom",
        ),
        pytest.param({"index": 0, "kind": BarKind.ROM, "size": 2048}, id="rom at index 0"),
        pytest.param({"index": 6, "kind": BarKind.MEM32, "size": 16}, id="memory at index 6"),
        pytest.param(
            {
                "index": 0,
                "kind": BarKind.MEM32,
                "size": 0x1000,
                "backing": SharedMemory("/dev/shm/fb", 0, 0x2000),
            },
            id="backing size mismatch",
        ),
    ],
)
def test_barspec_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        BarSpec(**kwargs)


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        (BarKind.IO, 4),
        (BarKind.IO, 256),
        (BarKind.MEM32, 16),
        (BarKind.MEM32, 1 << 31),
        (BarKind.MEM64, 1 << 63),
    ],
)
def test_barspec_accepts_size_limits(kind: BarKind, size: int) -> None:
    assert BarSpec(0, kind, size).size == size


def test_function_rejects_two_bars_on_one_register() -> None:
    # BAR0 64-bit takes register 0x14, where BAR1 also lives.
    with pytest.raises(ConfigError):
        make_function([BarSpec(0, BarKind.MEM64, 0x1000), BarSpec(1, BarKind.MEM32, 0x1000)])


def make_function(bars: list[BarSpec]) -> PciFunction:
    return PciFunction(PciIdentity(vendor_id=0x1AF4, device_id=1, class_code=0), bars)


# -- any legal BAR sizes as the spec says


@st.composite
def bar_specs(draw: st.DrawFn) -> BarSpec:
    kind = draw(st.sampled_from(BarKind))
    low, high = {
        BarKind.IO: (2, 8),
        BarKind.MEM32: (4, 31),
        BarKind.MEM64: (4, 63),
        BarKind.ROM: (11, 24),
    }[kind]
    size = 1 << draw(st.integers(low, high))
    prefetchable = kind.is_memory and kind is not BarKind.ROM and draw(st.booleans())
    index = ROM_BAR if kind is BarKind.ROM else draw(st.integers(0, 4))
    return BarSpec(index, kind, size, prefetchable)


@given(bar_specs())
def test_sizing_reads_back_complement_of_size_with_type_bits(spec: BarSpec) -> None:
    function = make_function([spec])
    function.config_write(spec.register, 4, ALL_ONES)
    low = function.config_read(spec.register, 4)
    if spec.kind is BarKind.ROM:
        assert low == ~(spec.size - 1) & 0xFFFF_F800 | PCI_ROM_ADDRESS_ENABLE
    elif spec.kind is BarKind.IO:
        assert low == ~(spec.size - 1) & 0xFFFF_FFFC | 0x1
    else:
        assert low == ~(spec.size - 1) & 0xFFFF_FFF0 | spec.type_bits
    if spec.kind is BarKind.MEM64:
        function.config_write(spec.register + 4, 4, ALL_ONES)
        high = function.config_read(spec.register + 4, 4)
        assert (high << 32 | low & ~0xF) == ~(spec.size - 1) & (1 << 64) - 1


@given(bar_specs())
def test_other_bar_registers_stay_zero(spec: BarSpec) -> None:
    function = make_function([spec])
    taken = {spec.register, spec.register + 4 if spec.kind is BarKind.MEM64 else -1}
    for register in (*range(PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_0 + 24, 4), PCI_ROM_ADDRESS):
        if register not in taken:
            function.config_write(register, 4, ALL_ONES)
            assert function.config_read(register, 4) == 0
