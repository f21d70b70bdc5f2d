"""The client library: typed async and sync facades over the Attach stream.

    async with await AsyncSession.attach(channel, FrontendOptions("my-vmm")) as s:
        vendor = await s.config_read(0, 1, 0, 0x00, 2)
        events = await s.config_write(0, 1, 0, 0x04, 2, 0x3)  # BAR events, already applied
        s.bar_write(1, 0, 0x04, 4, 0xCAFE)                     # posted, returns at once

Requests queued while a message is being written go out together in the next
FrontendMessage (the stream carries a few thousand messages a second, so
batching is where throughput comes from). Events reach `on_event` in stream
order, and always before the reply they precede resolves: a frontend that
updates its routing in `on_event` is up to date when `config_write` returns.

`SyncSession` runs the same session on a private event-loop thread for
callers that block, like a KVM vCPU loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import uvloop

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc
from devserver.effects import AddressRange, Effect
from devserver.service.convert import event_from_pb
from devserver.service.protocol import MAX_MESSAGE_BYTES, PROTOCOL_MAJOR, PROTOCOL_MINOR

EventHandler = Callable[[Effect], None]
DmaHandler = Callable[[pb.DmaRequest], None]
T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


class ClientError(Exception):
    """The session cannot go on: the server refused a request or went away."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class TlsClientFiles:
    ca: Path  # the server certificate must chain to this
    cert: Path | None = None  # client certificate, for mTLS
    key: Path | None = None
    server_name: str | None = None  # override the name checked in the server's certificate


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    guest_address: int
    size: int
    path: str = ""
    file_offset: int = 0
    read_only: bool = False


def region_to_pb(region: MemoryRegion) -> pb.MemoryRegion:
    return pb.MemoryRegion(
        guest_address=region.guest_address,
        size=region.size,
        path=region.path,
        file_offset=region.file_offset,
        read_only=region.read_only,
    )


@dataclass(frozen=True, slots=True)
class FrontendOptions:
    name: str = "vmm_client"
    msi: bool = True
    bar64: bool = True
    shared_memory_bars: bool = False
    memory_mode: int = pb.MEMORY_MODE_NONE
    regions: Sequence[MemoryRegion] = field(default_factory=tuple)
    features: Sequence[str] = ("batching",)

    def hello(self) -> pb.Hello:
        return pb.Hello(
            protocol_major=PROTOCOL_MAJOR,
            protocol_minor=PROTOCOL_MINOR,
            features=list(self.features),
            capabilities=pb.FrontendCapabilities(
                msi=self.msi, bar64=self.bar64, shared_memory_bars=self.shared_memory_bars
            ),
            memory=pb.GuestMemoryAccess(
                mode=self.memory_mode,  # type: ignore[arg-type]
                regions=[region_to_pb(r) for r in self.regions],
            ),
            frontend_name=self.name,
        )


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
    ]


def open_channel(target: str, tls: TlsClientFiles | None = None) -> grpc.aio.Channel:
    """A channel to `unix:PATH` or `HOST:PORT` (TLS when `tls` is given)."""
    options: list[tuple[str, Any]] = list(channel_options())
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None,
    )
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, creds, options=options)


