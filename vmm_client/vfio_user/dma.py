"""Guest memory from QEMU: vfio-user DMA_MAP/DMA_UNMAP windows and their fds.

`DmaTable` keeps one connection's windows (closing each fd on unmap);
`MemoryMirror` announces RAM windows to the device server once per session
(MemoryMapUpdate), however many device connections map them.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import mmap
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from devserver.effects import AddressRange

from ..client import (
    MemoryRegion,
)
from .irqs import ReceivedFds, close_fds
from .link import DmaError, ServerLink
from .protocol import (
    DMA_MAP_FLAG_WRITE,
    PAGE_SIZE,
    DmaMap,
    Message,
    ProtocolError,
)

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True, order=True)
class _RamKey:
    """A RAM window as the server sees it: same range, same file, same offset."""

    address: int
    size: int
    file_id: tuple[int, int]
    file_offset: int
    writable: bool

    @property
    def end(self) -> int:
        return self.address + self.size


class MemoryMirror:
    """Guest RAM from every connection's DMA_MAP fds, kept in the server's memory map.

    QEMU gives each vfio-user device its own DMA_MAPs of the same guest RAM,
    and the server holds one map per session, so a window is announced once,
    while any connection holds it, and withdrawn when the last lets it go. If
    QEMU remaps (SeaBIOS toggling PAM below 1 MiB) and one connection's new
    window overlaps another's old one, the new one waits until the old one is
    gone: the server never sees overlapping regions.

    A released window's fd is closed only after the update that withdrew it
    (or any earlier update that might still be opening its /proc path) has
    been answered. Updates are serialized and shielded from cancellation, so
    what the mirror believes announced is what the server has.
    """

    def __init__(self, link: ServerLink) -> None:
        self.link = link
        self._held: dict[_RamKey, dict[object, DmaRegion]] = {}
        self._announced: set[_RamKey] = set()
        self._released: list[DmaRegion] = []
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()
        self._seen_fd = False
        self._warned_fdless = False

    @staticmethod
    def _key(region: DmaRegion) -> _RamKey | None:
        if region.fd is None or region.file_id is None:
            return None
        return _RamKey(
            region.address,
            region.size,
            region.file_id,
            region.offset,
            bool(region.flags & DMA_MAP_FLAG_WRITE),
        )

    def hold(self, owner: object, region: DmaRegion) -> None:
        key = self._key(region)
        if key is not None:
            self._seen_fd = True
            self._held.setdefault(key, {})[owner] = region

    def release(self, owner: object, regions: Iterable[DmaRegion]) -> None:
        """`owner` no longer maps `regions`; the mirror closes them after the next sync."""
        for region in regions:
            self._released.append(region)
            key = self._key(region)
            holders = self._held.get(key) if key is not None else None
            if key is None or holders is None or holders.get(owner) is not region:
                continue
            del holders[owner]
            if not holders:
                del self._held[key]

    @property
    def announced(self) -> list[tuple[int, int]]:
        """(address, size) of every window the server has, in order."""
        return sorted((k.address, k.size) for k in self._announced)

    async def sync(self) -> bool:
        """Bring the server's map in line with what is held; False if it refused."""
        task = asyncio.create_task(self._sync(), name="vfio-user memory map update")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def sync_soon(self) -> None:
        """sync() without waiting (from teardown paths that cannot await)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop left: nobody to tell, just let go
            close_regions(self._released)
            self._released = []
            return
        task = asyncio.create_task(self._sync(), name="vfio-user memory map update")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync(self) -> bool:
        async with self._lock:
            # Released before this update is computed: no path of theirs is in
            # it, and every earlier update has been answered (we hold the lock).
            released, self._released = self._released, []
            try:
                return await self._sync_locked()
            finally:
                close_regions(released)

    async def _sync_locked(self) -> bool:
        if self.link.lost is not None:
            return False
        remove = sorted(k for k in self._announced if k not in self._held)
        kept = [k for k in self._announced if k in self._held]
        add: list[_RamKey] = []
        for key in sorted(k for k in self._held if k not in self._announced):
            if any(k.address < key.end and key.address < k.end for k in (*kept, *add)):
                log.debug("RAM window %#x+%#x waits for an overlapping one", key.address, key.size)
                continue
            add.append(key)
        if not add and not remove:
            return True
        regions = []
        for key in add:
            holder = next(iter(self._held[key].values()))
            regions.append(
                MemoryRegion(
                    key.address,
                    key.size,
                    path=f"/proc/{os.getpid()}/fd/{holder.fd}",
                    file_offset=key.file_offset,
                    read_only=not key.writable,
                )
            )
        ok = await self.link.memory_map_update(
            regions, [AddressRange(k.address, k.size) for k in remove]
        )
        if ok:
            self._announced.difference_update(remove)
            self._announced.update(add)
            log.debug("memory map: +%d -%d windows", len(add), len(remove))
        return ok

    def note_fdless(self, request: DmaMap) -> None:
        """A DMA_MAP without an fd: ROM or MMIO, or RAM QEMU cannot share.

        QEMU maps RAM first (from address 0), so a large fd-less window before
        any fd-backed one means RAM without a shareable backend.
        """
        if request.size >= 1 << 20 and not self._seen_fd and not self._warned_fdless:
            self._warned_fdless = True
            log.warning(
                "QEMU mapped %#x bytes at %#x without an fd: if that is guest RAM, the device "
                "server cannot reach it in shared mode; give QEMU "
                "-object memory-backend-memfd,share=on or use --memory-mode messages",
                request.size,
                request.address,
            )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        close_regions(self._released)
        self._released = []


# ---------------------------------------------------------------- the protocol handler


Handler = Callable[[Message, ReceivedFds], Awaitable[bytes | None]]
