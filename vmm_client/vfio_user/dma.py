"""Guest memory from QEMU: vfio-user DMA_MAP/DMA_UNMAP windows and their fds.

`DmaTable` keeps one connection's windows (VFIO type1 rules: page-aligned,
no overlap, no partial unmap), closing each fd on unmap; a window's fd is
mapped into our address space only when the bridge itself must read or
write through it. memory_mirror.py tells the device server about them.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from .fd_passing import close_fds
from .link import DmaError
from .protocol import (
    DMA_MAP_FLAG_WRITE,
    PAGE_SIZE,
    DmaMap,
    ProtocolError,
)

MAX_DMA_MAPS: Final = 65535
_U64: Final = 1 << 64


@dataclass(eq=False)
class DmaRegion:
    address: int
    size: int
    offset: int
    flags: int
    fd: int | None
    file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the fd's file
    _map: mmap.mmap | None = field(default=None, repr=False)
    _delta: int = 0

    @property
    def end(self) -> int:
        return self.address + self.size

    def contains(self, address: int, length: int) -> bool:
        return self.address <= address and address + length <= self.end

    def view(self) -> mmap.mmap:
        """The window mapped into our address space (first use maps it)."""
        if self.fd is None:
            raise DmaError(f"DMA window {self.address:#x} came without an fd")
        if self._map is None:
            aligned = self.offset & ~(PAGE_SIZE - 1)
            self._delta = self.offset - aligned
            prot = mmap.PROT_READ
            if self.flags & DMA_MAP_FLAG_WRITE:
                prot |= mmap.PROT_WRITE
            try:
                self._map = mmap.mmap(
                    self.fd, self.size + self._delta, mmap.MAP_SHARED, prot, offset=aligned
                )
            except (OSError, ValueError) as e:
                raise DmaError(f"cannot map DMA window {self.address:#x}: {e}") from None
        return self._map

    def read(self, address: int, length: int) -> bytes:
        view = self.view()
        at = address - self.address + self._delta
        return bytes(view[at : at + length])

    def write(self, address: int, data: bytes) -> None:
        view = self.view()
        at = address - self.address + self._delta
        view[at : at + len(data)] = data

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd is not None:
            close_fds([self.fd])
            self.fd = None


def close_regions(regions: Iterable[DmaRegion]) -> None:
    for region in regions:
        region.close()


class DmaTable:
    """The guest-memory windows QEMU granted with DMA_MAP (VFIO type1 semantics)."""

    def __init__(self, max_maps: int = MAX_DMA_MAPS) -> None:
        self.max_maps = max_maps
        self.regions: list[DmaRegion] = []  # sorted by address, disjoint

    def add(self, request: DmaMap, fd: int | None) -> DmaRegion:
        """Record a window; the caller keeps the fd only if this returns."""
        if (request.address | request.size) % PAGE_SIZE:
            # We offered pgsizes 4 KiB in VERSION; VFIO's type1 IOMMU refuses the
            # same (EINVAL), and QEMU only maps host-page-aligned sections.
            raise ProtocolError(
                f"DMA_MAP [{request.address:#x} +{request.size:#x}) is not aligned to "
                f"the {PAGE_SIZE}-byte page size"
            )
        for region in self.regions:
            if region.address < request.address + request.size and request.address < region.end:
                raise ProtocolError(
                    f"DMA_MAP [{request.address:#x} +{request.size:#x}) overlaps "
                    f"[{region.address:#x} +{region.size:#x})",
                    errno.EEXIST,
                )
        if len(self.regions) >= self.max_maps:
            raise ProtocolError(f"more than {self.max_maps} DMA windows", errno.ENOSPC)
        file_id = None
        if fd is not None:
            try:
                info = os.fstat(fd)
            except OSError as e:
                raise ProtocolError(f"DMA_MAP fd: {e}") from None
            if not stat.S_ISREG(info.st_mode):
                raise ProtocolError("DMA_MAP fd is not a mappable file (memfd, shm or hugetlbfs)")
            if request.offset + request.size > info.st_size:
                raise ProtocolError(
                    f"DMA_MAP offset {request.offset:#x} + size {request.size:#x} is past the "
                    f"end of its file ({info.st_size:#x} bytes)"
                )
            file_id = (info.st_dev, info.st_ino)
        region = DmaRegion(
            request.address, request.size, request.offset, request.flags, fd, file_id
        )
        bisect.insort(self.regions, region, key=lambda r: r.address)
        return region

    def detach(self, address: int, size: int) -> list[DmaRegion]:
        """Take every window inside [address, address + size) out of the table, still
        open (the caller closes them); a window cut in two is refused (EINVAL), as
        VFIO's type1 IOMMU does."""
        end = address + size
        inside = [r for r in self.regions if address <= r.address and r.end <= end]
        for r in self.regions:
            if r not in inside and r.address < end and address < r.end:
                raise ProtocolError(
                    f"DMA_UNMAP [{address:#x} +{size:#x}) cuts window "
                    f"[{r.address:#x} +{r.size:#x}) in two"
                )
        for r in inside:
            self.regions.remove(r)
        return inside

    def detach_all(self) -> list[DmaRegion]:
        regions, self.regions = self.regions, []
        return regions

    def remove(self, address: int, size: int) -> int:
        """Unmap and close every window inside the range; returns how many."""
        regions = self.detach(address, size)
        close_regions(regions)
        return len(regions)

    def clear(self) -> None:
        close_regions(self.detach_all())

    def find(self, address: int, length: int) -> DmaRegion | None:
        i = bisect.bisect_right(self.regions, address, key=lambda r: r.address) - 1
        if i >= 0 and self.regions[i].contains(address, length):
            return self.regions[i]
        return None

    def pieces(self, address: int, length: int, flag: int) -> list[tuple[DmaRegion, int, int]]:
        """[address, address + length) as (window, address, length) pieces across
        adjacent windows that all permit `flag`; DmaError at a hole (reliability.md C3)."""
        if length <= 0 or not 0 <= address < _U64 or length > _U64 - address:
            raise DmaError(f"[{address:#x} +{length:#x}) is not a guest memory range")
        out = []
        at, end = address, address + length
        while at < end:
            region = self.find(at, 1)
            if region is None:
                raise DmaError(
                    f"[{address:#x} +{length:#x}) is not inside QEMU's DMA windows "
                    f"(nothing mapped at {at:#x})"
                )
            if not region.flags & flag:
                raise DmaError(f"DMA window {region.address:#x} does not permit this access")
            take = min(region.end, end) - at
            out.append((region, at, take))
            at += take
        return out
