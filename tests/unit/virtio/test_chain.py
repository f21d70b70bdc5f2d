"""Descriptor chains against hostile tables (reliability.md C1-C4, §6 matrix rows
on loops, over-long chains, next >= size, indirect abuse, addresses, lengths)."""

from __future__ import annotations

import pytest

from devserver.errors import GuestMemoryError
from devserver.memory import BytearrayMemory
from devserver.virtio.chain import (
    MAX_COPY,
    ChainError,
    DescriptorChain,
    Reader,
    Writer,
    read_chain,
)
from devserver.virtio.ring import DESC
from devserver.virtio.spec import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

NEXT, WRITE, INDIRECT = int(VIRTQ_DESC_F_NEXT), int(VIRTQ_DESC_F_WRITE), int(VIRTQ_DESC_F_INDIRECT)
TABLE = 0x1000
QSIZE = 8
RAM = 0x10_0000


class Counting(BytearrayMemory):
    """Counts reads per address (to show a table is copied once)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads: dict[int, int] = {}

    def read(self, gpa: int, length: int) -> bytes:
        self.reads[gpa] = self.reads.get(gpa, 0) + 1
        return super().read(gpa, length)


class Huge(BytearrayMemory):
    """Claims 16 TiB of RAM for bounds checks, so length caps can be tested alone."""

    def check_ram(self, gpa: int, length: int) -> None:
        if gpa + length > 1 << 44:
            raise GuestMemoryError("outside")


def put(
    mem: BytearrayMemory,
    index: int,
    addr: int,
    length: int,
    flags: int = 0,
    nxt: int = 0,
    table: int = TABLE,
) -> None:
    mem.write(table + 16 * index, DESC.pack(addr, length, flags, nxt))


def walk(mem: BytearrayMemory, head: int = 0, *, indirect: bool = True) -> DescriptorChain:
    return read_chain(mem, TABLE, QSIZE, head, indirect=indirect)


@pytest.fixture
def mem() -> Counting:
    return Counting(RAM)


def test_a_chain_splits_into_readable_then_writable(mem: Counting) -> None:
    put(mem, 0, 0x8000, 10, NEXT, 3)
    put(mem, 3, 0x9000, 0, NEXT, 5)  # zero-length: allowed, contributes nothing
    put(mem, 5, 0xA000, 20, WRITE)
    chain = walk(mem)
    assert chain.readable == ((0x8000, 10),) and chain.writable == ((0xA000, 20),)
    assert (chain.readable_len, chain.writable_len, chain.head) == (10, 20, 0)


def test_next_loop_stops_within_queue_size(mem: Counting) -> None:
    put(mem, 0, 0x8000, 1, NEXT, 1)
    put(mem, 1, 0x8000, 1, NEXT, 0)
    with pytest.raises(ChainError, match="longer"):
        walk(mem)
    assert mem.reads[TABLE] <= QSIZE  # no spinning: at most qsize descriptor reads


def test_a_chain_through_every_descriptor_is_legal_one_more_is_not(mem: Counting) -> None:
    for i in range(QSIZE - 1):
        put(mem, i, 0x8000, 1, NEXT, i + 1)
    put(mem, QSIZE - 1, 0x8000, 1)
    assert walk(mem).readable_len == QSIZE
    put(mem, QSIZE - 1, 0x8000, 1, NEXT, 0)  # now it loops
    with pytest.raises(ChainError):
        walk(mem)


def test_next_outside_the_table(mem: Counting) -> None:
    put(mem, 0, 0x8000, 1, NEXT, QSIZE)
    with pytest.raises(ChainError, match="next"):
        walk(mem)


def test_head_outside_the_table(mem: Counting) -> None:
    with pytest.raises(ChainError, match="head"):
        walk(mem, QSIZE)


def test_readable_after_writable(mem: Counting) -> None:
    put(mem, 0, 0x8000, 4, WRITE | NEXT, 1)
    put(mem, 1, 0x9000, 4)
    with pytest.raises(ChainError, match="readable"):
        walk(mem)


def test_total_length_above_2_pow_32() -> None:
    mem = Huge(RAM)
    put(mem, 0, 1 << 40, 0xFFFF_FFFF, NEXT, 1)
    put(mem, 1, 1 << 41, 2, WRITE)
    with pytest.raises(ChainError, match="2\\^32"):
        walk(mem)
    put(mem, 1, 1 << 41, 1, WRITE)  # exactly 2^32 in all: allowed
    assert walk(mem).writable_len == 1


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (RAM, 1),  # just past RAM
        (RAM - 4, 8),  # runs off the end
        ((1 << 64) - 4, 8),  # wraps past 2^64
        (0x8000, 0xFFFF_FFFF),  # huge length: refused, never allocated
    ],
)
def test_buffers_outside_ram(mem: Counting, addr: int, length: int) -> None:
    put(mem, 0, addr, length)
    with pytest.raises(ChainError):
        walk(mem)


def test_a_buffer_ending_exactly_at_the_end_of_ram_is_valid(mem: Counting) -> None:
    put(mem, 0, RAM - 16, 16, WRITE)
    assert walk(mem).writable == ((RAM - 16, 16),)


def test_a_buffer_spanning_a_hole_is_refused() -> None:
    mem = BytearrayMemory(0x4000)
    mem.add(0x5000, bytearray(0x1000))  # hole at [0x4000, 0x5000)
    mem.add(0x6000, bytearray(0x1000))  # adjacent to the previous region: fine
    put(mem, 0, 0x5800, 0x1000)
    assert walk(mem).readable == ((0x5800, 0x1000),)
    put(mem, 0, 0x3800, 0x2000)
    with pytest.raises(ChainError, match="outside guest RAM"):
        walk(mem)


def test_descriptor_table_outside_ram() -> None:
    mem = BytearrayMemory(0x1008)  # the table's first entry is cut short
    with pytest.raises(ChainError):
        read_chain(mem, 0x1000, QSIZE, 0, indirect=False)


# -- indirect tables (§2.7.5.3)

ITABLE = 0x4000


def test_indirect_table(mem: Counting) -> None:
    put(mem, 0, 0x8000, 4, NEXT, 1)  # direct descriptors may come first
    put(mem, 1, ITABLE, 32, INDIRECT | WRITE)  # WRITE on the table pointer is ignored
    put(mem, 0, 0x9000, 8, NEXT, 1, table=ITABLE)
    put(mem, 1, 0xA000, 16, WRITE, table=ITABLE)
    chain = walk(mem)
    assert chain.readable == ((0x8000, 4), (0x9000, 8)) and chain.writable == ((0xA000, 16),)
    assert mem.reads[ITABLE] == 1  # copied once, never re-read


def test_indirect_table_is_a_snapshot(mem: Counting) -> None:
    put(mem, 0, ITABLE, 16, INDIRECT)
    put(mem, 0, 0x9000, 8, table=ITABLE)

    class Racing(Counting):
        def read(self, gpa: int, length: int) -> bytes:
            data = super().read(gpa, length)
            if gpa == ITABLE:  # the guest rewrites the table right after we copied it
                super().write(ITABLE, DESC.pack(1 << 50, 1 << 31, NEXT, 7))
            return data

    racing = Racing(RAM)
    racing.buffers[0][:] = mem.buffers[0]
    assert walk(racing).readable == ((0x9000, 8),)


@pytest.mark.parametrize(
    ("length", "flags", "entries", "indirect", "match"),
    [
        (32, INDIRECT, None, False, "without VIRTIO_F_RING_INDIRECT_DESC"),
        (32, INDIRECT | NEXT, None, True, "NEXT"),
        (24, INDIRECT, None, True, "multiple of 16"),
        (0, INDIRECT, None, True, "multiple of 16"),
        (16 * (QSIZE + 1), INDIRECT, None, True, "queue size"),
        (32, INDIRECT, "nested", True, "inside an indirect"),
        (32, INDIRECT, "loop", True, "longer"),
        (32, INDIRECT, "next-oob", True, "next 2"),
    ],
)
def test_indirect_abuse(
    mem: Counting, length: int, flags: int, entries: str | None, indirect: bool, match: str
) -> None:
    put(mem, 0, ITABLE, length, flags, 1)
    put(mem, 1, 0x8000, 4)
    put(mem, 0, 0x9000, 4, NEXT, 1, table=ITABLE)
    put(mem, 1, 0x9000, 4, table=ITABLE)
    if entries == "nested":
        put(mem, 1, ITABLE, 32, INDIRECT, table=ITABLE)
    elif entries == "loop":
        put(mem, 1, 0x9000, 4, NEXT, 0, table=ITABLE)
    elif entries == "next-oob":
        put(mem, 1, 0x9000, 4, NEXT, 2, table=ITABLE)
    with pytest.raises(ChainError, match=match):
        walk(mem, indirect=indirect)


def test_indirect_table_outside_ram(mem: Counting) -> None:
    put(mem, 0, RAM - 16, 32, INDIRECT)
    with pytest.raises(ChainError, match="indirect table"):
        walk(mem)


# -- Reader and Writer


def test_reader_and_writer_copy_across_segments(mem: Counting) -> None:
    mem.write(0x8000, b"abc")
    mem.write(0x9000, b"defg")
    reader = Reader(mem, ((0x8000, 3), (0x9000, 4)))
    assert reader.read(2) == b"ab" and reader.read(100) == b"cdefg" and reader.read(1) == b""
    writer = Writer(mem, ((0xA000, 2), (0xB000, 3)))
    assert writer.write(b"123456") == 5 and writer.written == 5
    assert mem.read(0xA000, 2) == b"12" and mem.read(0xB000, 3) == b"345"
    assert writer.write(b"x") == 0


def test_reader_never_copies_more_than_the_cap() -> None:
    mem = BytearrayMemory(4 * MAX_COPY)
    reader = Reader(mem, ((0, 3 * MAX_COPY),))
    assert len(reader.read_all()) == MAX_COPY and reader.remaining == 2 * MAX_COPY
    assert reader.skip(10 * MAX_COPY) == 2 * MAX_COPY


def test_a_device_cannot_write_into_device_readable_buffers(mem: Counting) -> None:
    put(mem, 0, 0x8000, 16)  # device-readable only
    mem.write(0x8000, b"R" * 16)
    chain = walk(mem)
    assert Writer(mem, chain.writable).write(b"W" * 16) == 0
    assert mem.read(0x8000, 16) == b"R" * 16


def test_a_read_only_ram_region_turns_into_a_chain_error() -> None:
    mem = BytearrayMemory(0x4000)
    mem.add(0x4000, bytearray(0x1000), read_only=True)
    with pytest.raises(ChainError):
        Writer(mem, ((0x4000, 4),)).write(b"abcd")


# -- RegionMemory.check_ram, the bounds check chains rely on


def test_check_ram() -> None:
    mem = BytearrayMemory(0x1000)
    mem.add(0x1000, bytearray(0x1000))  # adjacent: one RAM range [0, 0x2000)
    mem.add(0x3000, bytearray(0x1000))
    mem.check_ram(0, 0x2000)
    mem.check_ram(0x3FFF, 1)
    mem.check_ram(0x2800, 0)  # empty ranges touch nothing
    for gpa, length in ((0x1800, 0x1000), (0x4000, 1), ((1 << 64) - 1, 2), (-1, 1)):
        with pytest.raises(GuestMemoryError):
            mem.check_ram(gpa, length)
