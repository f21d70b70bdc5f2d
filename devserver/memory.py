"""Guest memory behind one interface (architecture.md, "Guest memory behind one interface").

Devices never touch guest RAM themselves: a bus-mastering function returns a
`DmaRequested` effect and its shell carries it out against a `GuestMemory`:

    SharedGuestMemory   (devserver.service.guest_memory) the frontend's RAM
                        files and memfds, mapped MAP_SHARED (MEMORY_MODE_SHARED)
    BytearrayMemory     (here) bytearrays, for tests
    the frontend itself (MEMORY_MODE_DMA_MESSAGES: DmaRequest events)

Every guest-physical range is checked the way reliability.md C3 asks: the
whole of [gpa, gpa + length) must lie in RAM regions, the end is computed with
an explicit check against 2^64 instead of trusting arithmetic, a range may run
from one region into the next only when they are adjacent (both are RAM: the
table holds nothing else), and no access is larger than `MAX_ACCESS`, so a
guest-chosen length never becomes an allocation. Frontend memory tables are
checked as C12 asks: no overlaps, no empty or wrapping regions, a bounded
number of them, all or nothing per update.

Pure: imports only the standard library and the core.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

from .effects import AddressRange, DmaRequested
from .errors import GuestMemoryError, MemoryMapError

ADDRESS_SPACE: Final = 1 << 64
# The largest single read or write: DMA payloads travel in one gRPC message
# (protocol.MAX_MESSAGE_BYTES is 4 MiB) and a device must not make the server
# allocate whatever a guest register says.
MAX_ACCESS: Final = 1 << 20
# Regions per frontend: QEMU maps a few RAM ranges plus the PAM-toggled pieces
# below 1 MiB while SeaBIOS runs; far below this.
MAX_REGIONS: Final = 256


def check_range(gpa: int, length: int) -> int:
    """The end of [gpa, gpa + length), or GuestMemoryError if it cannot be a guest range."""
    if not 0 <= gpa < ADDRESS_SPACE:
        raise GuestMemoryError(f"guest address {gpa:#x} is outside the 64-bit address space")
    if not 0 <= length <= MAX_ACCESS:
        raise GuestMemoryError(f"access of {length} bytes; at most {MAX_ACCESS} at a time")
    if length > ADDRESS_SPACE - gpa:  # the check, not the sum: gpa + length would wrap
        raise GuestMemoryError(f"[{gpa:#x} +{length:#x}) wraps past the top of the address space")
    return gpa + length


class GuestMemory(Protocol):
    """Read and write guest-physical memory; GuestMemoryError outside RAM."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """A frontend's RAM region (Hello.memory.regions, MemoryMapUpdate.add)."""

    guest_address: int
    size: int
    path: str = ""  # a file the server maps; MEMORY_MODE_SHARED only
    file_offset: int = 0
    read_only: bool = False

    @property
    def end(self) -> int:
        return self.guest_address + self.size


# ---------------------------------------------------------------- the region table

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    base: int
    size: int
    value: T

    @property
    def end(self) -> int:
        return self.base + self.size

    def __str__(self) -> str:
        return f"[{self.base:#x}, {self.end:#x})"


