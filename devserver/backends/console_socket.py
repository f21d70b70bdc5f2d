"""A virtio-console port's host end: a UNIX socket the server listens on, as a
ByteStream (ports.py; virtio 1.2 §5.3 Console Device).

One client at a time: a second connection while one is attached is closed at
once. Bytes from the client wait in a buffer of at most RX_LIMIT bytes for the
device to take them; at the limit the socket is no longer read (back-pressure
reaches the client through the kernel's socket buffers), and reading resumes
once the device has taken some (reliability.md C9: never unbounded buffering).
Bytes for the client are refused (the device counts them dropped) with no client
attached, or when more than TX_LIMIT bytes already wait to go out to a client
that does not read.

The socket lives on the service's event loop; the device calls readable/read/
write from a worker thread, so the shared state is under a threading.Lock and
anything touching the transport is handed to the loop (call_soon_threadsafe).
`on_readable` is called on the loop whenever bytes from the client arrive and
when a client comes or goes (a multiport driver hears of it as PORT_OPEN).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Final, cast

from ..errors import ConfigError

RX_LIMIT: Final = 64 * 1024
TX_LIMIT: Final = 256 * 1024


class _Client(asyncio.Protocol):
    def __init__(self, owner: SocketConsole) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not necessarily an asyncio.Transport
        # subclass (uvloop's UnixTransport is not): it has the same methods.
        self.transport = cast("asyncio.Transport", transport)
        self.owner._connected(self)

    def data_received(self, data: bytes) -> None:
        self.owner._received(self, data)

    def eof_received(self) -> bool | None:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._disconnected(self)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        self.owner._drained(self)


class SocketConsole:
    """A listening UNIX socket (bound at construction, so a bad path fails the
    start); `start()` serves it on the running loop, `close()` stops it."""

    def __init__(self, path: str) -> None:
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ConfigError(f"virtio-console socket={path!r} exists and is not a socket")
            os.unlink(path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(1)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on virtio-console socket {path!r}: {e}") from None
        self.path = path
        self._sock: socket.socket | None = sock
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._client: _Client | None = None
        self._incoming = bytearray()
        self._paused = False
        self._tx_pending = 0  # handed to the loop, not yet to the transport
        self._tx_buffered = 0  # in the transport's buffer when last looked at
        self.on_readable: Callable[[], None] | None = None
        self.on_resize: Callable[[], None] | None = None  # never called: a socket has no size
        self.drop_sink: Callable[[int], None] | None = None
        self.dropped = 0  # bytes for the client refused (none attached, or it does not read)
        self.clients = 0
        self.refused = 0

    # -- lifecycle (on the loop)

    async def start(self) -> None:
        if self._sock is None or self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_unix_server(
            lambda: _Client(self), sock=self._sock, start_serving=True
        )

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        client = self._client
        if client is not None and client.transport is not None:
            client.transport.close()
        if server is not None:
            await server.wait_closed()
        self.close()

    def close(self) -> None:
        """Release the socket without a loop (the server did not start)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._server is None:
                sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # -- the client (on the loop)

    def _connected(self, client: _Client) -> None:
        assert client.transport is not None
        with self._lock:
            busy = self._client is not None
            if not busy:
                self._client = client
                self._tx_pending = self._tx_buffered = 0
                self._paused = len(self._incoming) >= RX_LIMIT
            pause = self._paused
        if busy:
            self.refused += 1
            client.transport.close()
            return
        self.clients += 1
        client.transport.set_write_buffer_limits(high=TX_LIMIT // 2)
        if pause:
            client.transport.pause_reading()
        self._wake()  # a multiport driver is told the port's host end opened

    def _received(self, client: _Client, data: bytes) -> None:
        with self._lock:
            if client is not self._client:
                return
            self._incoming += data
            pause = len(self._incoming) >= RX_LIMIT and not self._paused
            if pause:
                self._paused = True
        if pause and client.transport is not None:
            client.transport.pause_reading()
        self._wake()

    def _disconnected(self, client: _Client) -> None:
        with self._lock:
            gone = client is self._client
            if gone:
                self._client = None
                self._paused = False
        if gone:
            self._wake()

    def _wake(self) -> None:
        callback = self.on_readable
        if callback is not None:
            callback()

    def _drained(self, client: _Client) -> None:
        with self._lock:
            if client is self._client and client.transport is not None:
                self._tx_buffered = client.transport.get_write_buffer_size()

    def _resume(self) -> None:
        client = self._client
        with self._lock:
            resume = self._paused and len(self._incoming) < RX_LIMIT and client is not None
            if resume:
                self._paused = False
        if resume and client is not None and client.transport is not None:
            client.transport.resume_reading()

    def _send(self, client: _Client, data: bytes) -> None:
        with self._lock:
            self._tx_pending -= len(data)
            if client is not self._client or client.transport is None:
                return
        if client.transport.is_closing():
            return
        client.transport.write(data)
        with self._lock:
            self._tx_buffered = client.transport.get_write_buffer_size()

    # -- ByteStream (any thread)

    @property
    def connected(self) -> bool:
        return self._client is not None

    def readable(self) -> int:
        with self._lock:
            return len(self._incoming)

    def read(self, limit: int) -> bytes:
        with self._lock:
            data = bytes(self._incoming[:limit])
            del self._incoming[:limit]
            resume = self._paused and len(self._incoming) < RX_LIMIT
        if resume and self._loop is not None:
            self._call(self._resume)
        return data

    def window_size(self) -> tuple[int, int] | None:
        return None  # the configured cols x rows stand

    def write(self, data: bytes) -> bool:
        with self._lock:
            client = self._client
            if client is None or self._tx_pending + self._tx_buffered + len(data) > TX_LIMIT:
                self._count_dropped(len(data))
                return False
            self._tx_pending += len(data)
        if not self._call(self._send, client, bytes(data)):
            with self._lock:
                self._tx_pending -= len(data)
                self._count_dropped(len(data))
            return False
        return True

    def _count_dropped(self, n: int) -> None:
        """Under self._lock."""
        self.dropped += n
        sink = self.drop_sink
        if sink is not None:
            sink(n)

    def _call(self, callback: Callable[..., None], *args: object) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            if _on_loop(loop):
                loop.call_soon(callback, *args)
            else:
                loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed meanwhile
            return False
        return True


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
