"""One device's side of vfio-user: answering QEMU's requests for that device.

Region 7 (config space) becomes ConfigRead/ConfigWrite, regions 0..6
BarRead/BarWrite (posted when QEMU asks for no reply), and the rest (info,
IRQs, DMA maps, reset) is answered here or forwarded as the protocol says.
Interrupts live in `irqs.DeviceInterrupts`, DMA towards the client in
`client_dma.ClientDma`; this module dispatches and answers.

Every request is input from another process: a malformed one gets an error
reply with the errno the spec gives (ENOSYS for an unknown command, EINVAL
for a bad region, offset or length, EEXIST for an overlapping DMA_MAP) and
a log line, and the connection goes on.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Final

from devmodel.v1 import devmodel_pb2 as pb

from .client_dma import DMA_TIMEOUT, ClientDma
from .device import Device
from .dma import MAX_DMA_MAPS, DmaTable, close_regions
from .fd_passing import ReceivedFds, close_fds
from .irqs import DeviceInterrupts, IrqTable
from .link import ServerLink
from .memory_mirror import MemoryMirror
from .protocol import (
    DEFAULT_MAX_DATA_XFER,
    DMA_DATA_OFFSET_SPEC,
    DMA_UNMAP_FLAG_ALL,
    DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    PAGE_SIZE,
    REGION_INFO_FLAG_MMAP,
    VERSION_MAJOR,
    VERSION_MINOR,
    Capabilities,
    Command,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    IrqInfo,
    IrqSet,
    Message,
    ProtocolError,
    RegionAccess,
    RegionInfo,
    Version,
    WriteMulti,
    encode_error,
    encode_reply,
)
from .region_forwarding import check_count, read_region, write_region

log = logging.getLogger(__name__)

MAX_MSG_FDS: Final = 8  # offered in VERSION; QEMU sends MSI-X eventfds in chunks of this

Handler = Callable[[Message, ReceivedFds], Awaitable[bytes | None]]


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
        self.memory = memory  # shared mode: RAM windows go to the server
        self.interrupts = DeviceInterrupts(device, link, mirror_msix_mask=mirror_msix_mask)
        self.dma = DmaTable()
        self.client_dma = ClientDma(
            device.name, self.dma, send, timeout=dma_timeout, data_offset=dma_data_offset
        )
        self.client: Capabilities | None = None  # set by VERSION
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

    @property
    def irqs(self) -> IrqTable:
        return self.interrupts.table

    @property
    def dma_timeout(self) -> float:
        return self.client_dma.timeout

    @dma_timeout.setter
    def dma_timeout(self, seconds: float) -> None:
        self.client_dma.timeout = seconds

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
        self.client_dma.max_xfer = self.client.max_data_xfer_size
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
        await self.interrupts.set_irqs(IrqSet.decode(message.payload), fds)
        return self._reply(message)

    def on_intx(self, asserted: bool) -> None:
        self.interrupts.on_intx(asserted)

    def on_msi(self, vector: int) -> None:
        self.interrupts.on_msi(vector)

    # -- region accesses

    async def _region_read(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "REGION_READ")
        request = RegionAccess.decode_read(message.payload)
        check_count(request.count)
        self.device.layout.check_access(request.region, request.offset, request.count, write=False)
        data = await read_region(
            self.link, self.info, request.region, request.offset, request.count
        )
        reply = RegionAccess(request.offset, request.region, request.count, data)
        return self._reply(message, reply.encode())

    async def _region_write(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "REGION_WRITE")
        request = RegionAccess.decode_write(message.payload)
        check_count(request.count)
        self.device.layout.check_access(request.region, request.offset, request.count, write=True)
        await write_region(
            self.link,
            self.info,
            request.region,
            request.offset,
            request.data,
            posted=message.header.no_reply,
        )
        reply = RegionAccess(request.offset, request.region, request.count)
        return self._reply(message, reply.encode())

    async def _write_multi(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "REGION_WRITE_MULTI")
        request = WriteMulti.decode(message.payload)
        for w in request.writes:  # all or nothing
            self.device.layout.check_access(w.region, w.offset, w.count, write=True)
        for w in request.writes:
            await write_region(self.link, self.info, w.region, w.offset, w.data, posted=True)
        return self._reply(message, len(request.writes).to_bytes(8, "little"))

    async def _reset(self, message: Message, fds: ReceivedFds) -> bytes | None:
        self._no_fds(fds, "DEVICE_RESET")
        if not await self.link.reset(self.info):
            raise ProtocolError("the device server is unreachable", errno.ENODEV)
        await self.interrupts.after_reset()
        return self._reply(message)

    # -- DMA towards the client (server -> client requests)

    async def dma_read(self, address: int, length: int) -> bytes:
        """Read guest memory (ClientDma.read); DmaError where it cannot."""
        return await self.client_dma.read(address, length)

    async def dma_write(self, address: int, data: bytes) -> None:
        """Write guest memory (ClientDma.write); DmaError where it cannot."""
        await self.client_dma.write(address, data)

    def handle_reply(self, message: Message) -> None:
        close_fds(message.fds)  # no reply we expect carries descriptors
        self.client_dma.handle_reply(message)

    # -- teardown

    def close(self) -> None:
        """Release everything the client gave us (spec, "Client Disconnection")."""
        if self._closed:
            return
        self._closed = True
        self.interrupts.close()
        if self.memory is None:
            self.dma.clear()
        else:
            self.memory.release(self, self.dma.detach_all())
            self.memory.sync_soon()
        self.client_dma.close()
