"""DEVICE_GET_REGION_INFO and DEVICE_GET_REGION_IO_FDS (spec, "Device Get Region
Info"): the PCI regions (BARs, ROM, config space, VGA) and their flags.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Self

from .header import need_payload, unpack_argsz

# PCI region indexes (VFIO_PCI_*_REGION_INDEX).
REGION_BAR0: Final = 0
REGION_BAR5: Final = 5
REGION_ROM: Final = 6
REGION_CONFIG: Final = 7
REGION_VGA: Final = 8
NUM_REGIONS: Final = 9

# VFIO_REGION_INFO_FLAG_*.
REGION_INFO_FLAG_READ: Final = 1 << 0
REGION_INFO_FLAG_WRITE: Final = 1 << 1
REGION_INFO_FLAG_MMAP: Final = 1 << 2
REGION_INFO_FLAG_CAPS: Final = 1 << 3

_REGION_INFO: Final = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
_REGION_IO_FDS: Final = struct.Struct("<IIII")  # argsz, flags, index, count

REGION_INFO_SIZE: Final = _REGION_INFO.size


@dataclass(frozen=True, slots=True)
class RegionInfo:
    argsz: int
    flags: int = 0
    index: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        return cls(*unpack_argsz(_REGION_INFO, payload, "DEVICE_GET_REGION_INFO"))

    def encode(self) -> bytes:
        return _REGION_INFO.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )


@dataclass(frozen=True, slots=True)
class RegionIoFds:
    argsz: int
    flags: int
    index: int
    count: int

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        need_payload(payload, _REGION_IO_FDS.size, "DEVICE_GET_REGION_IO_FDS")
        return cls(*_REGION_IO_FDS.unpack_from(payload))

    def encode(self) -> bytes:
        return _REGION_IO_FDS.pack(self.argsz, self.flags, self.index, self.count)
