"""Guest memory checks (reliability.md C3, C12): ranges, the region table, table updates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devserver.effects import AddressRange, DmaRequested
from devserver.errors import GuestMemoryError, MemoryMapError
from devserver.memory import (
    ADDRESS_SPACE,
    MAX_ACCESS,
    BytearrayMemory,
    MemoryRegion,
    MemoryTable,
    RegionMap,
    check_range,
    perform_dma,
    plan_update,
)

TOP = ADDRESS_SPACE

# -- ranges


def test_check_range_accepts_a_range_ending_exactly_at_the_top() -> None:
    assert check_range(TOP - 0x1000, 0x1000) == TOP


@pytest.mark.parametrize(
    ("gpa", "length", "needle"),
    [
        (TOP - 0x10, 0x11, "wraps"),
        (TOP - 1, MAX_ACCESS, "wraps"),
        (TOP, 1, "outside"),
        (-1, 1, "outside"),
        (0, -1, "at most"),
        (0, MAX_ACCESS + 1, "at most"),
    ],
)
def test_check_range_refuses(gpa: int, length: int, needle: str) -> None:
    with pytest.raises(GuestMemoryError, match=needle):
        check_range(gpa, length)


# -- the region table


def table(*ranges: tuple[int, int]) -> RegionMap[str]:
    regions: RegionMap[str] = RegionMap()
    for base, size in ranges:
        regions.insert(base, size, f"{base:#x}")
    return regions


def test_find_by_bisection() -> None:
    regions = table((0x3000, 0x1000), (0x1000, 0x1000), (0x8000, 0x100))
    assert [e.base for e in regions] == [0x1000, 0x3000, 0x8000]
    assert regions.find(0x0FFF) is None
    assert (found := regions.find(0x1FFF)) is not None and found.value == "0x1000"
    assert regions.find(0x2000) is None
    assert (found := regions.find(0x80FF)) is not None and found.base == 0x8000
    assert regions.find(0x8100) is None


def test_insert_refuses_overlap_and_empty() -> None:
    regions = table((0x1000, 0x1000))
    for base, size in ((0x1800, 0x1000), (0x0800, 0x1000), (0x0, 0x10000), (0x1000, 1)):
        with pytest.raises(MemoryMapError, match="overlaps"):
            regions.insert(base, size, "x")
    with pytest.raises(MemoryMapError, match="size 0"):
        regions.insert(0x5000, 0, "x")
    regions.insert(0x2000, 0x1000, "adjacent")  # touching is not overlapping
    regions.insert(0x0, 0x1000, "below")
    assert len(regions) == 3


def test_overlapping_and_within() -> None:
    regions = table((0x0, 0x1000), (0x1000, 0x1000), (0x4000, 0x1000))
    assert [e.base for e in regions.overlapping(0x800, 0x4000)] == [0x0, 0x1000, 0x4000]
    assert regions.overlapping(0x2000, 0x2000) == []
    assert [e.base for e in regions.within(0x0, 0x2000)] == [0x0, 0x1000]
    with pytest.raises(MemoryMapError, match="cuts"):
        regions.within(0x800, 0x1000)


def test_resolve_spans_adjacent_regions_only() -> None:
    regions = table((0x1000, 0x1000), (0x2000, 0x1000), (0x4000, 0x1000))
    pieces = regions.resolve(0x1FF0, 0x20)
    assert [(e.base, offset, n) for e, offset, n in pieces] == [
        (0x1000, 0xFF0, 0x10),
        (0x2000, 0x0, 0x10),
    ]
    with pytest.raises(GuestMemoryError, match="hole at 0x3000"):
        regions.resolve(0x2FF0, 0x20)
    with pytest.raises(GuestMemoryError, match="not in guest RAM"):
        regions.resolve(0x0FFF, 2)
    with pytest.raises(GuestMemoryError, match="hole at 0x5000"):
        regions.resolve(0x4FFF, 2)  # one past the last region's end
    assert regions.resolve(0x4000, 0x1000)[0][2] == 0x1000  # ends exactly at the end: fine
    assert regions.resolve(0x4000, 0) == []


def test_resolve_at_the_top_of_the_address_space() -> None:
    regions = table((TOP - 0x1000, 0x1000))
    assert len(regions.resolve(TOP - 0x10, 0x10)) == 1
    with pytest.raises(GuestMemoryError, match="wraps"):
        regions.resolve(TOP - 0x10, 0x11)


@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8)), max_size=12), st.data())
def test_resolve_agrees_with_a_byte_map(spans: list[tuple[int, int]], data: st.DataObject) -> None:
    """Pieces cover exactly the range, in order, and only where every byte is mapped."""
    regions: RegionMap[int] = RegionMap()
    owner: dict[int, int] = {}
    for base, size in spans:
        if any(b in owner for b in range(base, base + size)):
            continue
        regions.insert(base, size, base)
        owner.update(dict.fromkeys(range(base, base + size), base))
    gpa = data.draw(st.integers(0, 80))
    length = data.draw(st.integers(0, 20))
    wanted = list(range(gpa, gpa + length))
    if all(b in owner for b in wanted):
        got = [
            e.base + offset + i for e, offset, n in regions.resolve(gpa, length) for i in range(n)
        ]
        assert got == wanted
    else:
        with pytest.raises(GuestMemoryError):
            regions.resolve(gpa, length)


# -- table updates


def test_plan_update_checks_everything_first() -> None:
    regions: RegionMap[MemoryRegion] = RegionMap()
    regions.insert(0x0, 0x1000, MemoryRegion(0, 0x1000))
    regions.insert(0x1000, 0x1000, MemoryRegion(0x1000, 0x1000))
    # Replace the first region in one update: removals apply first.
    doomed = plan_update(regions, [MemoryRegion(0x0, 0x800)], [AddressRange(0x0, 0x1000)])
    assert [e.base for e in doomed] == [0x0]
    assert len(regions) == 2  # nothing applied
    with pytest.raises(MemoryMapError, match=r"add\[0\] overlaps the region \[0x1000"):
        plan_update(regions, [MemoryRegion(0x1800, 0x1000)])
    with pytest.raises(MemoryMapError, match=r"add\[0\] and \[1\] overlap"):
        plan_update(regions, [MemoryRegion(0x8000, 0x100), MemoryRegion(0x80F0, 0x10)])


@pytest.mark.parametrize(
    ("add", "remove", "needle"),
    [
        ([MemoryRegion(0x10000, 0)], [], r"add\[0\] has size 0"),
        ([MemoryRegion(TOP - 0x1000, 0x2000)], [], "wraps past the top"),
        ([MemoryRegion(0x10000, 0x1000, file_offset=TOP - 1)], [], "file offset"),
        ([MemoryRegion(0x10000, 0x1000)], [], "needs a path"),
        ([], [AddressRange(0x800, 0x1000)], r"remove\[0\]: .*cuts"),
        ([], [AddressRange(0, 0)], r"remove\[0\] has size 0"),
        ([], [AddressRange(TOP - 1, 2)], "wraps"),
    ],
)
def test_plan_update_refuses(
    add: list[MemoryRegion], remove: list[AddressRange], needle: str
) -> None:
    regions: RegionMap[MemoryRegion] = RegionMap()
    regions.insert(0x0, 0x1000, MemoryRegion(0, 0x1000, path="/ram"))
    with pytest.raises(MemoryMapError, match=needle):
        plan_update(regions, add, remove, need_path=True)


def test_plan_update_bounds_the_table() -> None:
    regions: RegionMap[MemoryRegion] = RegionMap()
    many = [MemoryRegion(i * 0x1000, 0x1000) for i in range(5)]
    with pytest.raises(MemoryMapError, match="at most 4"):
        plan_update(regions, many, max_regions=4)


def test_memory_table_is_all_or_nothing() -> None:
    memory = MemoryTable()
    memory.update([MemoryRegion(0, 0x1000), MemoryRegion(0x1000, 0x1000)])
    with pytest.raises(MemoryMapError):
        memory.update([MemoryRegion(0x4000, 0x1000), MemoryRegion(0x800, 0x100)])
    assert [e.base for e in memory.regions] == [0, 0x1000]
    memory.update([], [AddressRange(0, 0x2000)])
    assert len(memory.regions) == 0


# -- bytearray memory and perform_dma


def test_bytearray_memory_reads_and_writes_across_adjacent_regions() -> None:
    memory = BytearrayMemory(0x1000, base=0x10000)
    second = memory.add(0x11000, bytearray(0x1000))
    memory.write(0x10FFE, b"abcd")
    assert memory.data[-2:] == b"ab" and second[:2] == b"cd"
    assert memory.read(0x10FFE, 4) == b"abcd"
    with pytest.raises(GuestMemoryError):
        memory.read(0x11FFE, 4)  # runs off the end
    with pytest.raises(GuestMemoryError):
        memory.write(0xFFFF, b"xy")  # starts below RAM


def test_write_into_a_read_only_region_changes_nothing() -> None:
    memory = BytearrayMemory(0x1000)
    rom = memory.add(0x1000, bytearray(b"\xee" * 0x100), read_only=True)
    with pytest.raises(GuestMemoryError, match="read-only"):
        memory.write(0xFFE, b"abcd")
    assert memory.data[-2:] == b"\0\0" and rom[:2] == b"\xee\xee"
    assert memory.read(0x1000, 1) == b"\xee"


def test_perform_dma_turns_guest_errors_into_an_error_string() -> None:
    memory = BytearrayMemory(0x1000)
    memory.data[0x10:0x14] = b"data"
    assert perform_dma(memory, DmaRequested(1, 1, 0x10, 4, False)) == (b"data", None)
    assert perform_dma(memory, DmaRequested(1, 2, 0x20, 2, True, b"ok")) == (None, None)
    assert memory.data[0x20:0x22] == b"ok"
    data, error = perform_dma(memory, DmaRequested(1, 3, 0x1000, 4, False))
    assert data is None and error is not None and "not in guest RAM" in error
    data, error = perform_dma(memory, DmaRequested(1, 4, 0, 4, True, b"ab"))
    assert error is not None and "carries 2" in error
