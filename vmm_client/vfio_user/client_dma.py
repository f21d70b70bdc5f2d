"""Device DMA towards the client: DMA_READ/DMA_WRITE requests we send QEMU.

A range is served piece by piece across QEMU's DMA_MAP windows: through our
mapping of the window's fd where QEMU gave one, else as DMA_READ/DMA_WRITE
messages, cut to the client's max_data_xfer_size, matched to their replies
by message id and bounded by a timeout, so a silent client fails the DMA
instead of hanging the device.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Final, Literal

from .dma import DmaTable
from .link import DmaError
from .protocol import (
    DEFAULT_MAX_DATA_XFER,
    DMA_DATA_OFFSET_SPEC,
    DMA_DATA_OFFSET_U32_COUNT,
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    Command,
    DmaAccess,
    Message,
    encode_message,
)

log = logging.getLogger(__name__)

DMA_TIMEOUT: Final = 5.0
# Where DMA_READ/DMA_WRITE data sits (protocol.dma_access): the spec's layout,
# or a QEMU whose VFIOUserDMARW still has a u32 count.
DmaLayout = Literal["spec", "u32-count"]
DMA_LAYOUTS: Final[dict[str, int]] = {
    "spec": DMA_DATA_OFFSET_SPEC,
    "u32-count": DMA_DATA_OFFSET_U32_COUNT,
}


class ClientDma:
    """One connection's DMA into guest memory, over its DMA_MAP windows."""

    def __init__(
        self,
        name: str,
        windows: DmaTable,
        send: Callable[[bytes], Awaitable[None]],
        *,
        timeout: float = DMA_TIMEOUT,
        data_offset: int = DMA_DATA_OFFSET_SPEC,
    ) -> None:
        self.name = name
        self.windows = windows
        self.send = send
        self.timeout = timeout
        self.data_offset = data_offset
        # The client's limit (VERSION), and ours: its replies must fit our framer.
        self.max_xfer = DEFAULT_MAX_DATA_XFER
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._closed = False

    async def read(self, address: int, length: int) -> bytes:
        """Read guest memory: through the mapped fd where QEMU gave one, else DMA_READ.

        The range may run across adjacent windows; a hole fails it (DmaError).
        """
        out = bytearray()
        for region, start, count in self.windows.pieces(address, length, DMA_MAP_FLAG_READ):
            if region.fd is not None:
                out += region.read(start, count)
                continue
            for at, size in self._chunks(start, count):
                reply = await self._request(Command.DMA_READ, DmaAccess(at, size).encode())
                data = DmaAccess.decode(reply.payload, self.data_offset).data
                if len(data) < size:
                    raise DmaError(f"DMA_READ of {size} bytes at {at:#x} returned {len(data)}")
                out += data[:size]
        return bytes(out)

    async def write(self, address: int, data: bytes) -> None:
        """Write guest memory: through the mapped fd where QEMU gave one, else DMA_WRITE."""
        for region, start, count in self.windows.pieces(address, len(data), DMA_MAP_FLAG_WRITE):
            piece = data[start - address : start - address + count]
            if region.fd is not None:
                region.write(start, piece)
                continue
            for at, size in self._chunks(start, count):
                chunk = piece[at - start : at - start + size]
                await self._request(
                    Command.DMA_WRITE, DmaAccess(at, size, chunk).encode(self.data_offset)
                )

    def _chunks(self, address: int, length: int) -> list[tuple[int, int]]:
        limit = min(self.max_xfer, DEFAULT_MAX_DATA_XFER)
        return [(address + i, min(limit, length - i)) for i in range(0, length, limit)]

    async def _request(self, command: Command, payload: bytes) -> Message:
        if self._closed:
            raise DmaError("the client is gone")
        msg_id = self._take_id()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            await self.send(encode_message(msg_id, command, payload))
            async with asyncio.timeout(self.timeout):
                reply = await future
        except TimeoutError:
            raise DmaError(f"no reply to {command.name} within {self.timeout} s") from None
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
        """A reply from the client: it completes the request with its id, if any."""
        future = self._pending.get(message.header.msg_id)
        if future is None or future.done():
            log.warning(
                "%s: unexpected reply id=%d to %s",
                self.name,
                message.header.msg_id,
                message.header.command_name(),
            )
            return
        future.set_result(message)

    def close(self) -> None:
        """The client is gone: every request still waiting fails."""
        self._closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DmaError("the client disconnected"))
        self._pending.clear()
