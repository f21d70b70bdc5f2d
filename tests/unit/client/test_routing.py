"""The frontend routing table: BarDecodeChanged events in, (device, bar, offset) out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devserver.effects import AddressRange, BarDecodeChanged, BarKind, SharedMemory
from vmm_client.routing import (
    AddressSpace,
    MemslotBar,
    Route,
    RoutingError,
    RoutingTable,
    space_of,
)

FB = SharedMemory(path="/dev/shm/fb", file_offset=0, size=0x100_0000)


class Events:
    """Builds events with increasing generations, like the server's bus does."""

    def __init__(self) -> None:
        self.generation = 0

    def __call__(
        self,
        device_id: int,
        bar: int,
        old: AddressRange | None,
        new: AddressRange | None,
        kind: BarKind = BarKind.MEM32,
        backing: SharedMemory | None = None,
        generation: int | None = None,
    ) -> BarDecodeChanged:
        if generation is None:
            self.generation += 1
            generation = self.generation
        return BarDecodeChanged(
            device_id=device_id,
            bar=bar,
            kind=kind,
            prefetchable=backing is not None,
            old=old,
            new=new,
            backing=backing,
            generation=generation,
        )


@pytest.fixture
def ev() -> Events:
    return Events()


def r(base: int, size: int) -> AddressRange:
    return AddressRange(base, size)


def snapshot(table: RoutingTable) -> tuple[object, ...]:
    return (table.generation, table.ranges(), table.memslot_bars(), len(table))


# ---------------------------------------------------------------- add, move, remove


def test_empty_table_routes_nothing() -> None:
    table = RoutingTable()
    assert table.generation == 0
    assert table.lookup_mmio(0, 4) is None
    assert table.lookup_pio(0xCFC, 4) is None
    assert table.ranges() == {}
    assert len(table) == 0


def test_add_and_lookup(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(3, 0, None, r(0xFEBF_0000, 0x1000)))
    assert table.generation == 1
    assert table.lookup_mmio(0xFEBF_0000, 4) == Route(3, 0, 0)
    assert table.lookup_mmio(0xFEBF_0010, 2) == Route(3, 0, 0x10)
    assert table.lookup_mmio(0xFEBF_0FFC, 4) == Route(3, 0, 0xFFC)
    assert table.lookup_mmio(0xFEBF_0FFF, 1) == Route(3, 0, 0xFFF)
    assert table.lookup_mmio(0xFEBF_1000, 1) is None  # one past the end
    assert table.lookup_mmio(0xFEBE_FFFF, 1) is None  # one before the base
    assert table.ranges() == {(3, 0): r(0xFEBF_0000, 0x1000)}
    assert table.range_of(3, 0) == r(0xFEBF_0000, 0x1000)
    assert table.range_of(3, 1) is None


def test_route_unpacks() -> None:
    device_id, bar, offset = Route(1, 2, 3)
    assert (device_id, bar, offset) == (1, 2, 3)


def test_straddling_the_end_is_unrouted(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100)))
    table.apply(ev(2, 0, None, r(0x1100, 0x100)))  # adjacent: still two BARs
    assert table.lookup_mmio(0x10FC, 4) == Route(1, 0, 0xFC)
    assert table.lookup_mmio(0x10FE, 4) is None  # runs into the neighbour
    assert table.lookup_mmio(0x11FC, 8) is None
    assert table.lookup_mmio(0x1100, 4) == Route(2, 0, 0)


def test_move(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 2, None, r(0x8000_0000, 0x4000)))
    table.apply(ev(1, 2, r(0x8000_0000, 0x4000), r(0x9000_0000, 0x4000)))
    assert table.lookup_mmio(0x8000_0000, 4) is None
    assert table.lookup_mmio(0x9000_0004, 4) == Route(1, 2, 4)
    assert table.ranges() == {(1, 2): r(0x9000_0000, 0x4000)}
    assert table.generation == 2


def test_move_onto_part_of_its_own_old_range(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100)))
    table.apply(ev(2, 0, None, r(0x2000, 0x100)))
    table.apply(ev(1, 0, r(0x1000, 0x100), r(0x1080, 0x100)))
    assert table.lookup_mmio(0x1100, 4) == Route(1, 0, 0x80)
    assert table.lookup_mmio(0x1000, 4) is None


