"""What the core reports back to its shells: past-tense facts, never commands.

Every core entry point (config write, BAR write, reset) returns a list of
these; the gRPC shell streams them to the frontend in order, a KVM shell
turns them into routing changes and memslot moves (crosvm's ConfigWriteResult).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BarKind(enum.IntEnum):
    IO = 1
    MEM32 = 2
    MEM64 = 3
    ROM = 4

    @property
    def is_memory(self) -> bool:
        return self is not BarKind.IO


@dataclass(frozen=True, slots=True)
class AddressRange:
    base: int
    size: int

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.base + self.size

    def overlaps(self, other: AddressRange) -> bool:
        return self.base < other.end and other.base < self.end

    def contains(self, address: int, length: int = 1) -> bool:
        return self.base <= address and address + length <= self.end

    def __str__(self) -> str:
        return f"[{self.base:#x}, {self.end:#x})"


@dataclass(frozen=True, slots=True)
class SharedMemory:
    """Where the bytes of a shared-memory BAR live (a file both sides map)."""

    path: str
    file_offset: int
    size: int


@dataclass(frozen=True, slots=True)
class BarDecodeChanged:
    """A BAR started, stopped or moved decoding.

    `old` is what it decoded before (None: nothing), `new` what it decodes now
    (None: nothing). `generation` counts decode changes on the bus.
    """

    device_id: int
    bar: int
    kind: BarKind
    prefetchable: bool
    old: AddressRange | None
    new: AddressRange | None
    backing: SharedMemory | None
    generation: int

    @property
    def decoding(self) -> bool:
        return self.new is not None


@dataclass(frozen=True, slots=True)
class MsiRaised:
    device_id: int
    vector: int
    address: int
    data: int


@dataclass(frozen=True, slots=True)
class IntxChanged:
    device_id: int
    pin: int
    asserted: bool


@dataclass(frozen=True, slots=True)
class DeviceNeedsReset:
    device_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class DmaRequested:
    """A bus-mastering function wants guest memory read or written.

    The shell carries it out (from shared RAM, or by asking the frontend) and
    hands the outcome back with `PciFunction.dma_completed(token, ...)`; the
    function never waits for it. `data` is what to write (empty for reads).
    """

    device_id: int
    token: int
    address: int
    length: int
    write: bool
    data: bytes = b""


Effect = BarDecodeChanged | MsiRaised | IntxChanged | DeviceNeedsReset | DmaRequested
