"""Where guest RAM sits in guest-physical space (pure; no I/O).

The 32-bit PCI hole: the last GiB below 4 GiB holds what must have a 32-bit
address (32-bit BARs, the ECAM window, the IOAPIC at 0xFEC00000, the LAPIC at
0xFEE00000), so RAM stops at 3 GiB and whatever is left of it continues at
4 GiB, as on PCs (kvmtool and Firecracker cut the same way; Firecracker at
3 GiB too). Guest RAM is one file (a memfd); each region is a window of it,
and becomes one KVM memslot and one MemoryRegion for the device server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PCI_HOLE_START: Final = 0xC000_0000
FOUR_GIB: Final = 1 << 32


@dataclass(frozen=True, slots=True)
class RamRegion:
    guest_address: int
    size: int
    offset: int  # in the RAM file

    @property
    def end(self) -> int:
        return self.guest_address + self.size


def ram_regions(size: int, hole_start: int = PCI_HOLE_START) -> tuple[RamRegion, ...]:
    """RAM from 0 up to the hole, the rest from 4 GiB."""
    if size <= 0:
        raise ValueError("guest RAM size must be positive")
    low = min(size, hole_start)
    regions = [RamRegion(0, low, 0)]
    if size > hole_start:
        regions.append(RamRegion(FOUR_GIB, size - hole_start, hole_start))
    return tuple(regions)


def ram_top(size: int, hole_start: int = PCI_HOLE_START) -> int:
    """One past the highest guest-physical RAM address."""
    return ram_regions(size, hole_start)[-1].end


def file_offset(regions: tuple[RamRegion, ...], address: int, length: int) -> int | None:
    """Where [address, address + length) lives in the RAM file; None unless wholly in one region.

    A range that crosses from one region into the hole or the next region is
    refused: the bytes after the cut are not the file's next bytes.
    """
    if address < 0 or length < 0:
        return None
    for r in regions:
        if r.guest_address <= address and address + length <= r.end:
            return r.offset + (address - r.guest_address)
    return None
