"""The bridge's link to the device server: one session shared by every device.

Every access of every device goes through `ServerLink`, which turns a lost or
slow server into all-ones reads and dropped writes instead of a hung vCPU.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, Literal, Protocol

from devmodel.v1 import devmodel_pb2 as pb
from devserver.effects import AddressRange, Effect

from ..client import (
    ClientError,
    MemoryRegion,
)

log = logging.getLogger(__name__)

ACCESS_TIMEOUT: Final = 4.0  # below QEMU's x-msg-timeout (5 s): all-ones beats a vCPU error
MemoryMode = Literal["shared", "messages"]
MEMORY_MODES: Final = ("auto", "shared", "messages")


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
