"""Guest RAM QEMU grants with DMA_MAP, kept in the device server's memory map.

Guest memory for device DMA, two modes (`memory_mode`):
  * "shared" (the default when the device server is on this host): guest RAM
    QEMU sends as fds with DMA_MAP (memory-backend-memfd,share=on) is
    announced to the server with MemoryMapUpdate(add) as /proc/<our
    pid>/fd/<n>, which the server opens and maps itself, and withdrawn with
    MemoryMapUpdate(remove) on DMA_UNMAP before the fd is closed. Maps without
    an fd (ROM, MMIO, the VGA window) are not RAM and are not announced. Every
    device connection gets the same DMA_MAPs while the server keeps one map
    per session, so MemoryMirror announces each window once and withdraws it
    when its last connection unmaps it. The server then reads and writes guest
    RAM directly: no message per transfer.
  * "messages": Hello says MEMORY_MODE_DMA_MESSAGES and the server sends a
    DmaRequest event per transfer; the bridge serves it through its own mmap
    of QEMU's memfd when it has one, else with vfio-user DMA_READ/DMA_WRITE to
    QEMU (data at payload offset 16, as the spec and QEMU 11.1 on the wire
    have it; `dma_layout="u32-count"` for a QEMU whose VFIOUserDMARW still has
    a u32 count, see protocol.DMA_DATA_OFFSET_SPEC), and answers with a
    DmaReply. Replies may come in any order; nothing waits for one on the
    access path.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from devserver.effects import AddressRange

from ..client import MemoryRegion
from .dma import DmaRegion, close_regions
from .link import ServerLink
from .protocol import DMA_MAP_FLAG_WRITE, DmaMap

log = logging.getLogger(__name__)


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
