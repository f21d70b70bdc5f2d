"""Capability lists: PM, MSI-X and PCIe from 0x34; DSN in extended space."""

from __future__ import annotations

import pytest

from devserver.devices.testdev import MSIX_BAR, MSIX_VECTORS
from devserver.errors import ConfigError
from devserver.pci.bus import PciBus
from devserver.pci.capabilities import CapabilityList
from devserver.pci.config_space import ConfigSpace
from devserver.pci.function import Presentation
from devserver.pci.regs import (
    CONFIG_SPACE_SIZE,
    EXT_CONFIG_SPACE_SIZE,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_PM,
    PCI_CAPABILITY_LIST,
    PCI_EXP_FLAGS,
    PCI_EXP_TYPE_ENDPOINT,
    PCI_EXT_CAP_ID_DSN,
    PCI_MSIX_FLAGS,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    PCI_PM_CTRL,
)
from tests.strategies import SLOT_A, cfg_read, cfg_write, make_bus


def walk(bus: PciBus, slot: int = SLOT_A) -> dict[int, int]:
    """The standard capability list as {cap id: offset}, checked as Linux walks it."""
    found: dict[int, int] = {}
    seen: set[int] = set()
    at = cfg_read(bus, slot, PCI_CAPABILITY_LIST, 1)
    while at:
        assert at not in seen, f"capability list loops back to {at:#x}"
        assert 0x40 <= at < CONFIG_SPACE_SIZE and at % 4 == 0, f"bad pointer {at:#x}"
        seen.add(at)
        found.setdefault(cfg_read(bus, slot, at, 1), at)
        at = cfg_read(bus, slot, at + 1, 1)
    return found


def test_list_reaches_pm_msix_and_pcie(bus: PciBus) -> None:
    assert list(walk(bus)) == [PCI_CAP_ID_PM, PCI_CAP_ID_MSIX, PCI_CAP_ID_EXP]


def test_list_ends_with_next_zero(bus: PciBus) -> None:
    last = walk(bus)[PCI_CAP_ID_EXP]
    assert cfg_read(bus, SLOT_A, last + 1, 1) == 0


def test_capability_pointer_and_headers_ignore_writes(bus: PciBus) -> None:
    caps = walk(bus)
    cfg_write(bus, SLOT_A, PCI_CAPABILITY_LIST, 1, 0xFF)
    for at in caps.values():
        cfg_write(bus, SLOT_A, at, 2, 0xFFFF)
    assert walk(bus) == caps


def test_pcie_capability_is_version_1_endpoint(bus: PciBus) -> None:
    flags = cfg_read(bus, SLOT_A, walk(bus)[PCI_CAP_ID_EXP] + PCI_EXP_FLAGS, 2)
    assert flags & 0xF == 1
    assert (flags >> 4) & 0xF == PCI_EXP_TYPE_ENDPOINT


def test_pm_capability_power_state_is_writable(bus: PciBus) -> None:
    ctrl = walk(bus)[PCI_CAP_ID_PM] + PCI_PM_CTRL
    cfg_write(bus, SLOT_A, ctrl, 2, 0x0003)  # D3hot
    assert cfg_read(bus, SLOT_A, ctrl, 2) & 0x3 == 0x3


def test_msix_capability_describes_table_and_pba(bus: PciBus) -> None:
    at = walk(bus)[PCI_CAP_ID_MSIX]
    assert cfg_read(bus, SLOT_A, at + PCI_MSIX_FLAGS, 2) == MSIX_VECTORS - 1
    assert cfg_read(bus, SLOT_A, at + PCI_MSIX_TABLE, 4) == 0x000 | MSIX_BAR
    assert cfg_read(bus, SLOT_A, at + PCI_MSIX_PBA, 4) == 0x800 | MSIX_BAR


def test_msix_table_size_is_read_only(bus: PciBus) -> None:
    at = walk(bus)[PCI_CAP_ID_MSIX]
    cfg_write(bus, SLOT_A, at + PCI_MSIX_FLAGS, 2, 0x07FF)
    assert cfg_read(bus, SLOT_A, at + PCI_MSIX_FLAGS, 2) == MSIX_VECTORS - 1


def test_presentation_without_msix_hides_the_capability() -> None:
    bus = make_bus(1, Presentation(msix=False))
    assert list(walk(bus)) == [PCI_CAP_ID_PM, PCI_CAP_ID_EXP]


def test_extended_list_starts_with_dsn_version_1_and_ends(bus: PciBus) -> None:
    header = cfg_read(bus, SLOT_A, 0x100, 4)
    assert header & 0xFFFF == PCI_EXT_CAP_ID_DSN
    assert (header >> 16) & 0xF == 1
    assert header >> 20 == 0  # next: end of list


def test_dsn_carries_the_serial_number(bus: PciBus) -> None:
    # make_bus gives each device its slot as serial number.
    assert cfg_read(bus, SLOT_A, 0x104, 4) == SLOT_A
    assert cfg_read(bus, SLOT_A, 0x108, 4) == 0


def test_config_space_is_4096_bytes(bus: PciBus) -> None:
    assert cfg_read(bus, SLOT_A, EXT_CONFIG_SPACE_SIZE - 4, 4) == 0
    cfg_write(bus, SLOT_A, EXT_CONFIG_SPACE_SIZE - 4, 4, 0xFFFF_FFFF)
    assert cfg_read(bus, SLOT_A, EXT_CONFIG_SPACE_SIZE - 4, 4) == 0


def test_capabilities_that_do_not_fit_raise() -> None:
    caps = CapabilityList(ConfigSpace())
    caps.add(PCI_CAP_ID_PM, 0xB0)
    with pytest.raises(ConfigError):
        caps.add(PCI_CAP_ID_EXP, 0x24)


def test_extended_capabilities_are_chained() -> None:
    cs = ConfigSpace()
    caps = CapabilityList(cs)
    first = caps.add_extended(PCI_EXT_CAP_ID_DSN, 1, 12)
    second = caps.add_extended(0x000B, 1, 8)
    assert cs.get(first, 4) >> 20 == second
    assert cs.get(second, 4) >> 20 == 0
