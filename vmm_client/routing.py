"""The frontend's BAR routing table, kept current from BarDecodeChanged events.

The shape of rust-vmm's vm-device `Bus`: per address space (port IO and
MMIO), non-overlapping ranges kept sorted by base so that one bisect finds
the range an access lands in. The device server arbitrates BARs
(devserver/pci/bus.py) and promises that, after each event, no two decoding
BARs of one space overlap; this table checks that promise instead of
trusting it, because a routing mistake sends guest writes to the wrong
device.

A route is `(device_id, bar, offset)`: devices see BAR offsets, never
guest-physical addresses (architecture.md, layering rule 3).

Shared-memory-backed BARs (the framebuffer) are routed like any other MMIO
BAR, so a frontend that cannot map them still works, and are also listed in
`memslot_bars()` so a KVM frontend can map them as memslots that follow the
BAR.
"""

from __future__ import annotations

import enum
from bisect import bisect_right
from dataclasses import dataclass
from typing import NamedTuple

from devserver.effects import AddressRange, BarDecodeChanged, BarKind, SharedMemory


class RoutingError(Exception):
    """An event that contradicts the table: the server broke its BAR contract."""


class AddressSpace(enum.Enum):
    PIO = "pio"
    MMIO = "mmio"


def space_of(kind: BarKind) -> AddressSpace:
    """IO BARs decode port IO; memory and ROM BARs decode MMIO."""
    return AddressSpace.PIO if kind is BarKind.IO else AddressSpace.MMIO


class Route(NamedTuple):
    """Where an access goes: the server's BarRead/BarWrite address."""

    device_id: int
    bar: int
    offset: int


class BarKey(NamedTuple):
    device_id: int
    bar: int


@dataclass(frozen=True, slots=True)
class MemslotBar:
    """A decoding BAR whose bytes live in shared memory the frontend can map."""

    device_id: int
    bar: int
    kind: BarKind
    prefetchable: bool
    range: AddressRange
    backing: SharedMemory


@dataclass(frozen=True, slots=True)
class _Held:
    """What the table holds for one decoding BAR."""

    kind: BarKind
    range: AddressRange


class _Space:
    """Sorted, non-overlapping ranges of one address space.

    Parallel lists rather than one list of records: `bisect_right` on a plain
    list of ints is the fastest lookup CPython offers, and lookups are the hot
    path (every MMIO/PIO exit) while changes are rare (BAR programming).
    """

    __slots__ = ("_bases", "_ends", "_keys")

    def __init__(self) -> None:
        self._bases: list[int] = []
        self._ends: list[int] = []
        self._keys: list[BarKey] = []

    def lookup(self, address: int, size: int) -> Route | None:
        i = bisect_right(self._bases, address) - 1
        if i < 0 or address + size > self._ends[i]:
            return None  # below every range, in a gap, or straddling the end
        key = self._keys[i]
        return Route(key.device_id, key.bar, address - self._bases[i])

    def overlapping(self, new: AddressRange, ignore: BarKey) -> BarKey | None:
        """A range other than `ignore`'s that overlaps `new`, if any."""
        # Disjoint and sorted by base, so the ends are sorted too: walk down from
        # the last range starting before new.end while ranges still reach into
        # `new`. At most `ignore` is skipped, so this is O(log n).
        i = bisect_right(self._bases, new.end - 1) - 1
        while i >= 0 and self._ends[i] > new.base:
            if self._keys[i] != ignore:
                return self._keys[i]
            i -= 1
        return None

    def insert(self, key: BarKey, new: AddressRange) -> None:
        i = bisect_right(self._bases, new.base)
        self._bases.insert(i, new.base)
        self._ends.insert(i, new.end)
        self._keys.insert(i, key)

    def remove(self, key: BarKey, old: AddressRange) -> None:
        i = bisect_right(self._bases, old.base) - 1
        # The caller checked the table holds `old` for `key`; disjointness makes
        # the base unique within the space.
        assert self._keys[i] == key
        assert self._ends[i] == old.end
        del self._bases[i], self._ends[i], self._keys[i]

    def __len__(self) -> int:
        return len(self._bases)


