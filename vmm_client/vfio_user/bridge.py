"""The vfio-user bridge: stock QEMU as a frontend of the device server.

QEMU 10.1+ drives a PCI function it does not emulate through `-device
vfio-user-pci,socket=PATH`: it speaks the client side of the vfio-user
protocol (QEMU docs/interop/vfio-user.rst) over a UNIX socket. This module
is the server side of that protocol for every device the device server
presents, and forwards each config-space and BAR access onto one gRPC
Attach stream (vmm_client.client.AsyncSession) shared by all the devices of
the VM, so accesses of different devices stay in one order, as on a bus.

    guest --MMIO/config--> QEMU --vfio-user--> Connection --gRPC--> devserver
    guest <----IRQ------- QEMU <--eventfd---- IrqTable <--events--

What the bridge answers itself (qemu-vfio-user.md §3 lists the wire facts):
  * VERSION 0.0 with a NUL-terminated JSON capabilities object;
  * DEVICE_GET_INFO / GET_REGION_INFO / GET_IRQ_INFO from the topology
    (protocol.DeviceLayout);
  * DMA_MAP / DMA_UNMAP: a table of guest-memory windows, with the fd QEMU
    sends for each map (a fresh dup every time: we close it on unmap and on
    disconnect), mapped lazily by the DMA helpers;
  * DEVICE_SET_IRQS: eventfds per (IRQ index, vector), with INTx's level and
    auto-mask semantics, and per-vector mask/pending for the others.

What it forwards: region 7 (config space) as ConfigRead/ConfigWrite at the
device's bus/device/function, regions 0..6 as BarRead/BarWrite, split into
naturally aligned pieces the server accepts; posted REGION_WRITEs (NO_REPLY)
become posted BarWrites; DEVICE_RESET becomes ResetDevice.

MSI-X: QEMU emulates the MSI-X table itself and never forwards table
accesses (qemu-vfio-user-msix.md, Q1), while the device server only raises
MsiRaised for vectors unmasked in *its* table. So when QEMU hands us an
eventfd for vector v (it does so when the guest unmasks v), the bridge
unmasks v in the server's table with a posted BarWrite, and masks it again
when the eventfd is taken away. MsiRaised(v) then writes v's eventfd.

I/O design: one asyncio loop, non-blocking sockets. Each connection has a
reader task (recvmsg with SCM_RIGHTS via loop.add_reader; asyncio has no
sock_recvmsg) that frames messages and routes replies to our own DMA
requests at once, and a worker task that handles requests strictly in order
(the spec requires in-order processing, and QEMU relies on it for posted
writes). A reader thread would cost a cross-thread hop on every access and
still need the loop for gRPC; grpc.aio must live on one loop anyway.

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

If the device server goes away, reads return all-ones (a master abort),
writes are dropped, and that is logged once; no access waits longer than
`access_timeout` (below QEMU's 5 s x-msg-timeout), so no vCPU hangs.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import contextlib
import errno
import json
import logging
import mmap
import os
import re
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from devmodel.v1 import devmodel_pb2 as pb
from devserver.effects import AddressRange, DeviceNeedsReset, Effect, IntxChanged, MsiRaised
from devserver.service.server import prepare_socket_dir

from ..client import (
    AsyncSession,
    ClientError,
    FrontendOptions,
    MemoryRegion,
    TlsClientFiles,
    open_channel,
)
from .protocol import (
    DEFAULT_MAX_DATA_XFER,
    DMA_DATA_OFFSET_SPEC,
    DMA_DATA_OFFSET_U32_COUNT,
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    PAGE_SIZE,
    REGION_CONFIG,
    VERSION_MAJOR,
    VERSION_MINOR,
    BarLayout,
    Capabilities,
    Command,
    DeviceInfo,
    DeviceLayout,
    DmaAccess,
    DmaMap,
    DmaUnmap,
    Framer,
    FramingError,
    IrqIndex,
    IrqInfo,
    IrqSet,
    Message,
    ProtocolError,
    RegionAccess,
    RegionInfo,
    Version,
    WriteMulti,
    all_ones,
    encode_error,
    encode_message,
    encode_reply,
    split_access,
)

log = logging.getLogger(__name__)

ACCESS_TIMEOUT: Final = 4.0  # below QEMU's x-msg-timeout (5 s): all-ones beats a vCPU error
DMA_TIMEOUT: Final = 5.0
MAX_MSG_FDS: Final = 8  # offered in VERSION; QEMU sends MSI-X eventfds in chunks of this
MAX_DMA_MAPS: Final = 65535
RECV_SIZE: Final = 64 * 1024  # reused for every receive; a 1 MiB write takes 16
# Room for more descriptors than we allow, so a peer that sends too many is
# caught and refused rather than silently truncated by the kernel.
_ANCILLARY_SIZE: Final = socket.CMSG_SPACE(64 * array.array("i").itemsize)
QUEUE_DEPTH: Final = 256  # requests read ahead of the worker; back-pressure beyond
_EVENTFD_ONE: Final = (1).to_bytes(8, "little")
_SAFE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes with the NUL

# PCI config registers the bridge reads itself (to find the MSI-X table).
_PCI_STATUS: Final = 0x06
_PCI_CAPABILITY_LIST: Final = 0x34
_PCI_CAP_ID_MSIX: Final = 0x11
_PCI_MSIX_TABLE: Final = 4
_PCI_MSIX_ENTRY_SIZE: Final = 16
_PCI_MSIX_ENTRY_VECTOR_CTRL: Final = 12
_U64: Final = 1 << 64

MemoryMode = Literal["shared", "messages"]
MEMORY_MODES: Final = ("auto", "shared", "messages")
DmaLayout = Literal["spec", "u32-count"]
DMA_LAYOUTS: Final[dict[str, int]] = {
    "spec": DMA_DATA_OFFSET_SPEC,
    "u32-count": DMA_DATA_OFFSET_U32_COUNT,
}


def resolve_memory_mode(mode: str, devserver_target: str) -> MemoryMode:
    """`auto` is shared RAM when the device server listens on a UNIX socket (so it
    is on this host and can open /proc/<pid>/fd paths), DMA messages otherwise."""
    if mode == "shared" or (mode == "auto" and devserver_target.startswith("unix:")):
        return "shared"
    if mode in ("auto", "messages"):
        return "messages"
    raise ValueError(f"memory mode {mode!r} is not one of {', '.join(MEMORY_MODES)}")


class DmaError(Exception):
    """A DMA request the bridge cannot carry out (unmapped, not permitted, client error)."""


class SessionLike(Protocol):
    """What the bridge needs of vmm_client.client.AsyncSession (tests pass a fake)."""

    topology: pb.Topology

    async def config_read(
        self, bus: int, device: int, function: int, offset: int, size: int
    ) -> int: ...

    async def config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> list[Effect]: ...

    async def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int: ...

    def bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None: ...

    async def reset_device(self, device_id: int) -> list[Effect]: ...

    async def flush(self) -> None: ...

    def dma_reply(self, request_id: int, data: bytes = b"", error: str = "") -> None: ...

    async def memory_map_update(
        self, add: Sequence[MemoryRegion] = (), remove: Sequence[AddressRange] = ()
    ) -> None: ...


# ---------------------------------------------------------------- the device server side


class ServerLink:
    """Accesses to the device server with the bridge's failure policy.

    A closed session (ClientError) is final: from then on reads are all-ones
    and writes are dropped without asking it again. A timeout is not: the
    access fails like a master abort, and the next one tries again. Either is
    logged once, so a dead server does not flood the log at guest speed.
    """

    def __init__(self, session: SessionLike, timeout: float = ACCESS_TIMEOUT) -> None:
        self.session = session
        self.timeout = timeout
        self.lost: str | None = None
        self._timeouts_logged = False

    def _lose(self, error: ClientError) -> None:
        if self.lost is None:
            self.lost = str(error)
            log.error(
                "device server unreachable (%s): reads now return all-ones and writes are "
                "dropped until the bridge is restarted",
                error,
            )

    def _timed_out(self, what: str) -> None:
        if not self._timeouts_logged:
            self._timeouts_logged = True
            log.error(
                "device server gave no reply to %s within %.1f s; answering all-ones "
                "(further timeouts are logged at debug level)",
                what,
                self.timeout,
            )
        else:
            log.debug("device server timeout: %s", what)

    async def _gather(
        self, what: str, calls: Sequence[Callable[[], Awaitable[int]]]
    ) -> list[int] | None:
        """Run the calls as one pipelined batch (one stream message); None if it failed."""
        if self.lost is not None:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                if len(calls) == 1:
                    return [await calls[0]()]
                results = await asyncio.gather(*(c() for c in calls), return_exceptions=True)
        except ClientError as e:
            self._lose(e)
            return None
        except TimeoutError:
            self._timed_out(what)
            return None
        values = []
        for result in results:
            if isinstance(result, ClientError):
                self._lose(result)
                return None
            if isinstance(result, BaseException):
                raise result
            values.append(result)
        return values

    async def config_read(
        self, info: pb.DeviceInfo, pieces: Sequence[tuple[int, int]]
    ) -> list[int] | None:
        s = self.session

        def call(offset: int, size: int) -> Callable[[], Awaitable[int]]:
            return lambda: s.config_read(info.bus, info.device, info.function, offset, size)

        return await self._gather(f"a config read of {info.name}", [call(o, n) for o, n in pieces])

    async def config_write(
        self, info: pb.DeviceInfo, pieces: Sequence[tuple[int, int, int]]
    ) -> bool:
        s = self.session

        def call(offset: int, size: int, value: int) -> Callable[[], Awaitable[int]]:
            async def write() -> int:
                await s.config_write(info.bus, info.device, info.function, offset, size, value)
                return 0

            return write

        done = await self._gather(
            f"a config write of {info.name}", [call(o, n, v) for o, n, v in pieces]
        )
        return done is not None

    async def bar_read(
        self, device_id: int, bar: int, pieces: Sequence[tuple[int, int]]
    ) -> list[int] | None:
        s = self.session

        def call(offset: int, size: int) -> Callable[[], Awaitable[int]]:
            return lambda: s.bar_read(device_id, bar, offset, size)

        return await self._gather(
            f"a BAR{bar} read of device {device_id}", [call(o, n) for o, n in pieces]
        )

    def bar_write(self, device_id: int, bar: int, pieces: Iterable[tuple[int, int, int]]) -> bool:
        """Posted: queued on the stream in order, never answered."""
        if self.lost is not None:
            return False
        try:
            for offset, size, value in pieces:
                self.session.bar_write(device_id, bar, offset, size, value)
        except ClientError as e:
            self._lose(e)
            return False
        return True

    async def flush(self) -> None:
        if self.lost is not None:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self.session.flush()
        except TimeoutError:
            self._timed_out("a flush of posted writes")

    async def reset(self, info: pb.DeviceInfo) -> bool:
        async def call() -> int:
            await self.session.reset_device(info.device_id)
            return 0

        return await self._gather(f"a reset of {info.name}", [call]) is not None

    async def memory_map_update(
        self, add: Sequence[MemoryRegion], remove: Sequence[AddressRange]
    ) -> bool:
        """Change the server's memory map; False if it did not take the change.

        Unlike an access, a map update that timed out leaves the server's map
        unknown (it may still apply it), so a timeout is final here too.
        """
        if self.lost is not None:
            return False
        try:
            async with asyncio.timeout(self.timeout):
                await self.session.memory_map_update(add, remove)
        except ClientError as e:
            self._lose(e)
            return False
        except TimeoutError:
            self._lose(ClientError(f"no reply to a memory map update within {self.timeout} s"))
            return False
        return True


# ---------------------------------------------------------------- per-device state


@dataclass(eq=False)
class Device:
    """One device of the topology: its layout, its socket, its current connection."""

    info: pb.DeviceInfo
    layout: DeviceLayout
    socket_path: Path
    intx_level: bool = False  # the line as the server last reported it
    msix_table: tuple[int, int] | None = None  # (BAR, offset), found on first use
    msix_table_known: bool = False
    handler: DeviceHandler | None = None

    @property
    def name(self) -> str:
        return self.info.name


def device_layout(info: pb.DeviceInfo) -> DeviceLayout:
    bars = [
        BarLayout(bar.index, bar.size, bar.kind == pb.BAR_KIND_MEM64)
        for bar in info.bars
        if 0 <= bar.index <= 6
    ]
    return DeviceLayout.build(
        bars, interrupt_pin=info.interrupt_pin, msix_vectors=info.msix_vectors
    )


def socket_name(info: pb.DeviceInfo) -> str:
    """A file name for the device's socket: its name when that is safe as one."""
    if _SAFE_NAME.fullmatch(info.name):
        return f"{info.name}.sock"
    return f"device{info.device_id}.sock"