def test_remove(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100)))
    table.apply(ev(1, 0, r(0x1000, 0x100), None))
    assert table.lookup_mmio(0x1000, 4) is None
    assert table.ranges() == {}
    assert len(table) == 0


def test_64bit_addresses(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(4, 2, None, r(0x80_0000_0000, 0x10_0000), kind=BarKind.MEM64))
    assert table.lookup_mmio(0x80_000F_FFF8, 8) == Route(4, 2, 0xF_FFF8)
    assert table.lookup_mmio(0x80_0010_0000, 1) is None


def test_many_bars_lookup_in_sorted_order(ev: Events) -> None:
    table = RoutingTable()
    # Add in a scrambled order; lookups must not depend on it.
    for i in (5, 1, 7, 0, 3, 6, 2, 4):
        table.apply(ev(i, 1, None, r(0xE000_0000 + i * 0x2000, 0x1000)))
    for i in range(8):
        base = 0xE000_0000 + i * 0x2000
        assert table.lookup_mmio(base + 0xFFC, 4) == Route(i, 1, 0xFFC)
        assert table.lookup_mmio(base + 0x1000, 4) is None  # the gap


# ---------------------------------------------------------------- IO vs MMIO


def test_space_of() -> None:
    assert space_of(BarKind.IO) is AddressSpace.PIO
    for kind in (BarKind.MEM32, BarKind.MEM64, BarKind.ROM):
        assert space_of(kind) is AddressSpace.MMIO


def test_io_and_mmio_are_separate_spaces(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0xC000, 0x40), kind=BarKind.IO))
    # The same numbers in MMIO space are another BAR's business, not an overlap.
    table.apply(ev(2, 1, None, r(0xC000, 0x1000), kind=BarKind.MEM32))
    table.apply(ev(3, 6, None, r(0xD000, 0x800), kind=BarKind.ROM))
    assert table.lookup_pio(0xC004, 2) == Route(1, 0, 4)
    assert table.lookup_mmio(0xC004, 2) == Route(2, 1, 4)
    assert table.lookup_pio(0xD000, 4) is None
    assert table.lookup_mmio(0xD000, 4) == Route(3, 6, 0)
    assert table.lookup(AddressSpace.PIO, 0xC03C, 4) == Route(1, 0, 0x3C)
    assert table.lookup(AddressSpace.MMIO, 0xC03C, 4) == Route(2, 1, 0x3C)


def test_removing_io_bar_leaves_mmio(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0xC000, 0x40), kind=BarKind.IO))
    table.apply(ev(2, 1, None, r(0xC000, 0x40)))
    table.apply(ev(1, 0, r(0xC000, 0x40), None, kind=BarKind.IO))
    assert table.lookup_pio(0xC000, 1) is None
    assert table.lookup_mmio(0xC000, 1) == Route(2, 1, 0)


# ---------------------------------------------------------------- shared-memory BARs


def test_memslot_bars_follow_the_bar(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(5, 0, None, r(0xFD00_0000, 0x100_0000), backing=FB))
    table.apply(ev(5, 2, None, r(0xFEB0_0000, 0x1000)))  # an ordinary BAR of the same device
    assert table.memslot_bars() == {
        (5, 0): MemslotBar(5, 0, BarKind.MEM32, True, r(0xFD00_0000, 0x100_0000), FB)
    }
    # Still routed, for frontends that cannot map it.
    assert table.lookup_mmio(0xFD00_0000, 4) == Route(5, 0, 0)

    table.apply(ev(5, 0, r(0xFD00_0000, 0x100_0000), r(0xE000_0000, 0x100_0000), backing=FB))
    assert table.memslot_bars()[(5, 0)].range == r(0xE000_0000, 0x100_0000)

    table.apply(ev(5, 0, r(0xE000_0000, 0x100_0000), None, backing=FB))
    assert table.memslot_bars() == {}
    assert table.ranges() == {(5, 2): r(0xFEB0_0000, 0x1000)}


def test_snapshots_are_copies(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(5, 0, None, r(0xFD00_0000, 0x1000), backing=FB))
    table.ranges().clear()
    table.memslot_bars().clear()
    assert len(table.ranges()) == 1
    assert len(table.memslot_bars()) == 1


def test_io_bar_with_backing_is_rejected(ev: Events) -> None:
    table = RoutingTable()
    with pytest.raises(RoutingError, match="IO BAR"):
        table.apply(ev(1, 0, None, r(0xC000, 0x40), kind=BarKind.IO, backing=FB))
    assert snapshot(table) == (0, {}, {}, 0)


