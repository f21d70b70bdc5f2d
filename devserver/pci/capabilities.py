"""Capability lists: the standard list from 0x40, the extended list from 0x100.

Also the capabilities every function of ours carries: power management and
PCI Express 1.1 (endpoint) in the standard list, and a device serial number in
the extended list, so `lspci -vv` shows a PCIe device with extended space.
"""

from __future__ import annotations

from ..errors import ConfigError
from .config_space import ConfigSpace
from .regs import (
    CONFIG_SPACE_SIZE,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_PM,
    PCI_CAPABILITY_LIST,
    PCI_EXP_DEVCAP,
    PCI_EXP_DEVCTL,
    PCI_EXP_DEVSTA,
    PCI_EXP_FLAGS,
    PCI_EXP_LNKCAP,
    PCI_EXP_LNKCTL,
    PCI_EXP_LNKSTA,
    PCI_EXP_TYPE_ENDPOINT,
    PCI_EXT_CAP_ID_DSN,
    PCI_PM_CTRL,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
)

_FIRST_CAP = 0x40
_FIRST_EXT_CAP = 0x100


class CapabilityList:
    """Allocates and links capabilities in a function's config space."""

    __slots__ = ("_cs", "_last", "_last_ext", "_next", "_next_ext")

    def __init__(self, cs: ConfigSpace) -> None:
        self._cs = cs
        self._next = _FIRST_CAP
        self._last: int | None = None
        self._next_ext = _FIRST_EXT_CAP
        self._last_ext: int | None = None

    def add(self, cap_id: int, length: int) -> int:
        """Reserve `length` bytes (header included) for a capability; return its offset."""
        offset = self._next
        if offset + length > CONFIG_SPACE_SIZE:
            raise ConfigError("capabilities do not fit in the 256-byte config header")
        self._cs.set(offset, 1, cap_id)
        self._cs.set(offset + 1, 1, 0)
        if self._last is None:
            self._cs.set(PCI_CAPABILITY_LIST, 1, offset)
            self._cs.set(PCI_STATUS, 2, self._cs.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        else:
            self._cs.set(self._last + 1, 1, offset)
        self._last = offset
        self._next = (offset + length + 3) & ~3
        return offset

    def add_extended(self, cap_id: int, version: int, length: int) -> int:
        """Reserve an extended capability at 0x100 or later; the list ends at next = 0."""
        offset = self._next_ext
        if offset + length > self._cs.size:
            raise ConfigError("extended capabilities do not fit in 4 KiB of config space")
        self._cs.set(offset, 4, cap_id | (version << 16))
        if self._last_ext is not None:
            header = self._cs.get(self._last_ext, 4)
            self._cs.set(self._last_ext, 4, (header & 0x000F_FFFF) | (offset << 20))
        self._last_ext = offset
        self._next_ext = (offset + length + 3) & ~3
        return offset


def add_power_management(cs: ConfigSpace, caps: CapabilityList) -> int:
    """PM 1.2 (PCIe requires it): D0/D3hot, NoSoftReset so D3hot keeps state."""
    at = caps.add(PCI_CAP_ID_PM, 8)
    cs.set(at + 2, 2, 0x0003)  # PMC: version 3 (PM 1.2), no PME, no D1/D2
    cs.set(at + PCI_PM_CTRL, 2, 0x0008)  # PMCSR: D0, NoSoftReset
    cs.set_writable(at + PCI_PM_CTRL, 2, 0x0103)  # power state, PME_En
    cs.set_w1c(at + PCI_PM_CTRL, 2, 0x8000)  # PME_Status
    return at


def add_pci_express(cs: ConfigSpace, caps: CapabilityList) -> int:
    """PCI Express capability, version 1 (PCIe 1.1), endpoint, x1 at 2.5 GT/s."""
    at = caps.add(PCI_CAP_ID_EXP, 0x24)
    cs.set(at + PCI_EXP_FLAGS, 2, 0x0001 | (PCI_EXP_TYPE_ENDPOINT << 4))
    cs.set(at + PCI_EXP_DEVCAP, 4, 0x0000_8000)  # role-based error reporting, MPS 128
    # Device control: error reporting, relaxed ordering, max payload, extended
    # tags, no snoop, max read request. Reset value: MRRS 512, RO and NS on.
    cs.set(at + PCI_EXP_DEVCTL, 2, 0x2810)
    cs.set_writable(at + PCI_EXP_DEVCTL, 2, 0x79FF)
    cs.set_w1c(at + PCI_EXP_DEVSTA, 2, 0x000F)
    cs.set(at + PCI_EXP_LNKCAP, 4, 0x0000_0011)  # 2.5 GT/s, x1, port 0
    cs.set_writable(at + PCI_EXP_LNKCTL, 2, 0x00CB)  # ASPM, RCB, common clock, ext synch
    cs.set(at + PCI_EXP_LNKSTA, 2, 0x0011)  # running at 2.5 GT/s, x1
    return at


def add_device_serial_number(cs: ConfigSpace, caps: CapabilityList, serial: int) -> int:
    at = caps.add_extended(PCI_EXT_CAP_ID_DSN, 1, 12)
    cs.set(at + 4, 8, serial & 0xFFFF_FFFF_FFFF_FFFF)
    return at