class RegionMap(Generic[T]):
    """Non-overlapping guest ranges, sorted, found by bisection."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._entries: list[Entry[T]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries))

    def find(self, gpa: int) -> Entry[T] | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._entries[i].end:
            return self._entries[i]
        return None

    def overlapping(self, base: int, size: int) -> list[Entry[T]]:
        """Entries sharing at least one byte with [base, base + size)."""
        # Entries are disjoint and sorted, so their ends are sorted too: walk
        # back from the last entry starting before the range's end.
        i = bisect.bisect_left(self._starts, base + size) - 1
        found = []
        while i >= 0 and self._entries[i].end > base:
            found.append(self._entries[i])
            i -= 1
        found.reverse()
        return found

    def insert(self, base: int, size: int, value: T) -> Entry[T]:
        if size <= 0:
            raise MemoryMapError(f"region at {base:#x} has size {size}")
        clash = self.overlapping(base, size)
        if clash:
            raise MemoryMapError(f"[{base:#x}, {base + size:#x}) overlaps {clash[0]}")
        entry = Entry(base, size, value)
        i = bisect.bisect_left(self._starts, base)
        self._starts.insert(i, base)
        self._entries.insert(i, entry)
        return entry

    def remove(self, entry: Entry[T]) -> None:
        i = bisect.bisect_left(self._starts, entry.base)
        if i == len(self._entries) or self._entries[i] is not entry:
            raise KeyError(str(entry))
        del self._starts[i]
        del self._entries[i]

    def within(self, base: int, size: int) -> list[Entry[T]]:
        """Entries wholly inside [base, base + size); MemoryMapError if one is cut in two
        (VFIO type1 refuses a partial unmap the same way)."""
        found = self.overlapping(base, size)
        for entry in found:
            if entry.base < base or entry.end > base + size:
                raise MemoryMapError(f"[{base:#x}, {base + size:#x}) cuts region {entry} in two")
        return found

    def resolve(self, gpa: int, length: int) -> list[tuple[Entry[T], int, int]]:
        """[gpa, gpa + length) as (entry, offset in entry, length) pieces, or GuestMemoryError.

        A range may continue into the next region only if that one starts
        exactly where the previous ends: a hole is never bridged.
        """
        end = check_range(gpa, length)
        if length == 0:
            return []
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self._entries[i].end:
            raise GuestMemoryError(f"guest address {gpa:#x} is not in guest RAM")
        pieces = []
        at = gpa
        while at < end:
            entry = self._entries[i] if i < len(self._entries) else None
            if entry is None or entry.base > at:
                raise GuestMemoryError(
                    f"[{gpa:#x} +{length:#x}) runs into a hole at {at:#x}, outside guest RAM"
                )
            take = min(entry.end, end) - at
            pieces.append((entry, at - entry.base, take))
            at += take
            i += 1
        return pieces


# ---------------------------------------------------------------- memory table updates


def _check_region(region: MemoryRegion, where: str, *, need_path: bool) -> None:
    if region.size <= 0:
        raise MemoryMapError(f"{where} has size {region.size}")
    if not 0 <= region.guest_address < ADDRESS_SPACE:
        raise MemoryMapError(f"{where} starts outside the 64-bit address space")
    if region.size > ADDRESS_SPACE - region.guest_address:
        raise MemoryMapError(f"{where} wraps past the top of the 64-bit address space")
    if not 0 <= region.file_offset <= ADDRESS_SPACE - region.size:
        raise MemoryMapError(f"{where}: file offset {region.file_offset:#x} + size wraps")
    if need_path and not region.path:
        raise MemoryMapError(f"{where}: shared memory needs a path the server can map")


def plan_update(
    table: RegionMap[T],
    add: Sequence[MemoryRegion],
    remove: Sequence[AddressRange] = (),
    *,
    add_name: str = "add",
    remove_name: str = "remove",
    need_path: bool = False,
    max_regions: int = MAX_REGIONS,
) -> list[Entry[T]]:
    """Check an update against `table` without changing it; returns the entries it removes.

    Removals apply before additions, so one update can replace a region. The
    whole update is refused (MemoryMapError naming the culprit) or can be
    applied in full.
    """
    doomed: dict[int, Entry[T]] = {}
    for i, r in enumerate(remove):
        where = f"{remove_name}[{i}]"
        if r.size <= 0:
            raise MemoryMapError(f"{where} has size {r.size}")
        if not 0 <= r.base < ADDRESS_SPACE or r.size > ADDRESS_SPACE - r.base:
            raise MemoryMapError(f"{where} wraps past the top of the 64-bit address space")
        try:
            for entry in table.within(r.base, r.size):
                doomed[entry.base] = entry
        except MemoryMapError as e:
            raise MemoryMapError(f"{where}: {e}") from None
    spans = []
    for i, region in enumerate(add):
        where = f"{add_name}[{i}]"
        _check_region(region, where, need_path=need_path)
        for entry in table.overlapping(region.guest_address, region.size):
            if entry.base not in doomed:
                raise MemoryMapError(f"{where} overlaps the region {entry} already mapped")
        spans.append((region.guest_address, region.end, i))
    spans.sort()
    for (_, end, i), (start, _, j) in itertools.pairwise(spans):
        if start < end:
            raise MemoryMapError(f"{add_name}[{i}] and [{j}] overlap")
    total = len(table) - len(doomed) + len(add)
    if total > max_regions:
        raise MemoryMapError(f"the memory map would hold {total} regions; at most {max_regions}")
    return list(doomed.values())


# ---------------------------------------------------------------- region-backed memory


class Backing(Protocol):
    """The bytes of one region: offsets are from the region's start."""

    @property
    def read_only(self) -> bool: ...

    def read_at(self, offset: int, length: int) -> bytes: ...

    def write_at(self, offset: int, data: bytes) -> None: ...


