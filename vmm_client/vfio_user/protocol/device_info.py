"""DEVICE_GET_INFO (spec, "Device Get Info"): flags and how many regions and IRQs."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Self

from .header import unpack_argsz

# VFIO_DEVICE_FLAGS_* (DEVICE_GET_INFO).
DEVICE_FLAGS_RESET: Final = 1 << 0
DEVICE_FLAGS_PCI: Final = 1 << 1

_DEVICE_INFO: Final = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs

DEVICE_INFO_SIZE: Final = _DEVICE_INFO.size


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    argsz: int
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        return cls(*unpack_argsz(_DEVICE_INFO, payload, "DEVICE_GET_INFO"))

    def encode(self) -> bytes:
        return _DEVICE_INFO.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)