# ---------------------------------------------------------------- contract violations


def test_old_range_mismatch_when_table_holds_nothing(ev: Events) -> None:
    table = RoutingTable()
    with pytest.raises(RoutingError, match=r"decoded \[0x1000, 0x1100\).*holds nothing"):
        table.apply(ev(1, 0, r(0x1000, 0x100), r(0x2000, 0x100)))
    assert snapshot(table) == (0, {}, {}, 0)


def test_old_range_mismatch_when_table_holds_another_range(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100)))
    before = snapshot(table)
    with pytest.raises(RoutingError, match="device 1 BAR 0"):
        table.apply(ev(1, 0, r(0x3000, 0x100), r(0x2000, 0x100)))
    with pytest.raises(RoutingError, match=r"decoded nothing"):
        table.apply(ev(1, 0, None, r(0x2000, 0x100)))
    assert snapshot(table) == before
    assert table.lookup_mmio(0x1000, 4) == Route(1, 0, 0)


def test_kind_change_is_rejected(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0xC000, 0x40), kind=BarKind.IO))
    with pytest.raises(RoutingError, match="kind changed"):
        table.apply(ev(1, 0, r(0xC000, 0x40), r(0xC100, 0x40), kind=BarKind.MEM32))
    assert table.lookup_pio(0xC000, 4) == Route(1, 0, 0)


@pytest.mark.parametrize(
    "new",
    [
        r(0x1000, 0x100),  # identical
        r(0x0F00, 0x101),  # reaches the first byte
        r(0x10FF, 0x100),  # starts at the last byte
        r(0x1040, 0x10),  # inside
        r(0x0000, 0x10000),  # covers
    ],
)
def test_overlap_is_rejected(ev: Events, new: AddressRange) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100)))
    table.apply(ev(2, 0, None, r(0x8000, 0x100)))
    before = snapshot(table)
    with pytest.raises(RoutingError, match="overlaps device 1 BAR 0"):
        table.apply(ev(2, 0, r(0x8000, 0x100), new))
    assert snapshot(table) == before
    assert table.lookup_mmio(0x8000, 4) == Route(2, 0, 0)


def test_overlap_behind_own_old_range_is_found(ev: Events) -> None:
    # The BAR's own old range sits between the new range and the one it hits.
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100)))
    table.apply(ev(2, 0, None, r(0x1100, 0x100)))
    with pytest.raises(RoutingError, match="overlaps device 1 BAR 0"):
        table.apply(ev(2, 0, r(0x1100, 0x100), r(0x1080, 0x1000)))


def test_touching_ranges_do_not_overlap(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100)))
    table.apply(ev(2, 0, None, r(0x0F00, 0x100)))
    table.apply(ev(3, 0, None, r(0x1100, 0x100)))
    assert len(table) == 3


@pytest.mark.parametrize("new", [r(0x1000, 0), r(0x1000, -0x10), r(-0x10, 0x20)])
def test_invalid_range_is_rejected(ev: Events, new: AddressRange) -> None:
    table = RoutingTable()
    with pytest.raises(RoutingError, match="invalid range"):
        table.apply(ev(1, 0, None, new))
    assert snapshot(table) == (0, {}, {}, 0)


# ---------------------------------------------------------------- generations


def test_generation_must_increase(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100), generation=5))
    before = snapshot(table)
    for stale in (5, 4, 0):
        with pytest.raises(RoutingError, match="out of order"):
            table.apply(ev(2, 0, None, r(0x2000, 0x100), generation=stale))
    assert snapshot(table) == before


def test_generation_gaps_are_accepted(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100), generation=1))
    table.apply(ev(2, 0, None, r(0x2000, 0x100), generation=7))
    assert table.generation == 7


def test_starting_generation(ev: Events) -> None:
    table = RoutingTable(generation=10)
    assert table.generation == 10
    with pytest.raises(RoutingError, match="out of order"):
        table.apply(ev(1, 0, None, r(0x1000, 0x100), generation=10))
    table.apply(ev(1, 0, None, r(0x1000, 0x100), generation=11))
    assert table.generation == 11


def test_rejected_event_does_not_advance_generation(ev: Events) -> None:
    table = RoutingTable()
    table.apply(ev(1, 0, None, r(0x1000, 0x100), generation=1))
    with pytest.raises(RoutingError):
        table.apply(ev(2, 0, None, r(0x1000, 0x100), generation=2))
    table.apply(ev(2, 0, None, r(0x2000, 0x100), generation=2))
    assert table.generation == 2


