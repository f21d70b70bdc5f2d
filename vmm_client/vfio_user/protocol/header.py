"""vfio-user message header, commands, limits and errors (spec, "Header", "Commands").

The header is `<HHIII`: message id, command, size (header included), flags,
errno. All integers are little-endian (the spec says host order; the hosts
we run on are x86-64 and aarch64, both little-endian). A decode error is a
`ProtocolError` carrying the errno the peer should get; a `FramingError`
means the byte stream itself can no longer be trusted and the connection
must close.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import Final, Self


class Command(enum.IntEnum):
    """Message commands (spec, "Commands")."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11  # server -> client
    DMA_WRITE = 12  # server -> client
    DEVICE_RESET = 13
    # 14 was VFIO_USER_DIRTY_PAGES in early drafts; the spec no longer defines it.
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# Header flags.
FLAG_TYPE_MASK: Final = 0xF
TYPE_COMMAND: Final = 0x0
TYPE_REPLY: Final = 0x1
FLAG_NO_REPLY: Final = 0x10
FLAG_ERROR: Final = 0x20

# Sizes and limits.
HEADER_SIZE: Final = 16
DEFAULT_MAX_DATA_XFER: Final = 1 << 20  # spec default, and what we offer
MAX_DATA_XFER_LIMIT: Final = 64 << 20  # QEMU's VFIO_USER_MAX_MAX_XFER
# The largest message we accept: a REGION_WRITE (or a DMA_READ reply) of
# max_data_xfer_size bytes plus its headers.
MAX_MESSAGE_SIZE: Final = HEADER_SIZE + 16 + DEFAULT_MAX_DATA_XFER
PAGE_SIZE: Final = 4096

_HEADER: Final = struct.Struct("<HHIII")

U64: Final = 1 << 64  # Python ints do not wrap: 64-bit range checks use this


class ProtocolError(Exception):
    """A message the peer sent is malformed; reply with `errno` and go on."""

    def __init__(self, message: str, errno_value: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno_value


class FramingError(ProtocolError):
    """The byte stream cannot be trusted any more: close the connection.

    `header` is the offending header when one could be decoded, so the shell
    can still send an error reply before it closes.
    """

    def __init__(self, message: str, header: Header | None = None) -> None:
        super().__init__(message, errno.EINVAL)
        self.header = header


def need_payload(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise ProtocolError(f"{what}: payload of {len(payload)} bytes, need at least {size}")


def unpack_argsz(layout: struct.Struct, payload: bytes, what: str) -> tuple[int, ...]:
    """The fields of a <linux/vfio.h>-style struct whose first u32 is `argsz`, the
    size the sender claims: never less than the struct itself."""
    need_payload(payload, layout.size, what)
    fields: tuple[int, ...] = layout.unpack_from(payload)
    if fields[0] < layout.size:
        raise ProtocolError(f"{what} argsz {fields[0]} < {layout.size}")
    return fields


@dataclass(frozen=True, slots=True)
class Header:
    msg_id: int
    command: int
    size: int  # whole message, header included
    flags: int = TYPE_COMMAND
    error: int = 0

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        if len(data) - offset < HEADER_SIZE:
            raise FramingError(f"short header: {len(data) - offset} of {HEADER_SIZE} bytes")
        return cls(*_HEADER.unpack_from(data, offset))

    def encode(self) -> bytes:
        return _HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @property
    def is_reply(self) -> bool:
        return self.flags & FLAG_TYPE_MASK == TYPE_REPLY

    @property
    def is_command(self) -> bool:
        return self.flags & FLAG_TYPE_MASK == TYPE_COMMAND

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def command_name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"command {self.command}"


@dataclass(frozen=True, slots=True)
class Message:
    """One whole message off the wire, with the descriptors that came with it."""

    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()


def encode_message(
    msg_id: int, command: int, payload: bytes = b"", *, flags: int = TYPE_COMMAND, error: int = 0
) -> bytes:
    size = HEADER_SIZE + len(payload)
    return _HEADER.pack(msg_id & 0xFFFF, command, size, flags, error) + payload


def encode_reply(request: Header, payload: bytes = b"") -> bytes:
    return encode_message(request.msg_id, request.command, payload, flags=TYPE_REPLY)


def encode_error(request: Header, errno_value: int) -> bytes:
    """An error reply carries the header only (spec, "Header")."""
    return encode_message(
        request.msg_id, request.command, flags=TYPE_REPLY | FLAG_ERROR, error=errno_value
    )
