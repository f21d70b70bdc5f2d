"""Guest RAM shared by a co-located frontend (MEMORY_MODE_SHARED): the I/O side of
devserver.memory.

The frontend names each RAM region by a file the server can open: a file in
/dev/shm or hugetlbfs, or a memfd reached through /proc/PID/fd/N (how the
vfio-user bridge hands on the memfds QEMU sends with DMA_MAP). Each is opened
here, checked on the opened descriptor (a regular file, at least file_offset +
size bytes long: no TOCTOU between the check and the map) and mapped
MAP_SHARED, so device reads and writes are plain memory copies that the guest
sees at once, as vhost-user and vfio-user servers do. Lookups are by bisection
over the region table and every range is checked as devserver.memory says
(reliability.md C3); table updates are all or nothing (C12).

A frontend that shrinks a mapped file afterwards would make the next access
fault (SIGBUS): memfds sealed with F_SEAL_SHRINK (QEMU's memory-backend-memfd
seals by default) rule that out, and an unsealed region is logged once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from ..effects import AddressRange
from ..errors import MemoryMapError
from ..memory import MAX_REGIONS, MemoryRegion, RegionMemory, plan_update

log = logging.getLogger(__name__)

_warned_unsealed = False


@dataclass(eq=False, slots=True)
class SharedRegion:
    """One mapped region: `delta` is where file_offset falls in the page-aligned map."""

    region: MemoryRegion
    map: mmap.mmap
    delta: int

    @property
    def read_only(self) -> bool:
        return self.region.read_only

    def read_at(self, offset: int, length: int) -> bytes:
        at = self.delta + offset
        return self.map[at : at + length]

    def write_at(self, offset: int, data: bytes) -> None:
        at = self.delta + offset
        self.map[at : at + len(data)] = data

    def discard(self, offset: int, length: int) -> bool:
        """Free the pages of [offset, offset + length) in the file (MADV_REMOVE:
        a hole in the memfd; they read zero and fault back in). False when the
        range is not whole pages of this map, or the file cannot punch holes."""
        at = self.delta + offset
        if self.read_only or at % mmap.PAGESIZE or length % mmap.PAGESIZE or length <= 0:
            return False
        if at + length > len(self.map):
            return False
        try:
            self.map.madvise(mmap.MADV_REMOVE, at, length)
        except OSError:
            return False  # e.g. a file system without hole punching
        return True

    def close(self) -> None:
        self.map.close()


def map_region(region: MemoryRegion, where: str) -> SharedRegion:
    """Open and map one region, or MemoryMapError saying why not."""
    flags = (os.O_RDONLY if region.read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(region.path, flags)
    except OSError as e:
        raise MemoryMapError(
            f"{where}: cannot open {region.path!r} ({e.strerror}); "
            "is the server on this host and allowed to read it?",
            unreachable=True,
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MemoryMapError(f"{where}: {region.path!r} is not a regular file or memfd")
        if region.file_offset + region.size > info.st_size:
            raise MemoryMapError(
                f"{where}: offset {region.file_offset:#x} + size {region.size:#x} is past "
                f"the end of {region.path!r} ({info.st_size:#x} bytes)"
            )
        aligned = region.file_offset - region.file_offset % mmap.ALLOCATIONGRANULARITY
        delta = region.file_offset - aligned
        prot = mmap.PROT_READ if region.read_only else mmap.PROT_READ | mmap.PROT_WRITE
        try:
            mapping = mmap.mmap(fd, delta + region.size, mmap.MAP_SHARED, prot, offset=aligned)
        except (OSError, ValueError, OverflowError) as e:
            raise MemoryMapError(f"{where}: cannot map {region.path!r}: {e}") from None
        _check_sealed(fd, region.path)
        return SharedRegion(region, mapping, delta)
    finally:
        os.close(fd)  # the map holds its own reference


def _check_sealed(fd: int, path: str) -> None:
    global _warned_unsealed
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a memfd: files cannot be sealed
    if not seals & fcntl.F_SEAL_SHRINK and not _warned_unsealed:
        _warned_unsealed = True
        log.warning(
            "guest RAM %r is not sealed against shrinking (F_SEAL_SHRINK): a frontend "
            "that truncates it can crash the server; QEMU's memory-backend-memfd seals "
            "by default",
            path,
        )


class SharedGuestMemory(RegionMemory[SharedRegion]):
    """GuestMemory over the frontend's mapped RAM files; `close()` unmaps them all."""

    def __init__(self, max_regions: int = MAX_REGIONS) -> None:
        super().__init__()
        self.max_regions = max_regions

    def update(
        self,
        add: Sequence[MemoryRegion],
        remove: Sequence[AddressRange] = (),
        *,
        add_name: str = "add",
        remove_name: str = "remove",
    ) -> None:
        """Remove, then add and map; on any error nothing changes (MemoryMapError)."""
        doomed = plan_update(
            self.regions,
            add,
            remove,
            add_name=add_name,
            remove_name=remove_name,
            need_path=True,
            max_regions=self.max_regions,
        )
        mapped: list[SharedRegion] = []
        try:
            for i, region in enumerate(add):
                mapped.append(map_region(region, f"{add_name}[{i}]"))
        except BaseException:
            for m in mapped:
                m.close()
            raise
        for entry in doomed:
            self.regions.remove(entry)
            entry.value.close()
        for m in mapped:
            self.regions.insert(m.region.guest_address, m.region.size, m)

    def discard(self, gpa: int, length: int) -> bool:
        """Free guest RAM pages in the frontend's files (a balloon's inflated
        pages); the range must be RAM (GuestMemoryError) and whole pages. False
        when any piece could not be freed."""
        self.check_ram(gpa, length)
        at, end, freed = gpa, gpa + length, True
        while at < end:  # one step per region: bounded by MAX_REGIONS
            entry = self.regions.find(at)
            if entry is None:  # check_ram said otherwise; the map changed under us
                return False
            take = min(entry.end, end) - at
            freed = entry.value.discard(at - entry.base, take) and freed
            at += take
        return freed

    def close(self) -> None:
        for entry in self.regions:
            self.regions.remove(entry)
            with contextlib.suppress(BufferError):
                entry.value.close()