class RoutingTable:
    """Which BAR decodes which guest address, per address space.

    `apply` is all-or-nothing: an event it rejects leaves the table and
    `generation` untouched.
    """

    __slots__ = ("_generation", "_held", "_memslots", "_mmio", "_pio")

    def __init__(self, generation: int = 0) -> None:
        # The bus counts decode changes from 0 and numbers its first event 1.
        self._generation = generation
        self._pio = _Space()
        self._mmio = _Space()
        self._held: dict[BarKey, _Held] = {}
        self._memslots: dict[BarKey, MemslotBar] = {}

    @property
    def generation(self) -> int:
        """The generation of the last event applied (the starting value before any)."""
        return self._generation

    def _space(self, kind: BarKind) -> _Space:
        return self._pio if kind is BarKind.IO else self._mmio

    def apply(self, event: BarDecodeChanged) -> None:
        """Move one BAR: forget `event.old`, route `event.new`.

        Raises RoutingError when the event is older than one already applied,
        when `event.old` is not what the table holds for the BAR, or when
        `event.new` overlaps another BAR of the same address space.
        """
        key = BarKey(event.device_id, event.bar)
        where = f"device {event.device_id} BAR {event.bar} (generation {event.generation})"
        if event.generation <= self._generation:
            # Gaps are tolerated (a mismatch would catch a lost event), reordering is not.
            raise RoutingError(
                f"{where}: out of order, generation {self._generation} was already applied"
            )
        held = self._held.get(key)
        held_range = held.range if held is not None else None
        if held_range != event.old:
            raise RoutingError(
                f"{where}: the server says it decoded {_describe(event.old)}, "
                f"the routing table holds {_describe(held_range)}"
            )
        if held is not None and held.kind is not event.kind:
            raise RoutingError(f"{where}: kind changed from {held.kind.name} to {event.kind.name}")
        new = event.new
        space = self._space(event.kind)
        if new is not None:
            if new.size <= 0 or new.base < 0:
                raise RoutingError(f"{where}: invalid range base {new.base:#x} size {new.size:#x}")
            if event.backing is not None and event.kind is BarKind.IO:
                raise RoutingError(f"{where}: an IO BAR cannot be backed by shared memory")
            # The BAR's own old range is about to go, so it does not count.
            other = space.overlapping(new, ignore=key)
            if other is not None:
                raise RoutingError(
                    f"{where}: new range {new} overlaps device {other.device_id} BAR "
                    f"{other.bar} at {self._held[other].range} in {space_of(event.kind).value}"
                )

        # Validated: now mutate.
        if held_range is not None:
            space.remove(key, held_range)
            del self._held[key]
            self._memslots.pop(key, None)
        if new is not None:
            space.insert(key, new)
            self._held[key] = _Held(event.kind, new)
            if event.backing is not None:
                self._memslots[key] = MemslotBar(
                    device_id=event.device_id,
                    bar=event.bar,
                    kind=event.kind,
                    prefetchable=event.prefetchable,
                    range=new,
                    backing=event.backing,
                )
        self._generation = event.generation

    def lookup_mmio(self, address: int, size: int) -> Route | None:
        """The BAR an MMIO access falls in entirely, or None (unrouted: all-ones/drop)."""
        return self._mmio.lookup(address, size)

    def lookup_pio(self, port: int, size: int) -> Route | None:
        """The IO BAR a port access falls in entirely, or None."""
        return self._pio.lookup(port, size)

    def lookup(self, space: AddressSpace, address: int, size: int) -> Route | None:
        table = self._pio if space is AddressSpace.PIO else self._mmio
        return table.lookup(address, size)

    def range_of(self, device_id: int, bar: int) -> AddressRange | None:
        """What one BAR decodes now, or None."""
        held = self._held.get(BarKey(device_id, bar))
        return held.range if held is not None else None

    def ranges(self) -> dict[tuple[int, int], AddressRange]:
        """A snapshot of every decoding BAR, keyed by (device_id, bar)."""
        return {(k.device_id, k.bar): h.range for k, h in self._held.items()}

    def memslot_bars(self) -> dict[tuple[int, int], MemslotBar]:
        """A snapshot of the decoding shared-memory BARs, keyed by (device_id, bar)."""
        return {(k.device_id, k.bar): m for k, m in self._memslots.items()}

    def __len__(self) -> int:
        return len(self._held)


def _describe(r: AddressRange | None) -> str:
    return "nothing" if r is None else str(r)
