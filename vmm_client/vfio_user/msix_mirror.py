"""QEMU's MSI-X vector masks, mirrored into the device server's MSI-X table.

QEMU emulates the MSI-X table itself and never forwards table accesses
(qemu-vfio-user-msix.md, Q1), while the device server only raises MsiRaised
for vectors unmasked in *its* table. So when QEMU hands us an eventfd for
vector v (it does so when the guest unmasks v), v is unmasked in the
server's table with a posted BarWrite, and masked again when the eventfd is
taken away.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from .device import Device
from .link import ServerLink

_PCI_CAPABILITY_LIST: Final = 0x34
_PCI_CAP_ID_MSIX: Final = 0x11
_PCI_MSIX_TABLE: Final = 4
_PCI_MSIX_ENTRY_SIZE: Final = 16
_PCI_MSIX_ENTRY_VECTOR_CTRL: Final = 12
_MAX_CAPABILITIES: Final = 48  # a capability list has at most 48 entries in 256 bytes


class MsixMirror:
    """Finds one device's MSI-X table once, then writes vector masks into it."""

    def __init__(self, device: Device, link: ServerLink, *, enabled: bool = True) -> None:
        self.device = device
        self.link = link
        self.enabled = enabled

    async def table(self) -> tuple[int, int] | None:
        """(BAR, offset) of the device's MSI-X table, from its capability list."""
        device = self.device
        if device.msix_table_known:
            return device.msix_table
        info = device.info
        values = await self.link.config_read(info, [(_PCI_CAPABILITY_LIST, 1)])
        if values is None:
            return None
        pointer = values[0] & 0xFC
        for _ in range(_MAX_CAPABILITIES):
            if pointer < 0x40:
                break
            header = await self.link.config_read(info, [(pointer, 2)])
            if header is None:
                return None
            if header[0] & 0xFF == _PCI_CAP_ID_MSIX:
                table = await self.link.config_read(info, [(pointer + _PCI_MSIX_TABLE, 4)])
                if table is None:
                    return None
                device.msix_table = (table[0] & 0x7, table[0] & ~0x7)
                break
            pointer = (header[0] >> 8) & 0xFC
        device.msix_table_known = True
        return device.msix_table

    async def mirror(self, vectors: Sequence[int], *, masked: bool) -> None:
        """Mask or unmask `vectors` in the server's table (posted writes)."""
        if not vectors or not self.enabled:
            return
        table = await self.table()
        if table is None:
            return
        bar, offset = table
        self.link.bar_write(
            self.device.info.device_id,
            bar,
            [
                (offset + v * _PCI_MSIX_ENTRY_SIZE + _PCI_MSIX_ENTRY_VECTOR_CTRL, 4, int(masked))
                for v in vectors
            ],
        )
