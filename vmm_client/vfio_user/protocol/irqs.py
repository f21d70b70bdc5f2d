"""DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS (spec, "Device Get IRQ Info",
"Device Set IRQs"): the PCI interrupt indexes and the actions on their vectors.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Self

from .header import ProtocolError, unpack_argsz


class IrqIndex(enum.IntEnum):
    """PCI interrupt types (VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_IRQS: Final = len(IrqIndex)

# VFIO_IRQ_INFO_*.
IRQ_INFO_EVENTFD: Final = 1 << 0
IRQ_INFO_MASKABLE: Final = 1 << 1
IRQ_INFO_AUTOMASKED: Final = 1 << 2
IRQ_INFO_NORESIZE: Final = 1 << 3

# VFIO_IRQ_SET_*: one data type and one action per message.
IRQ_SET_DATA_NONE: Final = 1 << 0
IRQ_SET_DATA_BOOL: Final = 1 << 1
IRQ_SET_DATA_EVENTFD: Final = 1 << 2
IRQ_SET_ACTION_MASK: Final = 1 << 3
IRQ_SET_ACTION_UNMASK: Final = 1 << 4
IRQ_SET_ACTION_TRIGGER: Final = 1 << 5
IRQ_SET_DATA_MASK: Final = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK_ALL: Final = (
    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER
)

_IRQ_INFO: Final = struct.Struct("<IIII")  # argsz, flags, index, count
_IRQ_SET: Final = struct.Struct("<IIIII")  # argsz, flags, index, start, count

IRQ_INFO_SIZE: Final = _IRQ_INFO.size


@dataclass(frozen=True, slots=True)
class IrqInfo:
    argsz: int
    flags: int = 0
    index: int = 0
    count: int = 0

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        return cls(*unpack_argsz(_IRQ_INFO, payload, "DEVICE_GET_IRQ_INFO"))

    def encode(self) -> bytes:
        return _IRQ_INFO.pack(self.argsz, self.flags, self.index, self.count)


@dataclass(frozen=True, slots=True)
class IrqSet:
    """DEVICE_SET_IRQS: one action on vectors [start, start + count) of one index.

    QEMU sends eventfds in SCM_RIGHTS with argsz 20 (no data in the payload);
    a DATA_EVENTFD message without descriptors de-assigns those vectors.
    """

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""  # DATA_BOOL: one byte per vector

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        argsz, flags, index, start, count = unpack_argsz(_IRQ_SET, payload, "DEVICE_SET_IRQS")
        self = cls(argsz, flags, index, start, count, bytes(payload[_IRQ_SET.size :]))
        if flags & ~(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL):
            raise ProtocolError(f"DEVICE_SET_IRQS flags {flags:#x} has unknown bits")
        if (flags & IRQ_SET_DATA_MASK).bit_count() != 1:
            raise ProtocolError(f"DEVICE_SET_IRQS flags {flags:#x}: need exactly one DATA_ type")
        if (flags & IRQ_SET_ACTION_MASK_ALL).bit_count() != 1:
            raise ProtocolError(f"DEVICE_SET_IRQS flags {flags:#x}: need exactly one ACTION_")
        if start + count > 0xFFFF_FFFF:
            raise ProtocolError(f"DEVICE_SET_IRQS start {start} + count {count} overflows")
        if flags & IRQ_SET_DATA_BOOL and len(self.data) < count:
            raise ProtocolError(
                f"DEVICE_SET_IRQS DATA_BOOL for {count} vectors carries {len(self.data)} bytes"
            )
        return self

    @property
    def data_type(self) -> int:
        return self.flags & IRQ_SET_DATA_MASK

    @property
    def action(self) -> int:
        return self.flags & IRQ_SET_ACTION_MASK_ALL

    @property
    def disables_all(self) -> bool:
        """count 0 with DATA_NONE: turn off every vector of the index (spec)."""
        return self.count == 0 and self.data_type == IRQ_SET_DATA_NONE

    def selected(self) -> Iterator[int]:
        """The vectors the action applies to (DATA_BOOL filters them)."""
        for i in range(self.count):
            if self.data_type != IRQ_SET_DATA_BOOL or self.data[i]:
                yield self.start + i

    def encode(self) -> bytes:
        return _IRQ_SET.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data
