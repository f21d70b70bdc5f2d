"""REGION_READ, REGION_WRITE and REGION_WRITE_MULTI (spec, "Region Read",
"Region Write", "Region Write Multiple"), and cutting an access into the
naturally aligned pieces the device server takes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Self

from .header import ProtocolError, need_payload

MAX_WRITE_MULTI: Final = 200  # QEMU's VFIO_USER_MULTI_MAX

_REGION_RW: Final = struct.Struct("<QII")  # offset, region, count
_WRITE_MULTI_COUNT: Final = struct.Struct("<Q")
_WRITE_ONE: Final = struct.Struct("<QII8s")  # offset, region, count, data[8]


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """REGION_READ/REGION_WRITE requests and replies (data only where it travels)."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    @classmethod
    def decode_read(cls, payload: bytes) -> Self:
        need_payload(payload, _REGION_RW.size, "REGION_READ")
        return cls(*_REGION_RW.unpack_from(payload))

    @classmethod
    def decode_write(cls, payload: bytes) -> Self:
        need_payload(payload, _REGION_RW.size, "REGION_WRITE")
        offset, region, count = _REGION_RW.unpack_from(payload)
        data = payload[_REGION_RW.size :]
        if len(data) != count:
            raise ProtocolError(f"REGION_WRITE count {count} but {len(data)} bytes of data")
        return cls(offset, region, count, bytes(data))

    @classmethod
    def decode_reply(cls, payload: bytes) -> Self:
        """A REGION_READ reply: data follows; a REGION_WRITE reply has none."""
        need_payload(payload, _REGION_RW.size, "REGION_READ/WRITE reply")
        offset, region, count = _REGION_RW.unpack_from(payload)
        data = payload[_REGION_RW.size :]
        if data and len(data) != count:
            raise ProtocolError(f"region reply count {count} but {len(data)} bytes of data")
        return cls(offset, region, count, bytes(data))

    def encode(self) -> bytes:
        return _REGION_RW.pack(self.offset, self.region, self.count) + self.data


@dataclass(frozen=True, slots=True)
class WriteMulti:
    """REGION_WRITE_MULTI: up to 200 writes of at most 8 bytes each."""

    writes: tuple[RegionAccess, ...]

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        need_payload(payload, _WRITE_MULTI_COUNT.size, "REGION_WRITE_MULTI")
        (count,) = _WRITE_MULTI_COUNT.unpack_from(payload)
        if not 0 < count <= MAX_WRITE_MULTI:
            raise ProtocolError(f"REGION_WRITE_MULTI of {count} writes; 1..{MAX_WRITE_MULTI}")
        expect = _WRITE_MULTI_COUNT.size + count * _WRITE_ONE.size
        if len(payload) < expect:
            raise ProtocolError(
                f"REGION_WRITE_MULTI of {count} writes needs {expect} bytes, got {len(payload)}"
            )
        writes = []
        for i in range(count):
            offset, region, size, data = _WRITE_ONE.unpack_from(
                payload, _WRITE_MULTI_COUNT.size + i * _WRITE_ONE.size
            )
            if not 0 < size <= 8:
                raise ProtocolError(f"REGION_WRITE_MULTI write {i} has count {size}; 1..8")
            writes.append(RegionAccess(offset, region, size, data[:size]))
        return cls(tuple(writes))

    def encode(self) -> bytes:
        out = [_WRITE_MULTI_COUNT.pack(len(self.writes))]
        out.extend(
            _WRITE_ONE.pack(w.offset, w.region, w.count, w.data.ljust(8, b"\0"))
            for w in self.writes
        )
        return b"".join(out)


def split_access(offset: int, count: int, max_size: int) -> list[tuple[int, int]]:
    """Cut [offset, offset + count) into naturally aligned 1/2/4/8-byte pieces.

    Pieces are as large as alignment, `max_size` (a power of two, 1..8) and the
    remaining length allow, so a 4 KiB config read becomes 1024 dword reads and
    an odd 3-byte write at an even offset becomes 2 + 1.
    """
    if max_size not in (1, 2, 4, 8):
        raise ValueError(f"max_size {max_size} is not 1, 2, 4 or 8")
    pieces = []
    end = offset + count
    while offset < end:
        size = max_size
        while size > 1 and (offset % size or offset + size > end):
            size //= 2
        pieces.append((offset, size))
        offset += size
    return pieces


def all_ones(count: int) -> bytes:
    """What a read of a vanished device returns (a master abort)."""
    return b"\xff" * count