# ---------------------------------------------------------------- against a model

# Each BAR has one kind for life, as on a real device; device 3 BAR 1 is shared memory.
KINDS = {0: BarKind.IO, 1: BarKind.MEM32, 2: BarKind.MEM64, 6: BarKind.ROM}
KEYS = [(d, b) for d in range(4) for b in KINDS]
BASES = {BarKind.IO: 0xC000, BarKind.MEM32: 0xFE00_0000, BarKind.MEM64: 0xFE00_0000}
BASES[BarKind.ROM] = BASES[BarKind.MEM32]  # ROMs share MMIO space with memory BARs


def backing_of(key: tuple[int, int]) -> SharedMemory | None:
    return FB if key == (3, 1) else None


def model_lookup(
    model: dict[tuple[int, int], AddressRange], space: AddressSpace, address: int, size: int
) -> Route | None:
    hits = [
        Route(d, b, address - rng.base)
        for (d, b), rng in model.items()
        if space_of(KINDS[b]) is space and rng.contains(address, size)
    ]
    assert len(hits) <= 1, "the model itself overlaps"
    return hits[0] if hits else None


def model_overlaps(
    model: dict[tuple[int, int], AddressRange], key: tuple[int, int], new: AddressRange
) -> bool:
    space = space_of(KINDS[key[1]])
    return any(
        k != key and space_of(KINDS[k[1]]) is space and rng.overlaps(new)
        for k, rng in model.items()
    )


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_matches_brute_force_model(data: st.DataObject) -> None:
    table = RoutingTable()
    model: dict[tuple[int, int], AddressRange] = {}
    generation = 0
    # A coarse grid of bases and sizes so that overlaps, touching and moves
    # onto an own old range all happen often.
    slots = st.integers(0, 15)
    sizes = st.sampled_from([0x10, 0x20, 0x40])
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        key = data.draw(st.sampled_from(KEYS), label="bar")
        kind = KINDS[key[1]]
        op = data.draw(st.sampled_from(["set", "set", "remove", "stale"]), label="op")
        old = model.get(key)
        if op == "remove" and old is None:
            continue
        if op == "stale":
            # An old range the table does not hold: always rejected.
            wrong = AddressRange(BASES[kind] + 0x1_0000, 0x10)
            event = BarDecodeChanged(
                key[0], key[1], kind, False, wrong, None, backing_of(key), generation + 1
            )
            with pytest.raises(RoutingError):
                table.apply(event)
        else:
            new = None
            if op == "set":
                new = AddressRange(BASES[kind] + data.draw(slots) * 0x10, data.draw(sizes))
            event = BarDecodeChanged(
                key[0], key[1], kind, False, old, new, backing_of(key), generation + 1
            )
            if new is not None and model_overlaps(model, key, new):
                with pytest.raises(RoutingError, match="overlaps"):
                    table.apply(event)
            else:
                table.apply(event)
                generation += 1
                if new is None:
                    del model[key]
                else:
                    model[key] = new

        assert table.generation == generation
        assert table.ranges() == model
        assert len(table) == len(model)
        assert {k: m.range for k, m in table.memslot_bars().items()} == {
            k: rng for k, rng in model.items() if backing_of(k) is not None
        }
        # Probe every range's edges and a few random addresses in both spaces.
        probes: list[tuple[AddressSpace, int, int]] = []
        for k, rng in model.items():
            space = space_of(KINDS[k[1]])
            for address in (rng.base - 1, rng.base, rng.end - 4, rng.end - 2, rng.end - 1, rng.end):
                probes.extend((space, address, size) for size in (1, 2, 4))
        extra = st.tuples(
            st.sampled_from(list(AddressSpace)), st.integers(0, 0x120), st.sampled_from([1, 2, 4])
        )
        for space, offset, size in data.draw(st.lists(extra, max_size=8), label="probes"):
            base = BASES[BarKind.IO] if space is AddressSpace.PIO else BASES[BarKind.MEM32]
            probes.append((space, base + offset, size))
        for space, address, size in probes:
            expected = model_lookup(model, space, address, size)
            assert table.lookup(space, address, size) == expected
            lookup = table.lookup_pio if space is AddressSpace.PIO else table.lookup_mmio
            assert lookup(address, size) == expected