B = TypeVar("B", bound=Backing)


class RegionMemory(Generic[B]):
    """GuestMemory over a RegionMap of backings: the lookups and checks every kind shares."""

    def __init__(self) -> None:
        self.regions: RegionMap[B] = RegionMap()

    def read(self, gpa: int, length: int) -> bytes:
        pieces = self.regions.resolve(gpa, length)
        if len(pieces) == 1:
            entry, offset, take = pieces[0]
            return entry.value.read_at(offset, take)
        return b"".join(entry.value.read_at(offset, take) for entry, offset, take in pieces)

    def check_ram(self, gpa: int, length: int) -> None:
        """GuestMemoryError unless [gpa, gpa + length) is all RAM; no MAX_ACCESS cap,
        so a device can vet a guest buffer (a 4 MiB block write) before touching it."""
        if not 0 <= gpa < ADDRESS_SPACE or not 0 <= length <= ADDRESS_SPACE - gpa:
            raise GuestMemoryError(f"[{gpa:#x} +{length:#x}) is not a 64-bit guest range")
        at, end = gpa, gpa + length
        while at < end:  # one step per region: bounded by MAX_REGIONS
            entry = self.regions.find(at)
            if entry is None:
                raise GuestMemoryError(
                    f"[{gpa:#x} +{length:#x}) reaches {at:#x}, outside guest RAM"
                )
            at = entry.end

    def write(self, gpa: int, data: bytes) -> None:
        pieces = self.regions.resolve(gpa, len(data))
        for entry, _, _ in pieces:  # all or nothing: check every piece first
            if entry.value.read_only:
                raise GuestMemoryError(f"guest RAM {entry} is read-only")
        done = 0
        for entry, offset, take in pieces:
            entry.value.write_at(offset, data[done : done + take])
            done += take


@dataclass(eq=False, slots=True)
class _Bytes:
    buffer: bytearray
    read_only: bool = False

    def read_at(self, offset: int, length: int) -> bytes:
        return bytes(self.buffer[offset : offset + length])

    def write_at(self, offset: int, data: bytes) -> None:
        self.buffer[offset : offset + len(data)] = data


class BytearrayMemory(RegionMemory[_Bytes]):
    """Guest RAM in bytearrays, for tests: `BytearrayMemory(0x10000)` is 64 KiB at 0."""

    def __init__(self, size: int = 0, base: int = 0) -> None:
        super().__init__()
        self.buffers: list[bytearray] = []
        if size:
            self.add(base, bytearray(size))

    def add(self, base: int, buffer: bytearray, *, read_only: bool = False) -> bytearray:
        """Map `buffer` at `base` (it stays shared: writes show in it)."""
        self.regions.insert(base, len(buffer), _Bytes(buffer, read_only))
        self.buffers.append(buffer)
        return buffer

    @property
    def data(self) -> bytearray:
        """The first region's bytes."""
        return self.buffers[0]


class MemoryTable:
    """The frontend's memory map as bookkeeping only (DMA_MESSAGES and NONE modes):
    updates are validated exactly as shared ones, nothing is mapped."""

    def __init__(self) -> None:
        self.regions: RegionMap[MemoryRegion] = RegionMap()

    def update(
        self,
        add: Sequence[MemoryRegion],
        remove: Sequence[AddressRange] = (),
        *,
        add_name: str = "add",
        remove_name: str = "remove",
    ) -> None:
        doomed = plan_update(self.regions, add, remove, add_name=add_name, remove_name=remove_name)
        for entry in doomed:
            self.regions.remove(entry)
        for region in add:
            self.regions.insert(region.guest_address, region.size, region)

    def close(self) -> None:
        self.regions = RegionMap()


def perform_dma(memory: GuestMemory, request: DmaRequested) -> tuple[bytes | None, str | None]:
    """Carry out a DMA against `memory`: (data read or None, error or None) for dma_completed."""
    try:
        if request.write:
            if len(request.data) != request.length:
                return None, f"write of {request.length} bytes carries {len(request.data)}"
            memory.write(request.address, request.data)
            return None, None
        return memory.read(request.address, request.length), None
    except GuestMemoryError as e:
        return None, str(e)
