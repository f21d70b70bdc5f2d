"""DMA_MAP and DMA_UNMAP: the client grants and withdraws guest-memory windows
(spec, "DMA Map", "DMA Unmap"; VFIO type1 semantics).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Self

from .header import U64, ProtocolError, unpack_argsz

# VFIO_DMA_MAP_FLAG_* and VFIO_DMA_UNMAP_FLAG_*.
DMA_MAP_FLAG_READ: Final = 1 << 0
DMA_MAP_FLAG_WRITE: Final = 1 << 1
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: Final = 1 << 0
DMA_UNMAP_FLAG_ALL: Final = 1 << 1

_DMA_MAP: Final = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
_DMA_UNMAP: Final = struct.Struct("<IIQQ")  # argsz, flags, address, size


@dataclass(frozen=True, slots=True)
class DmaMap:
    argsz: int
    flags: int
    offset: int  # in the fd sent with the message; 0 without one
    address: int
    size: int

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        self = cls(*unpack_argsz(_DMA_MAP, payload, "DMA_MAP"))
        if self.flags & ~(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE):
            raise ProtocolError(f"DMA_MAP flags {self.flags:#x} has unknown bits")
        if self.size == 0:
            raise ProtocolError("DMA_MAP of 0 bytes")
        if self.address + self.size > U64:
            raise ProtocolError(
                f"DMA_MAP [{self.address:#x} +{self.size:#x}) wraps past the 64-bit space"
            )
        if self.offset + self.size > U64:
            raise ProtocolError("DMA_MAP offset + size wraps")
        return self

    def encode(self) -> bytes:
        return _DMA_MAP.pack(self.argsz, self.flags, self.offset, self.address, self.size)


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    argsz: int
    flags: int
    address: int
    size: int

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        self = cls(*unpack_argsz(_DMA_UNMAP, payload, "DMA_UNMAP"))
        if self.flags & ~(DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | DMA_UNMAP_FLAG_ALL):
            raise ProtocolError(f"DMA_UNMAP flags {self.flags:#x} has unknown bits")
        if not self.flags & DMA_UNMAP_FLAG_ALL and self.address + self.size > U64:
            raise ProtocolError("DMA_UNMAP range wraps past the 64-bit space")
        return self

    def encode(self) -> bytes:
        return _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)
