"""A device as vfio-user presents it: regions and IRQs from its BARs, and the
bounds every region access is checked against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

from .device_info import DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, DEVICE_INFO_SIZE, DeviceInfo
from .header import PAGE_SIZE, ProtocolError
from .irqs import (
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_SIZE,
    IrqIndex,
    IrqInfo,
)
from .region_info import (
    NUM_REGIONS,
    REGION_CONFIG,
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    REGION_INFO_SIZE,
    REGION_ROM,
    RegionInfo,
)


@dataclass(frozen=True, slots=True)
class BarLayout:
    """One BAR as the device server presents it."""

    index: int  # 0..5, 6 = expansion ROM
    size: int
    is_64bit: bool = False
    # Its bytes are shared memory the client may map: GET_REGION_INFO says
    # MMAP and brings the file descriptor (vfio-user spec, "Region info").
    mmap: bool = False


@dataclass(frozen=True, slots=True)
class DeviceLayout:
    """What DEVICE_GET_INFO, GET_REGION_INFO and GET_IRQ_INFO answer for one device."""

    regions: tuple[RegionInfo, ...]
    irqs: tuple[IrqInfo, ...]

    @classmethod
    def build(
        cls,
        bars: Iterable[BarLayout],
        *,
        interrupt_pin: int,
        msix_vectors: int,
        config_size: int = 4096,
    ) -> Self:
        """Regions 0..5 BARs (a 64-bit BAR's upper index is size 0), 6 ROM,
        7 config space (4 KiB, so ECAM reaches extended capabilities), 8 VGA (none).
        """
        sizes = [0] * NUM_REGIONS
        mappable: set[int] = set()
        for bar in bars:
            if not 0 <= bar.index <= REGION_ROM:
                raise ValueError(f"BAR index {bar.index} is not 0..6")
            if bar.size and bar.size & (bar.size - 1):
                raise ValueError(f"BAR{bar.index} size {bar.size:#x} is not a power of two")
            sizes[bar.index] = bar.size
            if bar.mmap and bar.size:
                if bar.index == REGION_ROM or bar.size % PAGE_SIZE:
                    raise ValueError(f"BAR{bar.index} cannot be mapped (ROM, or not whole pages)")
                mappable.add(bar.index)
        sizes[REGION_CONFIG] = config_size
        regions = []
        for index, size in enumerate(sizes):
            if not size:
                flags = 0
            elif index == REGION_ROM:
                flags = REGION_INFO_FLAG_READ
            else:
                flags = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
            if index in mappable:
                flags |= REGION_INFO_FLAG_MMAP
            regions.append(RegionInfo(REGION_INFO_SIZE, flags, index, 0, size, 0))
        eventfd = IRQ_INFO_EVENTFD
        irqs = (
            IrqInfo(
                IRQ_INFO_SIZE,
                eventfd | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
                IrqIndex.INTX,
                1 if interrupt_pin else 0,
            ),
            IrqInfo(IRQ_INFO_SIZE, eventfd, IrqIndex.MSI, 0),
            # No NORESIZE: QEMU then sends each vector alone as the guest unmasks
            # it, instead of tearing down and re-sending the whole set.
            IrqInfo(IRQ_INFO_SIZE, eventfd, IrqIndex.MSIX, msix_vectors),
            IrqInfo(IRQ_INFO_SIZE, eventfd, IrqIndex.ERR, 1),
            IrqInfo(IRQ_INFO_SIZE, eventfd, IrqIndex.REQ, 1),
        )
        return cls(tuple(regions), irqs)

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(
            DEVICE_INFO_SIZE,
            DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI,
            len(self.regions),
            len(self.irqs),
        )

    def region(self, index: int) -> RegionInfo:
        if not 0 <= index < len(self.regions):
            raise ProtocolError(f"region {index} does not exist (0..{len(self.regions) - 1})")
        return self.regions[index]

    def irq(self, index: int) -> IrqInfo:
        if not 0 <= index < len(self.irqs):
            raise ProtocolError(f"IRQ index {index} does not exist (0..{len(self.irqs) - 1})")
        return self.irqs[index]

    def check_access(self, region: int, offset: int, count: int, *, write: bool) -> None:
        """Raise ProtocolError(EINVAL) unless [offset, offset + count) lies in a region
        that allows the access."""
        info = self.region(region)
        flag = REGION_INFO_FLAG_WRITE if write else REGION_INFO_FLAG_READ
        if not info.flags & flag:
            what = "written" if write else "read"
            raise ProtocolError(f"region {region} (size {info.size:#x}) cannot be {what}")
        if count == 0:
            raise ProtocolError(f"access of 0 bytes to region {region}")
        if offset >= info.size or count > info.size - offset:
            raise ProtocolError(
                f"access [{offset:#x} +{count:#x}) is outside region {region} "
                f"({info.size:#x} bytes)"
            )