# ---------------------------------------------------------------- descriptors


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def is_eventfd(fd: int) -> bool:
    """Only eventfds may become interrupts: a pipe could block our writes."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def signal_eventfd(fd: int) -> None:
    try:
        os.write(fd, _EVENTFD_ONE)
    except BlockingIOError:
        pass  # the counter is saturated: the interrupt is pending anyway
    except OSError as e:
        log.debug("eventfd %d: %s", fd, e)


class _Fds:
    """The descriptors of one message: handlers take the ones they keep; the rest close."""

    __slots__ = ("fds", "taken")

    def __init__(self, fds: Sequence[int]) -> None:
        self.fds = list(fds)
        self.taken: set[int] = set()

    def __len__(self) -> int:
        return len(self.fds)

    def take(self, i: int) -> int:
        self.taken.add(i)
        return self.fds[i]

    def close_rest(self) -> None:
        close_fds(fd for i, fd in enumerate(self.fds) if i not in self.taken)
        self.taken = set(range(len(self.fds)))


# ---------------------------------------------------------------- interrupts


@dataclass(slots=True)
class _Vector:
    fd: int | None = None
    masked: bool = False
    pending: bool = False


class IrqTable:
    """Eventfds per (IRQ index, vector) with mask and pending state.

    INTx is level-triggered and auto-masked (IRQ_INFO_AUTOMASKED): signalling
    it masks it, and the client's UNMASK (QEMU's EOI emulation) re-signals if
    the line is still asserted. The other indexes are edge-like: a vector
    raised while masked, or while it has no eventfd, is pending and delivered
    when it is unmasked or gets one (QEMU assigns an MSI-X eventfd only when
    the guest unmasks the vector).
    """

    def __init__(self) -> None:
        self._vectors: dict[tuple[int, int], _Vector] = {}
        self.intx_unmask_fd: int | None = None  # a resample eventfd (KVM irqfd route)

    def vector(self, index: int, vector: int) -> _Vector:
        key = (index, vector)
        entry = self._vectors.get(key)
        if entry is None:
            entry = self._vectors[key] = _Vector()
        return entry

    def fds(self) -> list[int]:
        out = [v.fd for v in self._vectors.values() if v.fd is not None]
        if self.intx_unmask_fd is not None:
            out.append(self.intx_unmask_fd)
        return out

    def assigned(self, index: int) -> list[int]:
        return sorted(v for (i, v), e in self._vectors.items() if i == index and e.fd is not None)

    def assign(self, index: int, vector: int, fd: int | None, *, level: bool = False) -> None:
        entry = self.vector(index, vector)
        if entry.fd is not None and entry.fd != fd:
            close_fds([entry.fd])
        entry.fd = fd
        if fd is None:
            return
        if index == IrqIndex.INTX:
            entry.masked = False
            if level:
                self.fire_intx(level=True)
        elif entry.pending and not entry.masked:
            entry.pending = False
            signal_eventfd(fd)

    def disable(self, index: int) -> list[int]:
        """Close every eventfd of the index; returns the vectors that had one."""
        vectors = []
        for (i, v), entry in list(self._vectors.items()):
            if i != index:
                continue
            if entry.fd is not None:
                close_fds([entry.fd])
                vectors.append(v)
            del self._vectors[(i, v)]
        return sorted(vectors)

    def fire(self, index: int, vector: int) -> None:
        """An edge on a non-INTx vector."""
        entry = self.vector(index, vector)
        if entry.fd is None or entry.masked:
            entry.pending = True
        else:
            signal_eventfd(entry.fd)

    def fire_intx(self, *, level: bool) -> None:
        """The INTx line is (still) asserted: signal once, then stay masked until UNMASK."""
        entry = self.vector(IrqIndex.INTX, 0)
        if level and entry.fd is not None and not entry.masked:
            entry.masked = True
            signal_eventfd(entry.fd)

    def mask(self, index: int, vector: int) -> None:
        self.vector(index, vector).masked = True

    def unmask(self, index: int, vector: int, *, level: bool = False) -> None:
        entry = self.vector(index, vector)
        entry.masked = False
        if index == IrqIndex.INTX:
            self.fire_intx(level=level)
        elif entry.pending and entry.fd is not None:
            entry.pending = False
            signal_eventfd(entry.fd)

    def close(self) -> None:
        close_fds(self.fds())
        self._vectors.clear()
        self.intx_unmask_fd = None


# ---------------------------------------------------------------- DMA windows


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


Handler = Callable[[Message, _Fds], Awaitable[bytes | None]]


class DeviceHandler:
    """The server side of one vfio-user connection, without the socket.

    `handle(message)` returns the reply to send (None for NO_REPLY commands);
    `handle_reply(message)` takes replies to the DMA requests we sent with
    `send`. It owns the connection's eventfds and DMA windows: `close()`
    releases them all (on disconnect, as the spec asks).
    """

    def __init__(
        self,
        device: Device,
        link: ServerLink,
        send: Callable[[bytes], Awaitable[None]],
        *,
        mirror_msix_mask: bool = True,
        dma_timeout: float = DMA_TIMEOUT,
        memory: MemoryMirror | None = None,
        dma_data_offset: int = DMA_DATA_OFFSET_SPEC,
    ) -> None:
        self.device = device
        self.link = link
        self.send = send
        self.mirror_msix_mask = mirror_msix_mask
        self.dma_timeout = dma_timeout
        self.memory = memory  # shared mode: RAM windows go to the server
        self.dma_data_offset = dma_data_offset  # DMA_READ/DMA_WRITE layout
        self.irqs = IrqTable()
        self.dma = DmaTable()
        self.client: Capabilities | None = None  # set by VERSION
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._handlers: dict[int, Handler] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.DEVICE_GET_REGION_IO_FDS: self._region_io_fds,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._reset,
            Command.REGION_WRITE_MULTI: self._write_multi,
        }

    @property
    def info(self) -> pb.DeviceInfo:
        return self.device.info

    # -- dispatch

    async def handle(self, message: Message) -> bytes | None:
        header = message.header
        fds = _Fds(message.fds)
        try:
            if not header.is_command:
                raise ProtocolError(f"message type {header.flags & 0xF} is not a command")
            handler = self._handlers.get(header.command)
            if handler is None:
                raise ProtocolError(f"{header.command_name()} is not supported", errno.ENOSYS)
            if self.client is None and header.command != Command.VERSION:
                raise ProtocolError(f"{header.command_name()} before VERSION")
            return await handler(message, fds)
        except ProtocolError as e:
            log.warning(
                "%s: %s id=%d refused: %s",
                self.device.name,
                header.command_name(),
                header.msg_id,
                e,
            )
            return None if header.no_reply else encode_error(header, e.errno)
        except Exception:
            log.exception(
                "%s: %s id=%d failed", self.device.name, header.command_name(), header.msg_id
            )
            return None if header.no_reply else encode_error(header, errno.EIO)
        finally:
            fds.close_rest()

    @staticmethod
    def _no_fds(fds: _Fds, what: str) -> None:
        if len(fds):
            raise ProtocolError(f"{what} carries {len(fds)} file descriptors; it takes none")

    @staticmethod
    def _reply(message: Message, payload: bytes = b"") -> bytes | None:
        return None if message.header.no_reply else encode_reply(message.header, payload)

    # -- negotiation and information

    async def _version(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "VERSION")
        if self.client is not None:
            raise ProtocolError("VERSION was already negotiated")
        proposal = Version.decode(message.payload)
        if proposal.major != VERSION_MAJOR:
            raise ProtocolError(
                f"client proposes vfio-user {proposal.major}.{proposal.minor}; "
                f"this server speaks {VERSION_MAJOR}.{VERSION_MINOR}",
                errno.ENOTSUP,
            )
        self.client = proposal.capabilities or Capabilities()
        ours = Capabilities(
            max_msg_fds=MAX_MSG_FDS,
            max_data_xfer_size=DEFAULT_MAX_DATA_XFER,
            max_dma_maps=MAX_DMA_MAPS,
            pgsizes=PAGE_SIZE,
        )
        # QEMU takes a reply no larger than its request (proxy.c "reply larger than
        # recv buffer"); our capabilities are shorter than the ones it proposes.
        reply = Version(VERSION_MAJOR, min(proposal.minor, VERSION_MINOR), ours)
        log.info(
            "%s: client speaks vfio-user %d.%d, %s",
            self.device.name,
            proposal.major,
            proposal.minor,
            json.dumps(self.client.to_json()),
        )
        return self._reply(message, reply.encode())

    async def _get_info(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "DEVICE_GET_INFO")
        DeviceInfo.decode(message.payload)
        return self._reply(message, self.device.layout.device_info().encode())

    async def _region_info(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "DEVICE_GET_REGION_INFO")
        request = RegionInfo.decode(message.payload)
        return self._reply(message, self.device.layout.region(request.index).encode())

    async def _region_io_fds(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "DEVICE_GET_REGION_IO_FDS")
        raise ProtocolError("no region has ioeventfd offload", errno.ENOTSUP)

    async def _irq_info(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "DEVICE_GET_IRQ_INFO")
        request = IrqInfo.decode(message.payload)
        return self._reply(message, self.device.layout.irq(request.index).encode())

    # -- DMA windows

    async def _dma_map(self, message: Message, fds: _Fds) -> bytes | None:
        request = DmaMap.decode(message.payload)
        if len(fds) > 1:
            raise ProtocolError(f"DMA_MAP carries {len(fds)} file descriptors; at most 1")
        fd = fds.fds[0] if len(fds) else None
        region = self.dma.add(request, fd)
        if fd is not None:
            fds.take(0)  # the window owns it now; closed on unmap or disconnect
        if self.memory is not None:
            if fd is None:
                self.memory.note_fdless(request)
            else:
                # The reply waits for the server: once QEMU hears the map is
                # done, the guest may program DMA into it.
                self.memory.hold(self, region)
                if not await self.memory.sync():
                    # Our own table took the window, and QEMU treats a failed
                    # DMA_MAP as fatal: answer it, DMA there will fail instead.
                    log.warning(
                        "%s: the device server did not take RAM window %#x+%#x",
                        self.device.name,
                        request.address,
                        request.size,
                    )
        return self._reply(message)

    async def _dma_unmap(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "DMA_UNMAP")
        request = DmaUnmap.decode(message.payload)
        if request.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise ProtocolError("dirty page tracking is not supported", errno.ENOTSUP)
        if request.flags & DMA_UNMAP_FLAG_ALL:
            regions = self.dma.detach_all()
        else:
            regions = self.dma.detach(request.address, request.size)
        if self.memory is None:
            close_regions(regions)
        else:
            # Withdrawn from the server before the fds close (the mirror closes
            # them once the update is answered).
            self.memory.release(self, regions)
            await self.memory.sync()
        # The spec (and QEMU 11.1 on the wire): the reply echoes the request.
        return self._reply(message, message.payload)

    # -- interrupts

    async def _set_irqs(self, message: Message, fds: _Fds) -> bytes | None:
        request = IrqSet.decode(message.payload)
        info = self.device.layout.irq(request.index)
        index = request.index
        if len(fds) and request.data_type != IRQ_SET_DATA_EVENTFD:
            raise ProtocolError("DEVICE_SET_IRQS carries descriptors without DATA_EVENTFD")
        if request.disables_all:
            if request.action == IRQ_SET_ACTION_TRIGGER:
                vectors = self.irqs.disable(index)
                if index == IrqIndex.INTX:
                    self._set_intx_unmask_fd(None)
                if index == IrqIndex.MSIX:
                    await self._mirror_msix(vectors, masked=True)
            return self._reply(message)
        if request.start + request.count > info.count:
            raise ProtocolError(
                f"vectors {request.start}..{request.start + request.count - 1} of IRQ index "
                f"{index} do not exist (it has {info.count})"
            )
        if request.data_type == IRQ_SET_DATA_EVENTFD:
            if len(fds) not in (0, request.count):
                raise ProtocolError(
                    f"DEVICE_SET_IRQS for {request.count} vectors carries {len(fds)} eventfds"
                )
            if not all(is_eventfd(fd) for fd in fds.fds):
                raise ProtocolError("DEVICE_SET_IRQS descriptors must be eventfds")
            if request.action == IRQ_SET_ACTION_TRIGGER:
                assigned: list[int] = []
                removed: list[int] = []
                for i in range(request.count):
                    vector = request.start + i
                    fd = fds.take(i) if len(fds) else None
                    self.irqs.assign(index, vector, fd, level=self.device.intx_level)
                    (assigned if fd is not None else removed).append(vector)
                if index == IrqIndex.MSIX:
                    await self._mirror_msix(removed, masked=True)
                    await self._mirror_msix(assigned, masked=False)
            elif request.action == IRQ_SET_ACTION_UNMASK and index == IrqIndex.INTX:
                # An eventfd the client signals to unmask: KVM's resample fd.
                self._set_intx_unmask_fd(fds.take(0) if len(fds) else None)
            else:
                raise ProtocolError(
                    f"DATA_EVENTFD with action {request.action:#x} on IRQ index {index} "
                    "is not supported",
                    errno.ENOTTY,
                )
            return self._reply(message)
        # DATA_NONE or DATA_BOOL: act on the selected vectors now.
        for vector in request.selected():
            if request.action == IRQ_SET_ACTION_TRIGGER:
                if index == IrqIndex.INTX:
                    self.irqs.fire_intx(level=True)
                else:
                    self.irqs.fire(index, vector)
            elif request.action == IRQ_SET_ACTION_MASK:
                self.irqs.mask(index, vector)
            elif request.action == IRQ_SET_ACTION_UNMASK:
                if index == IrqIndex.INTX:
                    await self._unmask_intx()
                else:
                    self.irqs.unmask(index, vector)
        return self._reply(message)

    async def _unmask_intx(self) -> None:
        """The client's EOI: re-signal if the line is still asserted.

        The guest's handler usually acknowledged the device with a posted write
        just before; the line's level we hold may predate it. A read round trip
        orders after every posted write, and the events a write caused arrive
        before that read's reply, so after it our level is the device's.
        """
        if self.device.intx_level:
            await self.link.config_read(self.info, [(_PCI_STATUS, 2)])
        self.irqs.unmask(IrqIndex.INTX, 0, level=self.device.intx_level)

    def _set_intx_unmask_fd(self, fd: int | None) -> None:
        old = self.irqs.intx_unmask_fd
        if old is not None:
            asyncio.get_running_loop().remove_reader(old)
            close_fds([old])
        self.irqs.intx_unmask_fd = fd
        if fd is not None:
            asyncio.get_running_loop().add_reader(fd, self._on_intx_unmask_fd)

    def _on_intx_unmask_fd(self) -> None:
        fd = self.irqs.intx_unmask_fd
        if fd is None:
            return
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return
        except OSError as e:
            log.debug("INTx unmask eventfd: %s", e)
            return
        task = asyncio.create_task(self._unmask_intx(), name=f"{self.device.name} INTx unmask")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _msix_table(self) -> tuple[int, int] | None:
        """(BAR, offset) of the device's MSI-X table, from its capability list."""
        device = self.device
        if device.msix_table_known:
            return device.msix_table
        info = device.info
        values = await self.link.config_read(info, [(_PCI_CAPABILITY_LIST, 1)])
        if values is None:
            return None
        pointer = values[0] & 0xFC
        for _ in range(48):  # a capability list has at most 48 entries in 256 bytes
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

    async def _mirror_msix(self, vectors: Sequence[int], *, masked: bool) -> None:
        """Mirror QEMU's per-vector mask into the server's MSI-X table (see module doc)."""
        if not vectors or not self.mirror_msix_mask:
            return
        table = await self._msix_table()
        if table is None:
            return
        bar, offset = table
        self.link.bar_write(
            self.info.device_id,
            bar,
            [
                (offset + v * _PCI_MSIX_ENTRY_SIZE + _PCI_MSIX_ENTRY_VECTOR_CTRL, 4, int(masked))
                for v in vectors
            ],
        )

    def on_intx(self, asserted: bool) -> None:
        if asserted:
            self.irqs.fire_intx(level=True)

    def on_msi(self, vector: int) -> None:
        if 0 <= vector < self.device.layout.irqs[IrqIndex.MSIX].count:
            self.irqs.fire(IrqIndex.MSIX, vector)

    # -- region accesses

    def _max_piece(self, region: int) -> int:
        return 4 if region == REGION_CONFIG else 8  # ConfigRead takes 1, 2 or 4 bytes

    async def _read(self, region: int, offset: int, count: int) -> bytes:
        pieces = split_access(offset, count, self._max_piece(region))
        if region == REGION_CONFIG:
            values = await self.link.config_read(self.info, pieces)
        else:
            values = await self.link.bar_read(self.info.device_id, region, pieces)
        if values is None:
            return all_ones(count)
        return b"".join(
            (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            for (_, size), v in zip(pieces, values, strict=True)
        )

    async def _write(self, region: int, offset: int, data: bytes, *, posted: bool) -> None:
        pieces = [
            (o, size, int.from_bytes(data[o - offset : o - offset + size], "little"))
            for o, size in split_access(offset, len(data), self._max_piece(region))
        ]
        if region == REGION_CONFIG:
            # Config writes are answered: they can move BARs, and everything they
            # cause is applied before the vCPU goes on.
            await self.link.config_write(self.info, pieces)
        else:
            self.link.bar_write(self.info.device_id, region, pieces)
            if not posted:
                await self.link.flush()

    def _check_count(self, count: int) -> None:
        if count > DEFAULT_MAX_DATA_XFER:
            raise ProtocolError(
                f"access of {count} bytes is over max_data_xfer_size {DEFAULT_MAX_DATA_XFER}",
                errno.E2BIG,
            )

    async def _region_read(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "REGION_READ")
        request = RegionAccess.decode_read(message.payload)
        self._check_count(request.count)
        self.device.layout.check_access(request.region, request.offset, request.count, write=False)
        data = await self._read(request.region, request.offset, request.count)
        reply = RegionAccess(request.offset, request.region, request.count, data)
        return self._reply(message, reply.encode())

    async def _region_write(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "REGION_WRITE")
        request = RegionAccess.decode_write(message.payload)
        self._check_count(request.count)
        self.device.layout.check_access(request.region, request.offset, request.count, write=True)
        await self._write(
            request.region, request.offset, request.data, posted=message.header.no_reply
        )
        reply = RegionAccess(request.offset, request.region, request.count)
        return self._reply(message, reply.encode())

    async def _write_multi(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "REGION_WRITE_MULTI")
        request = WriteMulti.decode(message.payload)
        for w in request.writes:  # all or nothing
            self.device.layout.check_access(w.region, w.offset, w.count, write=True)
        for w in request.writes:
            await self._write(w.region, w.offset, w.data, posted=True)
        return self._reply(message, len(request.writes).to_bytes(8, "little"))

    async def _reset(self, message: Message, fds: _Fds) -> bytes | None:
        self._no_fds(fds, "DEVICE_RESET")
        if not await self.link.reset(self.info):
            raise ProtocolError("the device server is unreachable", errno.ENODEV)
        # The reset masked every vector of the server's MSI-X table; vectors QEMU
        # still has eventfds for must stay deliverable.
        await self._mirror_msix(self.irqs.assigned(IrqIndex.MSIX), masked=False)
        return self._reply(message)

    # -- DMA towards the client (server -> client requests)

    async def dma_read(self, address: int, length: int) -> bytes:
        """Read guest memory: through the mapped fd where QEMU gave one, else DMA_READ.

        The range may run across adjacent windows; a hole fails it (DmaError).
        """
        out = bytearray()
        for region, start, count in self.dma.pieces(address, length, DMA_MAP_FLAG_READ):
            if region.fd is not None:
                out += region.read(start, count)
                continue
            for at, size in self._dma_chunks(start, count):
                reply = await self._dma_request(Command.DMA_READ, DmaAccess(at, size).encode())
                data = DmaAccess.decode(reply.payload, self.dma_data_offset).data
                if len(data) < size:
                    raise DmaError(f"DMA_READ of {size} bytes at {at:#x} returned {len(data)}")
                out += data[:size]
        return bytes(out)

    async def dma_write(self, address: int, data: bytes) -> None:
        """Write guest memory: through the mapped fd where QEMU gave one, else DMA_WRITE."""
        for region, start, count in self.dma.pieces(address, len(data), DMA_MAP_FLAG_WRITE):
            piece = data[start - address : start - address + count]
            if region.fd is not None:
                region.write(start, piece)
                continue
            for at, size in self._dma_chunks(start, count):
                chunk = piece[at - start : at - start + size]
                await self._dma_request(
                    Command.DMA_WRITE, DmaAccess(at, size, chunk).encode(self.dma_data_offset)
                )

    def _dma_chunks(self, address: int, length: int) -> list[tuple[int, int]]:
        # The client's limit, and ours: its replies to DMA_READ must fit our framer.
        limit = min((self.client or Capabilities()).max_data_xfer_size, DEFAULT_MAX_DATA_XFER)
        return [(address + i, min(limit, length - i)) for i in range(0, length, limit)]

    async def _dma_request(self, command: Command, payload: bytes) -> Message:
        if self._closed:
            raise DmaError("the client is gone")
        msg_id = self._take_id()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            await self.send(encode_message(msg_id, command, payload))
            async with asyncio.timeout(self.dma_timeout):
                reply = await future
        except TimeoutError:
            raise DmaError(f"no reply to {command.name} within {self.dma_timeout} s") from None
        except OSError as e:
            raise DmaError(f"cannot send {command.name}: {e}") from None
        finally:
            self._pending.pop(msg_id, None)
        if reply.header.is_error:
            raise DmaError(
                f"{command.name} refused: {os.strerror(reply.header.error) or reply.header.error}"
            )
        return reply

    def _take_id(self) -> int:
        for _ in range(0x10000):
            msg_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFF
            if msg_id not in self._pending:
                return msg_id
        raise DmaError("65536 DMA requests are outstanding")

    def handle_reply(self, message: Message) -> None:
        close_fds(message.fds)  # no reply we expect carries descriptors
        future = self._pending.get(message.header.msg_id)
        if future is None or future.done():
            log.warning(
                "%s: unexpected reply id=%d to %s",
                self.device.name,
                message.header.msg_id,
                message.header.command_name(),
            )
            return
        future.set_result(message)

    # -- teardown

    def close(self) -> None:
        """Release everything the client gave us (spec, "Client Disconnection")."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self.irqs.intx_unmask_fd is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self.irqs.intx_unmask_fd)
        self.irqs.close()
        if self.memory is None:
            self.dma.clear()
        else:
            self.memory.release(self, self.dma.detach_all())
            self.memory.sync_soon()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DmaError("the client disconnected"))
        self._pending.clear()


# ---------------------------------------------------------------- the socket shell


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Closed:
    """Queue sentinel: the peer is gone or the stream broke."""


class Connection:
    """One QEMU connection to one device socket."""

    def __init__(self, sock: socket.socket, device: Device, bridge: VfioUserBridge) -> None:
        self.sock = sock
        self.device = device
        self.framer = Framer()
        self.handler = DeviceHandler(
            device,
            bridge.link,
            self._send,
            mirror_msix_mask=bridge.mirror_msix_mask,
            memory=bridge.memory,
            dma_data_offset=DMA_LAYOUTS[bridge.dma_layout],
        )
        self._queue: asyncio.Queue[Message | FramingError | _Closed] = asyncio.Queue(QUEUE_DEPTH)
        self._send_lock = asyncio.Lock()
        self._buffer = memoryview(bytearray(RECV_SIZE))
        self._closed = False

    async def run(self) -> None:
        reader = asyncio.create_task(self._read_loop(), name=f"vfio-user {self.device.name} reader")
        worker = asyncio.create_task(self._work(), name=f"vfio-user {self.device.name} worker")
        try:
            done, _ = await asyncio.wait({reader, worker}, return_when=asyncio.FIRST_COMPLETED)
            if worker not in done and reader.exception() is None:
                # The reader queued its end marker: answer what came before it.
                await worker
            # A worker that stopped first (the client stopped reading) leaves the
            # reader possibly blocked on a full queue: it is cancelled below.
        finally:
            for task in (reader, worker):
                task.cancel()
            try:
                for result in await asyncio.gather(reader, worker, return_exceptions=True):
                    if isinstance(result, Exception):
                        log.error("%s: connection task failed", self.device.name, exc_info=result)
            finally:
                # Even when the bridge stops (cancelling us) while the client's
                # hang-up is still being wound down: stop() no longer sees us.
                self.close()

    async def _recvmsg(self) -> tuple[bytes, list[int], bool]:
        """One non-blocking recvmsg: (bytes, received fds, control data truncated)."""
        loop = asyncio.get_running_loop()
        fileno = self.sock.fileno()
        while True:
            try:
                size, ancillary, flags, _ = self.sock.recvmsg_into(
                    [self._buffer], _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fileno, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(fileno)
                continue
            except (ConnectionResetError, BrokenPipeError):
                return b"", [], False
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    fds.extend(received)
            return bytes(self._buffer[:size]), fds, bool(flags & socket.MSG_CTRUNC)

    async def _read_loop(self) -> None:
        try:
            while True:
                data, fds, truncated = await self._recvmsg()
                if truncated:
                    close_fds(fds)
                    log.warning(
                        "%s: too many descriptors in one message; closing the connection",
                        self.device.name,
                    )
                    await self._queue.put(_Closed())
                    return
                if not data:
                    close_fds(fds)
                    await self._queue.put(_Closed())
                    return
                close_fds(self.framer.feed(data, fds))
                try:
                    for message in self.framer.messages():
                        if message.header.is_reply:
                            self.handler.handle_reply(message)
                        else:
                            await self._queue.put(message)
                except FramingError as e:
                    log.warning("%s: %s; closing the connection", self.device.name, e)
                    await self._queue.put(e)
                    return
        except OSError as e:
            log.warning("%s: receive failed: %s", self.device.name, e)
            await self._queue.put(_Closed())

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, _Closed):
                return
            if isinstance(item, FramingError):
                header = item.header
                if header is not None and header.is_command and not header.no_reply:
                    with contextlib.suppress(OSError):
                        await self._send(encode_error(header, item.errno))
                return
            reply = await self.handler.handle(item)
            if reply is not None:
                try:
                    await self._send(reply)
                except OSError as e:
                    log.info("%s: client went away (%s)", self.device.name, e)
                    return

    async def _send(self, data: bytes) -> None:
        if self._closed:
            raise BrokenPipeError("connection closed")
        async with self._send_lock:  # replies and DMA requests must not interleave
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.handler.close()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Message):
                close_fds(item.fds)
        close_fds(self.framer.take_fds())
        self.sock.close()


# ---------------------------------------------------------------- the bridge


class VfioUserBridge:
    """A vfio-user socket per device of one device server, all on one session.

        bridge = VfioUserBridge(socket_dir, memory_mode="shared")
        session = await AsyncSession.attach(channel, bridge.frontend_options(),
                                            on_event=bridge.on_event, on_dma=bridge.on_dma)
        await bridge.start(session)        # sockets listening: start QEMU now
        qemu_cmd += bridge.qemu_args()
        ...
        await bridge.stop()

    `open_bridge()` and `run_bridge()` do the channel and session as well.
    """

    def __init__(
        self,
        socket_dir: Path,
        *,
        access_timeout: float = ACCESS_TIMEOUT,
        mirror_msix_mask: bool = True,
        memory_mode: MemoryMode = "shared",
        dma_layout: DmaLayout = "spec",
    ) -> None:
        if memory_mode not in ("shared", "messages"):
            raise ValueError(f"memory mode {memory_mode!r} is not 'shared' or 'messages'")
        if dma_layout not in DMA_LAYOUTS:
            raise ValueError(f"DMA layout {dma_layout!r} is not one of {', '.join(DMA_LAYOUTS)}")
        self.dma_layout: DmaLayout = dma_layout
        self.socket_dir = Path(socket_dir)
        self.access_timeout = access_timeout
        self.mirror_msix_mask = mirror_msix_mask
        self.memory_mode: MemoryMode = memory_mode
        self.memory: MemoryMirror | None = None  # shared mode, once started
        self.devices: dict[int, Device] = {}  # by device_id
        self._link: ServerLink | None = None
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[Connection] = set()

    def frontend_options(self, name: str = "") -> FrontendOptions:
        """The Hello for this bridge. Shared mode starts with an empty map: QEMU
        connects, and sends its DMA_MAPs, only after the session exists."""
        return FrontendOptions(
            name=name or f"vfio-user bridge (pid {os.getpid()})",
            msi=True,  # QEMU delivers MSI-X itself; the server must present the capability
            bar64=True,
            memory_mode=pb.MEMORY_MODE_SHARED
            if self.memory_mode == "shared"
            else pb.MEMORY_MODE_DMA_MESSAGES,
        )

    @property
    def link(self) -> ServerLink:
        if self._link is None:
            raise RuntimeError("the bridge is not started")
        return self._link

    @property
    def sockets(self) -> dict[str, Path]:
        """Device name -> the socket QEMU's vfio-user-pci connects to."""
        return {d.name: d.socket_path for d in self.devices.values()}

    async def start(self, session: SessionLike) -> dict[str, Path]:
        """Listen on one socket per device; returns them by device name."""
        self._link = ServerLink(session, self.access_timeout)
        if self.memory_mode == "shared":
            self.memory = MemoryMirror(self._link)
        try:
            for info in session.topology.devices:
                path = self.socket_dir / socket_name(info)
                if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                    raise ValueError(
                        f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes; "
                        "choose a shorter socket directory"
                    )
                prepare_socket_dir(path)  # 0700 directory we own; stale socket removed
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listeners.append(listener)
                listener.setblocking(False)
                listener.bind(os.fspath(path))
                os.chmod(path, 0o600)
                listener.listen(1)
                device = Device(info, device_layout(info), path)
                self.devices[info.device_id] = device
                self._spawn(self._accept_loop(listener, device), f"vfio-user {info.name} accept")
                log.info(
                    "%s (%04x:%04x at %02x:%02x.%x): listening on %s",
                    info.name,
                    info.vendor_id,
                    info.product_id,
                    info.bus,
                    info.device,
                    info.function,
                    path,
                )
        except BaseException:
            await self.stop()
            raise
        return self.sockets

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket, device: Device) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            if device.handler is not None:
                log.warning("%s: refusing a second client while one is connected", device.name)
                sock.close()
                continue
            sock.setblocking(False)
            connection = Connection(sock, device, self)
            device.handler = connection.handler
            self._connections.add(connection)
            log.info("%s: client connected", device.name)
            self._spawn(self._serve(connection), f"vfio-user {device.name} connection")

    async def _serve(self, connection: Connection) -> None:
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            if connection.device.handler is connection.handler:
                connection.device.handler = None
            log.info("%s: client disconnected", connection.device.name)

    # -- events from the device server (called on the session's reader task)

    def on_event(self, effect: Effect) -> None:
        device = self.devices.get(effect.device_id)
        if device is None:
            return
        match effect:
            case IntxChanged():
                device.intx_level = effect.asserted
                if device.handler is not None:
                    device.handler.on_intx(effect.asserted)
            case MsiRaised():
                if device.handler is not None:
                    device.handler.on_msi(effect.vector)
            case DeviceNeedsReset():
                log.warning("%s needs a reset: %s", device.name, effect.reason)
            case _:
                pass  # BAR decode changes: QEMU maps BARs itself and forwards by region

    def on_dma(self, request: pb.DmaRequest) -> None:
        """Serve the server's DMA requests through the client (MEMORY_MODE_DMA_MESSAGES)."""
        self._spawn(self._dma(request), f"vfio-user DMA {request.request_id}")

    async def _dma(self, request: pb.DmaRequest) -> None:
        session = self.link.session
        device = self.devices.get(request.device_id)
        handler = device.handler if device is not None else None
        try:
            if handler is None:
                raise DmaError(f"device {request.device_id} has no vfio-user client")
            if request.write:
                await handler.dma_write(request.address, bytes(request.data))
                data = b""
            else:
                data = await handler.dma_read(request.address, request.length)
        except DmaError as e:
            with contextlib.suppress(ClientError):
                session.dma_reply(request.request_id, error=str(e))
            return
        with contextlib.suppress(ClientError):
            session.dma_reply(request.request_id, data=data)

    # -- QEMU command line

    def qemu_args(self, *, msg_timeout_ms: int | None = None, root_ports: bool = True) -> list[str]:
        """`-device` arguments for QEMU, one vfio-user-pci per device.

        With `root_ports` each device sits behind its own pcie-root-port, so
        the guest sees it as the PCI Express endpoint the server presents (on
        pcie.0 QEMU would show it as a root-complex integrated endpoint).
        Guest RAM should be shareable (`-object memory-backend-memfd,id=mem,
        size=...,share=on -machine q35,memory-backend=mem`) so DMA_MAP brings
        fds; see qemu-vfio-user.md.
        """
        args: list[str] = []
        for number, device in enumerate(self.devices.values(), start=1):
            port = f"devmodel-rp{number}"
            if root_ports:
                args += [
                    "-device",
                    f"pcie-root-port,id={port},bus=pcie.0,chassis={number},slot={number}",
                ]
            spec: dict[str, object] = {
                "driver": "vfio-user-pci",
                "id": f"vfu-{device.name}" if _SAFE_NAME.fullmatch(device.name) else None,
                "socket": {"type": "unix", "path": os.fspath(device.socket_path)},
            }
            if root_ports:
                spec["bus"] = port
            if spec["id"] is None:
                del spec["id"]
            if msg_timeout_ms is not None:
                spec["x-msg-timeout"] = msg_timeout_ms
            args += ["-device", json.dumps(spec, separators=(",", ":"))]
        return args

    async def stop(self) -> None:
        """Close every socket and connection (their eventfds and DMA fds with them)."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()
        if self.memory is not None:
            await self.memory.close()
        for device in self.devices.values():
            device.handler = None
            with contextlib.suppress(FileNotFoundError):
                device.socket_path.unlink()


@contextlib.asynccontextmanager
async def open_bridge(
    devserver_target: str,
    socket_dir: Path,
    *,
    tls: TlsClientFiles | None = None,
    access_timeout: float = ACCESS_TIMEOUT,
    name: str = "",
    memory_mode: str = "auto",
    dma_layout: DmaLayout = "spec",
) -> AsyncIterator[VfioUserBridge]:
    """Attach to the device server and listen for QEMU; everything is closed on exit.

    `memory_mode`: "shared", "messages", or "auto" (shared when the server is
    reached over a UNIX socket, so it runs on this host).
    """
    bridge = VfioUserBridge(
        socket_dir,
        access_timeout=access_timeout,
        memory_mode=resolve_memory_mode(memory_mode, devserver_target),
        dma_layout=dma_layout,
    )
    channel = open_channel(devserver_target, tls)
    try:
        session = await AsyncSession.attach(
            channel,
            bridge.frontend_options(name),
            on_event=bridge.on_event,
            on_dma=bridge.on_dma,
        )
        try:
            if bridge.memory_mode == "shared" and session.welcome.protocol_minor < 1:
                raise ClientError(
                    f"the device server speaks protocol {session.welcome.protocol_major}."
                    f"{session.welcome.protocol_minor}, which cannot follow QEMU's memory "
                    "map (MemoryMapUpdate, 1.1); use --memory-mode messages or a newer server"
                )
            await bridge.start(session)
            yield bridge
        finally:
            await bridge.stop()
            await session.close()
    finally:
        await channel.close(None)


async def run_bridge(
    devserver_target: str,
    socket_dir: Path,
    *,
    tls: TlsClientFiles | None = None,
    access_timeout: float = ACCESS_TIMEOUT,
    ready: Callable[[VfioUserBridge], None] | None = None,
    stop: asyncio.Event | None = None,
    memory_mode: str = "auto",
    dma_layout: DmaLayout = "spec",
) -> None:
    """Run a bridge for every device of the server at `devserver_target` until `stop`
    is set (or the task is cancelled). `ready` is called once the sockets listen:
    that is when QEMU may start."""
    async with open_bridge(
        devserver_target,
        socket_dir,
        tls=tls,
        access_timeout=access_timeout,
        memory_mode=memory_mode,
        dma_layout=dma_layout,
    ) as bridge:
        if ready is not None:
            ready(bridge)
        await (stop or asyncio.Event()).wait()