class AsyncSession:
    """One attached frontend: every access, in order, on one stream."""

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall[pb.FrontendMessage, pb.ServerMessage],
        welcome: pb.Welcome,
        on_event: EventHandler | None,
        on_dma: DmaHandler | None,
    ) -> None:
        self._call = call
        self.welcome = welcome
        self.topology = welcome.topology
        self._on_event = on_event
        self._on_dma = on_dma
        self._seq = itertools.count(1)
        self._outbox: list[pb.Request] = []
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._waiting: dict[int, asyncio.Future[tuple[pb.Reply, list[Effect]]]] = {}
        self._events_since_reply: list[Effect] = []
        self._closed: ClientError | None = None
        self._writer = asyncio.create_task(self._write_loop(), name="devmodel-writer")
        self._reader = asyncio.create_task(self._read_loop(), name="devmodel-reader")

    @classmethod
    async def attach(
        cls,
        channel: grpc.aio.Channel,
        options: FrontendOptions = FrontendOptions(),
        on_event: EventHandler | None = None,
        on_dma: DmaHandler | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> AsyncSession:
        stub = devmodel_pb2_grpc.DeviceModelStub(channel)
        call = stub.Attach()
        try:
            await call.write(
                pb.FrontendMessage(requests=[pb.Request(seq=0, hello=options.hello())])
            )
            first = await asyncio.wait_for(call.read(), timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise ClientError(
                    f"cannot reach the device server ({e.details()}); "
                    "is `python -m devserver` running and listening there?",
                    e.code(),
                ) from None
            raise ClientError(f"attach failed: {e.details()}", e.code()) from None
        if first is grpc.aio.EOF:
            code = await call.code()
            details = await call.details()
            raise ClientError(f"attach refused: {details}", code)
        assert isinstance(first, pb.ServerMessage)
        if not first.items or first.items[0].reply.WhichOneof("result") != "welcome":
            call.cancel()
            raise ClientError("server did not answer Hello with Welcome")
        return cls(call, first.items[0].reply.welcome, on_event, on_dma)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- accesses

    async def config_read(
        self, bus: int, device: int, function: int, offset: int, size: int
    ) -> int:
        reply, _ = await self._request(
            pb.Request(
                config_read=pb.ConfigRead(
                    bus=bus, device=device, function=function, offset=offset, size=size
                )
            )
        )
        return reply.value

    async def config_write(
        self,
        bus: int,
        device: int,
        function: int,
        offset: int,
        size: int,
        value: int,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[Effect]:
        """Write config space; returns the events it caused (already given to on_event)."""
        _, events = await self._request(
            pb.Request(
                config_write=pb.ConfigWrite(
                    bus=bus, device=device, function=function, offset=offset, size=size, value=value
                )
            ),
            timeout,
        )
        return events

    async def bar_read(
        self, device_id: int, bar: int, offset: int, size: int, timeout: float = DEFAULT_TIMEOUT
    ) -> int:
        reply, _ = await self._request(
            pb.Request(bar_read=pb.BarRead(device_id=device_id, bar=bar, offset=offset, size=size)),
            timeout,
        )
        return reply.value

    def bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None:
        """Posted: queued in order, never answered."""
        self._check_open()
        self._send(
            pb.Request(
                seq=0,
                bar_write=pb.BarWrite(
                    device_id=device_id, bar=bar, offset=offset, size=size, value=value
                ),
            )
        )

    async def reset_device(self, device_id: int, timeout: float = DEFAULT_TIMEOUT) -> list[Effect]:
        _, events = await self._request(
            pb.Request(reset_device=pb.ResetDevice(device_id=device_id)), timeout
        )
        return events

    async def memory_map_update(
        self,
        add: Sequence[MemoryRegion] = (),
        remove: Sequence[AddressRange] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Tell the server guest RAM changed (protocol 1.1); returns once it uses the new map.

        Removals apply before additions. In MEMORY_MODE_SHARED each added region
        needs a `path` the server can open (a memfd as /proc/PID/fd/N).
        """
        await self._request(
            pb.Request(
                memory_map_update=pb.MemoryMapUpdate(
                    add=[region_to_pb(r) for r in add],
                    remove=[pb.AddressRange(base=r.base, size=r.size) for r in remove],
                )
            ),
            timeout,
        )

    def dma_reply(self, request_id: int, data: bytes = b"", error: str = "") -> None:
        """Answer a DmaRequest event (on_dma): `data` for a read, `error` if it failed."""
        self._send(
            pb.Request(
                dma_reply=pb.DmaReply(request_id=request_id, ok=not error, data=data, error=error)
            )
        )

    async def flush(self) -> None:
        """Wait until posted writes are on the wire (a read also orders after them)."""
        if self._closed is None or self._closed.code is None:
            await self._drained.wait()

    async def close(self) -> None:
        if self._closed is None:
            self._closed = ClientError("session closed")
            await self.flush()
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
        self._writer.cancel()
        try:
            await asyncio.wait_for(self._reader, 5)
        except (TimeoutError, asyncio.CancelledError):
            self._reader.cancel()
        self._fail_waiting(self._closed)

    @property
    def closed(self) -> ClientError | None:
        """None while the session works; else why it ended."""
        return self._closed

    # -- internals

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    def _send(self, request: pb.Request) -> None:
        self._outbox.append(request)
        self._drained.clear()
        self._wakeup.set()

    async def _request(
        self, request: pb.Request, timeout: float = DEFAULT_TIMEOUT
    ) -> tuple[pb.Reply, list[Effect]]:
        self._check_open()
        request.seq = seq = next(self._seq)
        future: asyncio.Future[tuple[pb.Reply, list[Effect]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[seq] = future
        self._send(request)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ClientError(f"no reply to request {seq} within {timeout} s") from None
        finally:
            self._waiting.pop(seq, None)

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                batch, self._outbox = self._outbox, []
                if batch:
                    await self._call.write(pb.FrontendMessage(requests=batch))
                if not self._outbox:
                    self._drained.set()
        except grpc.aio.AioRpcError as e:
            self._stream_failed(e.code(), e.details() or "")
        except asyncio.InvalidStateError:
            pass  # the call already ended; the reader reports why
        finally:
            self._drained.set()

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                assert isinstance(message, pb.ServerMessage)
                for item in message.items:
                    self._dispatch(item)
            code = await self._call.code()
            details = await self._call.details()
            self._stream_failed(code, details or "server ended the stream")
        except grpc.aio.AioRpcError as e:
            self._stream_failed(e.code(), e.details() or "")

    def _dispatch(self, item: pb.ServerItem) -> None:
        if item.WhichOneof("kind") == "event":
            if item.event.WhichOneof("kind") == "dma_request":
                if self._on_dma is not None:
                    self._on_dma(item.event.dma_request)
                else:
                    request = item.event.dma_request
                    self.dma_reply(request.request_id, error="frontend has no guest memory access")
                return
            effect = event_from_pb(item.event)
            if effect is None:
                return
            self._events_since_reply.append(effect)
            if self._on_event is not None:
                self._on_event(effect)
            return
        reply = item.reply
        events, self._events_since_reply = self._events_since_reply, []
        future = self._waiting.pop(reply.seq, None)
        if future is not None and not future.done():
            future.set_result((reply, events))

    def _stream_failed(self, code: grpc.StatusCode, details: str) -> None:
        if self._closed is None or self._closed.code is None:
            ok = code == grpc.StatusCode.OK
            self._closed = ClientError(
                "session closed"
                if ok
                else f"device server ended the session: {code.name}: {details}",
                None if ok else code,
            )
        self._fail_waiting(self._closed)

    def _fail_waiting(self, error: ClientError) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        self._waiting.clear()


async def get_topology(channel: grpc.aio.Channel) -> pb.Topology:
    stub = devmodel_pb2_grpc.DeviceModelStub(channel)
    return await stub.GetTopology(pb.TopologyRequest())


async def get_stats(channel: grpc.aio.Channel) -> pb.Stats:
    stub = devmodel_pb2_grpc.DeviceModelStub(channel)
    return await stub.GetStats(pb.StatsRequest())


class SyncSession:
    """A blocking facade: the session lives on a private event-loop thread.

    `on_event` runs on that thread, before the blocking call that caused the
    event returns; so does `on_dma` (MEMORY_MODE_DMA_MESSAGES: answer each
    DmaRequest with `dma_reply`, now or later, from any thread).
    """

    def __init__(
        self,
        target: str,
        options: FrontendOptions = FrontendOptions(),
        on_event: EventHandler | None = None,
        tls: TlsClientFiles | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        on_dma: DmaHandler | None = None,
    ) -> None:
        self.timeout = timeout
        self._on_dma = on_dma
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="devmodel-client", daemon=True
        )
        self._thread.start()
        self._channel: grpc.aio.Channel | None = None
        try:
            self._session: AsyncSession = self._run(self._open(target, options, on_event, tls))
        except BaseException:
            self.close()
            raise
        self.welcome = self._session.welcome
        self.topology = self._session.topology

    async def _open(
        self,
        target: str,
        options: FrontendOptions,
        on_event: EventHandler | None,
        tls: TlsClientFiles | None,
    ) -> AsyncSession:
        self._channel = open_channel(target, tls)
        return await AsyncSession.attach(
            self._channel, options, on_event, on_dma=self._on_dma, timeout=self.timeout
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(self.timeout + 5)

    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        return self._run(self._session.config_read(bus, device, function, offset, size))

    def config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> list[Effect]:
        return self._run(self._session.config_write(bus, device, function, offset, size, value))

    def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int:
        return self._run(self._session.bar_read(device_id, bar, offset, size))

    def bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None:
        """Posted; safe from any thread (each caller's accesses stay in its order)."""
        self._loop.call_soon_threadsafe(self._post_bar_write, device_id, bar, offset, size, value)

    def _post_bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None:
        # On the loop thread, where nobody could catch the error: a posted write
        # to a session that has ended is lost (as one to a pulled card), and the
        # caller's next read or config write reports why.
        with contextlib.suppress(ClientError):
            self._session.bar_write(device_id, bar, offset, size, value)

    def dma_reply(self, request_id: int, data: bytes = b"", error: str = "") -> None:
        """Answer a DmaRequest (on_dma); safe from any thread, like bar_write."""
        if threading.current_thread() is self._thread:
            self._post_dma_reply(request_id, data, error)
        else:
            self._loop.call_soon_threadsafe(self._post_dma_reply, request_id, data, error)

    def _post_dma_reply(self, request_id: int, data: bytes, error: str) -> None:
        with contextlib.suppress(ClientError):  # the session ended: nobody is waiting
            self._session.dma_reply(request_id, data, error)

    def reset_device(self, device_id: int) -> list[Effect]:
        return self._run(self._session.reset_device(device_id))

    def memory_map_update(
        self, add: Sequence[MemoryRegion] = (), remove: Sequence[AddressRange] = ()
    ) -> None:
        self._run(self._session.memory_map_update(add, remove))

    def topology_now(self) -> pb.Topology:
        assert self._channel is not None
        return self._run(get_topology(self._channel))

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            session = getattr(self, "_session", None)
            if session is not None:
                await session.close()
            if self._channel is not None:
                await self._channel.close(None)

        try:
            self._run(shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
