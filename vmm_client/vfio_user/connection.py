"""One QEMU connection to one device socket: read, frame, handle in order, reply.

Each connection has a reader task (recvmsg with SCM_RIGHTS) that frames
messages and routes replies to our own DMA requests at once, and a worker
task that handles requests strictly in order (the spec requires in-order
processing, and QEMU relies on it for posted writes). A reader thread would
cost a cross-thread hop on every access and still need the loop for gRPC;
grpc.aio must live on one loop anyway.

A client that breaks the framing (a size smaller than the header or over
the limit) gets an error reply when its header could be read, and the
connection closes with a log line; the other devices' connections and the
session to the device server go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from .client_dma import DMA_LAYOUTS
from .device import Device
from .fd_passing import close_fds, recv_with_fds, send_with_fds
from .handler import DeviceHandler
from .protocol import Framer, FramingError, Message, encode_error

if TYPE_CHECKING:
    from .bridge import VfioUserBridge

log = logging.getLogger(__name__)

RECV_SIZE: Final = 64 * 1024  # reused for every receive; a 1 MiB write takes 16
QUEUE_DEPTH: Final = 256  # requests read ahead of the worker; back-pressure beyond


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
            send_fds=self._send_fds,
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

    async def _read_loop(self) -> None:
        try:
            while True:
                data, fds, truncated = await recv_with_fds(self.sock, self._buffer)
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
                    if self.framer.buffered:
                        log.warning(
                            "%s: client hung up %d bytes into a message",
                            self.device.name,
                            self.framer.buffered,
                        )
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

    async def _send_fds(self, data: bytes, fds: Sequence[int]) -> None:
        if self._closed:
            raise BrokenPipeError("connection closed")
        async with self._send_lock:
            await send_with_fds(self.sock, data, fds)

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
