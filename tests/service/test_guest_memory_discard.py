"""SharedGuestMemory.discard: a balloon's inflated pages really leave the memfd
(MADV_REMOVE), only whole pages of RAM, never of read-only RAM."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

from devserver.devices.balloon import DiscardableMemory
from devserver.errors import GuestMemoryError
from devserver.memory import MemoryRegion
from devserver.service.dma_messages import MessageGuestMemory
from devserver.service.guest_memory import SharedGuestMemory

PAGE = 4096


@pytest.fixture
def fd() -> Iterator[int]:
    fd = os.memfd_create("balloon-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 0x10_0000)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    yield fd
    os.close(fd)


@pytest.fixture
def memory() -> Iterator[SharedGuestMemory]:
    m = SharedGuestMemory()
    yield m
    m.close()


def blocks(fd: int) -> int:
    return os.fstat(fd).st_blocks


def test_shared_memory_is_discardable(memory: SharedGuestMemory) -> None:
    assert isinstance(memory, DiscardableMemory)


def test_discard_punches_holes_across_adjacent_regions(fd: int, memory: SharedGuestMemory) -> None:
    memory.update(
        [
            MemoryRegion(0x0, 0x8000, path=f"/proc/self/fd/{fd}"),
            MemoryRegion(0x8000, 0x8000, path=f"/proc/self/fd/{fd}", file_offset=0x10000),
        ]
    )
    memory.write(0x0, b"\xaa" * 0x10000)
    assert blocks(fd) == 0x10000 // 512
    assert memory.discard(0x6000, 0x4000)  # two pages in each region
    assert blocks(fd) == 0xC000 // 512
    assert memory.read(0x6000, 0x4000) == bytes(0x4000)  # they read zero, and fault back
    assert memory.read(0x5000, 1) == b"\xaa"
    memory.write(0x6000, b"\x01")
    assert memory.read(0x6000, 1) == b"\x01"


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(0xF000, 2 * PAGE), (0x1_0000_0000, PAGE), (-PAGE, PAGE), (0, -1)],
)
def test_outside_ram_is_an_error(fd: int, memory: SharedGuestMemory, gpa: int, length: int) -> None:
    memory.update([MemoryRegion(0x0, 0x10000, path=f"/proc/self/fd/{fd}")])
    with pytest.raises(GuestMemoryError):
        memory.discard(gpa, length)


def test_partial_pages_and_read_only_ram_are_kept(fd: int, memory: SharedGuestMemory) -> None:
    memory.update(
        [
            MemoryRegion(0x0, 0x4000, path=f"/proc/self/fd/{fd}"),
            MemoryRegion(0x4000, 0x4000, path=f"/proc/self/fd/{fd}", read_only=True),
        ]
    )
    os.pwrite(fd, b"\xaa" * 0x4000, 0)
    assert not memory.discard(0x100, PAGE)  # not page-aligned
    assert not memory.discard(0x0, 0x100)  # not a whole page
    assert not memory.discard(0x4000, PAGE)  # read-only RAM
    assert memory.read(0x0, 0x4000) == b"\xaa" * 0x4000


def test_dma_messages_memory_has_nothing_to_discard() -> None:
    """With DMA messages the server maps no RAM: the balloon only counts."""
    assert not hasattr(MessageGuestMemory, "discard")
