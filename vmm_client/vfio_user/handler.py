"""One device's side of vfio-user: answering QEMU's requests for that device.

Region 7 (config space) becomes ConfigRead/ConfigWrite, regions 0..6
BarRead/BarWrite (posted when QEMU asks for no reply), and the rest (info,
IRQs, DMA maps, reset) is answered here or forwarded as the protocol says.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from devmodel.v1 import devmodel_pb2 as pb

from .dma import MAX_DMA_MAPS, DmaTable, Handler, MemoryMirror, close_regions
from .irqs import IrqTable, ReceivedFds, close_fds, is_eventfd
from .link import DmaError, ServerLink
from .protocol import (
    DEFAULT_MAX_DATA_XFER,
    DMA_DATA_OFFSET_SPEC,
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
    REGION_INFO_FLAG_MMAP,
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

DMA_TIMEOUT: Final = 5.0
MAX_MSG_FDS: Final = 8  # offered in VERSION; QEMU sends MSI-X eventfds in chunks of this
SAFE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PCI_STATUS: Final = 0x06
_PCI_CAPABILITY_LIST: Final = 0x34
_PCI_CAP_ID_MSIX: Final = 0x11
_PCI_MSIX_TABLE: Final = 4
_PCI_MSIX_ENTRY_SIZE: Final = 16
_PCI_MSIX_ENTRY_VECTOR_CTRL: Final = 12


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
    # Region index -> an fd of the shared memory behind it (a vesa-fb's VRAM),
    # handed to the client with GET_REGION_INFO so guest accesses never leave
    # QEMU. The bridge opens and closes them.
    mmap_fds: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name


def device_layout(info: pb.DeviceInfo, mappable: frozenset[int] = frozenset()) -> DeviceLayout:
    """The regions QEMU sees; BARs in `mappable` (we hold an fd of their
    shared memory) are offered for mmap."""
    bars = [
        BarLayout(bar.index, bar.size, bar.kind == pb.BAR_KIND_MEM64, bar.index in mappable)
        for bar in info.bars
        if 0 <= bar.index <= 6
    ]
    return DeviceLayout.build(
        bars, interrupt_pin=info.interrupt_pin, msix_vectors=info.msix_vectors
    )


def socket_name(info: pb.DeviceInfo) -> str:
    """A file name for the device's socket: its name when that is safe as one."""
    if SAFE_NAME.fullmatch(info.name):
        return f"{info.name}.sock"
    return f"device{info.device_id}.sock"


# ---------------------------------------------------------------- descriptors


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
        send_fds: Callable[[bytes, Sequence[int]], Awaitable[None]] | None = None,
    ) -> None:
        self.device = device
        self.link = link
        self.send = send
        self.send_fds = send_fds  # None: the shell cannot pass fds, so nothing is mmappable
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
        fds = ReceivedFds(message.fds)
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
    def _no_fds(fds: ReceivedFds, what: str) -> None:
        if len(fds):
            raise ProtocolError(f"{what} carries {len(fds)} file descriptors; it takes none")

    @staticmethod
    def _reply(message: Message, payload: bytes = b"") -> bytes | None:
        return None if message.header.no_reply else encode_reply(message.header, payload)

    # -- negotiation and information

    async def _version(self, message: Message, fds: ReceivedFds) -> bytes | None:
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

    async def _get_info(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "DEVICE_GET_INFO")
        DeviceInfo.decode(message.payload)
        return self._reply(message, self.device.layout.device_info().encode())

    async def _region_info(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "DEVICE_GET_REGION_INFO")
        request = RegionInfo.decode(message.payload)
        info = self.device.layout.region(request.index)
        fd = self.device.mmap_fds.get(request.index)
        if not info.flags & REGION_INFO_FLAG_MMAP:
            return self._reply(message, info.encode())
        if fd is None or self.send_fds is None or message.header.no_reply:
            # Served by REGION_READ/WRITE instead: the client must not mmap without an fd.
            unmapped = replace(info, flags=info.flags & ~REGION_INFO_FLAG_MMAP)
            return self._reply(message, unmapped.encode())
        # The fd rides with the reply (SCM_RIGHTS); the client maps `size` bytes of
        # it from `offset` (0: the whole memfd is the region).
        await self.send_fds(encode_reply(message.header, info.encode()), [fd])
        return None

    async def _region_io_fds(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "DEVICE_GET_REGION_IO_FDS")
        raise ProtocolError("no region has ioeventfd offload", errno.ENOTSUP)

    async def _irq_info(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "DEVICE_GET_IRQ_INFO")
        request = IrqInfo.decode(message.payload)
        return self._reply(message, self.device.layout.irq(request.index).encode())

    # -- DMA windows

    async def _dma_map(self, message: Message, fds: ReceivedFds) -> bytes | None:
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

    async def _dma_unmap(self, message: Message, fds: ReceivedFds) -> bytes | None:
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

    async def _set_irqs(self, message: Message, fds: ReceivedFds) -> bytes | None:
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

    async def _region_read(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "REGION_READ")
        request = RegionAccess.decode_read(message.payload)
        self._check_count(request.count)
        self.device.layout.check_access(request.region, request.offset, request.count, write=False)
        data = await self._read(request.region, request.offset, request.count)
        reply = RegionAccess(request.offset, request.region, request.count, data)
        return self._reply(message, reply.encode())

    async def _region_write(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "REGION_WRITE")
        request = RegionAccess.decode_write(message.payload)
        self._check_count(request.count)
        self.device.layout.check_access(request.region, request.offset, request.count, write=True)
        await self._write(
            request.region, request.offset, request.data, posted=message.header.no_reply
        )
        reply = RegionAccess(request.offset, request.region, request.count)
        return self._reply(message, reply.encode())

    async def _write_multi(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "REGION_WRITE_MULTI")
        request = WriteMulti.decode(message.payload)
        for w in request.writes:  # all or nothing
            self.device.layout.check_access(w.region, w.offset, w.count, write=True)
        for w in request.writes:
            await self._write(w.region, w.offset, w.data, posted=True)
        return self._reply(message, len(request.writes).to_bytes(8, "little"))

    async def _reset(self, message: Message, fds: ReceivedFds) -> bytes | None:
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
