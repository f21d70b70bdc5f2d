"""Framing: a byte stream with SCM_RIGHTS descriptors cut into whole messages.

File descriptors travel as plain integers; the framer hands them to the
message they arrived with and never closes one (the socket shell does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

from .header import HEADER_SIZE, MAX_MESSAGE_SIZE, FramingError, Header, Message


class Framer:
    """Cut a stream of (bytes, fds) chunks into whole messages.

    Descriptors go to the message holding the last byte of the chunk they came
    with. That is where Linux puts them: a stream recvmsg stops right after the
    segment that carried SCM_RIGHTS, and a sender's descriptors ride on the
    segment holding the start of its sendmsg, so the receive that brings them
    ends inside the message they were sent with. Descriptors that come with no
    bytes cannot be placed and are handed back to the caller to close.
    """

    __slots__ = ("_broken", "_buffer", "_consumed", "_fd_groups", "_received", "max_size")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._consumed = 0  # stream position of _buffer[0]
        self._received = 0  # stream position after the last byte fed
        self._fd_groups: deque[tuple[int, tuple[int, ...]]] = deque()  # (position, fds)
        self._broken: FramingError | None = None

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[int]:
        """Add received bytes and descriptors; returns descriptors it could not place."""
        if fds and not data:
            return list(fds)
        if fds:
            self._fd_groups.append((self._received + len(data) - 1, tuple(fds)))
        self._buffer += data
        self._received += len(data)
        return []

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes arrive."""
        if self._broken is not None:
            raise self._broken
        if len(self._buffer) < HEADER_SIZE:
            return None
        header = Header.decode(self._buffer)
        if header.size < HEADER_SIZE:
            self._broken = FramingError(
                f"message size {header.size} is smaller than the {HEADER_SIZE}-byte header",
                header,
            )
            raise self._broken
        if header.size > self.max_size:
            self._broken = FramingError(
                f"message size {header.size} exceeds the {self.max_size}-byte limit", header
            )
            raise self._broken
        if len(self._buffer) < header.size:
            return None
        payload = bytes(self._buffer[HEADER_SIZE : header.size])
        del self._buffer[: header.size]
        end = self._consumed + header.size
        self._consumed = end
        fds: list[int] = []
        while self._fd_groups and self._fd_groups[0][0] < end:
            fds.extend(self._fd_groups.popleft()[1])
        return Message(header, payload, tuple(fds))

    def messages(self) -> Iterator[Message]:
        while (message := self.next_message()) is not None:
            yield message

    def take_fds(self) -> list[int]:
        """Every descriptor not yet handed out with a message (close them on teardown)."""
        fds = [fd for _, group in self._fd_groups for fd in group]
        self._fd_groups.clear()
        return fds

    @property
    def buffered(self) -> int:
        return len(self._buffer)
