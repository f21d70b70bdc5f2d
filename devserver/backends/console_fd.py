"""A virtio-console port's host end on file descriptors (a pty's master, the
server's stdio), as a ByteStream (ports.py; virtio 1.2 §5.3 Console Device).
console_pty.py and console_stdio.py open the descriptors; this moves the bytes.

Bytes from the host wait in a buffer of at most RX_LIMIT bytes for the device to
take them; at the limit the descriptor is no longer read (the kernel's tty
buffer then pushes back on the writer), and reading resumes once the device
has taken some. Bytes for the host wait in a buffer of at most TX_LIMIT bytes
while the descriptor cannot take them; past it they are refused, and the device
counts them dropped (reliability.md C9: never unbounded buffering).

A terminal's size is polled (TIOCGWINSZ, every SIZE_POLL seconds: the server is
not the terminal's session leader, so SIGWINCH would not reach it); a change
calls `on_resize` on the loop.

The descriptors live on the service's event loop (add_reader/add_writer); the
device calls readable/read/write from a worker thread, so the shared state is
under a threading.Lock and anything touching the descriptors is handed to the
loop (call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
import termios
import threading
from collections.abc import Callable
from typing import Final

RX_LIMIT: Final = 64 * 1024
TX_LIMIT: Final = 256 * 1024
READ_CHUNK: Final = 4096
SIZE_POLL: Final = 0.5
WINSIZE: Final = struct.Struct("HHHH")  # struct winsize: rows, cols, xpixel, ypixel

log = logging.getLogger(__name__)


def terminal_size(fd: int) -> tuple[int, int] | None:
    """(cols, rows) of the terminal on `fd`; None when it is no terminal or
    reports no size (0x0, a fresh pty)."""
    try:
        raw = fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(WINSIZE.size))
    except OSError:
        return None
    rows, cols, _, _ = WINSIZE.unpack(raw)
    if not rows or not cols:
        return None
    return cols, rows


def set_terminal_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, WINSIZE.pack(rows, cols, 0, 0))


class FdConsole:
    """Reads `read_fd` (None: no input) and writes `write_fd`; `size_fd` (None:
    not a terminal) is polled for the window size. Descriptors are not closed
    here: the subclass that opened them does."""

    kind = "fd"

    def __init__(self, read_fd: int | None, write_fd: int, size_fd: int | None) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._size_fd = size_fd
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._incoming = bytearray()
        self._outgoing = bytearray()
        self._reading = False
        self._writing = False
        self._eof = False
        self._poll: asyncio.TimerHandle | None = None
        self._size = terminal_size(size_fd) if size_fd is not None else None
        self.on_readable: Callable[[], None] | None = None
        self.on_resize: Callable[[], None] | None = None
        self.drop_sink: Callable[[int], None] | None = None
        self.dropped = 0

    # -- lifecycle (on the loop)

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._start_reading()
        if self._size_fd is not None:
            self._poll = self._loop.call_later(SIZE_POLL, self._poll_size)

    async def aclose(self) -> None:
        self._stop()
        self.close()

    def _stop(self) -> None:
        loop, self._loop = self._loop, None
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if loop is None or loop.is_closed():
            return
        if self._reading and self._read_fd is not None:
            loop.remove_reader(self._read_fd)
        if self._writing:
            loop.remove_writer(self._write_fd)
        self._reading = self._writing = False

    def close(self) -> None:
        """Release what the subclass opened (override); the loop side is stopped."""

    # -- the descriptors (on the loop)

    def _start_reading(self) -> None:
        loop = self._loop
        if loop is None or self._reading or self._eof or self._read_fd is None:
            return
        with self._lock:
            if len(self._incoming) >= RX_LIMIT:
                return
        try:
            loop.add_reader(self._read_fd, self._on_readable)
        except (OSError, ValueError) as e:  # a regular file or /dev/null: no input
            log.info("console %s: input not pollable (%s); reading nothing", self.kind, e)
            self._eof = True
            return
        self._reading = True

    def _pause_reading(self) -> None:
        loop = self._loop
        if loop is not None and self._reading and self._read_fd is not None:
            loop.remove_reader(self._read_fd)
        self._reading = False

    def _on_readable(self) -> None:
        assert self._read_fd is not None
        try:
            data = os.read(self._read_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            # EIO: a pty master whose slave side is gone; anything else is as bad.
            if e.errno != errno.EIO:
                log.warning("console %s: read failed: %s", self.kind, e)
            data = b""
        if not data:
            self._eof = True
            self._pause_reading()
            return
        with self._lock:
            self._incoming += data
            full = len(self._incoming) >= RX_LIMIT
        if full:
            self._pause_reading()
        callback = self.on_readable
        if callback is not None:
            callback()

    def _flush(self) -> None:
        loop = self._loop
        with self._lock:
            data = bytes(self._outgoing[: READ_CHUNK * 16])
        written = 0
        if data:
            try:
                written = os.write(self._write_fd, data)
            except BlockingIOError:
                written = 0
            except OSError as e:
                # The peer is gone for good: what waits is dropped and counted.
                log.warning("console %s: write failed: %s", self.kind, e)
                with self._lock:
                    self._count_dropped(len(self._outgoing))
                    self._outgoing.clear()
                written = 0
        with self._lock:
            del self._outgoing[:written]
            left = bool(self._outgoing)
        if loop is None:
            return
        if left and not self._writing:
            loop.add_writer(self._write_fd, self._flush)
            self._writing = True
        elif not left and self._writing:
            loop.remove_writer(self._write_fd)
            self._writing = False

    def _poll_size(self) -> None:
        loop = self._loop
        if loop is None or self._size_fd is None:
            return
        size = terminal_size(self._size_fd)
        if size is not None and size != self._size:
            self._size = size
            callback = self.on_resize
            if callback is not None:
                callback()
        self._poll = loop.call_later(SIZE_POLL, self._poll_size)

    def _count_dropped(self, n: int) -> None:
        """Under self._lock: the device's worker and the loop both drop."""
        if n <= 0:
            return
        self.dropped += n
        sink = self.drop_sink
        if sink is not None:
            sink(n)

    # -- ByteStream + ConsoleHostEnd (any thread)

    @property
    def connected(self) -> bool:
        return True

    def window_size(self) -> tuple[int, int] | None:
        return self._size

    def readable(self) -> int:
        with self._lock:
            return len(self._incoming)

    def read(self, limit: int) -> bytes:
        with self._lock:
            data = bytes(self._incoming[:limit])
            del self._incoming[:limit]
            resume = not self._reading and len(self._incoming) < RX_LIMIT
        if resume and data:
            self._call(self._start_reading)
        return data

    def write(self, data: bytes) -> bool:
        with self._lock:
            fits = len(self._outgoing) + len(data) <= TX_LIMIT
            if fits:
                self._outgoing += data
        if not fits or not self._call(self._flush):
            if fits:
                with self._lock:
                    # Not handed to a loop: take it back out (from the end).
                    del self._outgoing[len(self._outgoing) - len(data) :]
            with self._lock:
                self._count_dropped(len(data))
            return False
        return True

    def _call(self, callback: Callable[[], None]) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop closed meanwhile
            return False
        return True
