"""File descriptors over the vfio-user UNIX socket (SCM_RIGHTS), and their ownership.

Every descriptor a client sends is ours to close: `ReceivedFds` lets a
handler take the ones it keeps and closes the rest. asyncio has no
sock_recvmsg, so receiving with descriptors waits on loop.add_reader.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Final

# Room for more descriptors than we allow, so a peer that sends too many is
# caught and refused rather than silently truncated by the kernel.
MAX_RECEIVED_FDS: Final = 64
_ANCILLARY_SIZE: Final = socket.CMSG_SPACE(MAX_RECEIVED_FDS * array.array("i").itemsize)


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ReceivedFds:
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


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _until(sock: socket.socket, *, writable: bool) -> None:
    """Wait until the non-blocking socket is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fileno = sock.fileno()
    if writable:
        loop.add_writer(fileno, _wake, ready)
    else:
        loop.add_reader(fileno, _wake, ready)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fileno)
        else:
            loop.remove_reader(fileno)


async def recv_with_fds(sock: socket.socket, buffer: memoryview) -> tuple[bytes, list[int], bool]:
    """One recvmsg into `buffer`: (bytes, received fds, control data truncated).

    A peer that reset the connection reads as end of stream (no bytes).
    """
    while True:
        try:
            size, ancillary, flags, _ = sock.recvmsg_into(
                [buffer], _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            await _until(sock, writable=False)
            continue
        except (ConnectionResetError, BrokenPipeError):
            return b"", [], False
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        return bytes(buffer[:size]), fds, bool(flags & socket.MSG_CTRUNC)


async def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send `data` with `fds` attached to its first byte (SCM_RIGHTS)."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    while True:
        try:
            sent = sock.sendmsg([data], ancillary)
            break
        except BlockingIOError:
            await _until(sock, writable=True)
    if sent < len(data):
        await asyncio.get_running_loop().sock_sendall(sock, data[sent:])
