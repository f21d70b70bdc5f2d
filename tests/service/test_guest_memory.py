"""SharedGuestMemory over real memfds and files, reached the way the bridge names them."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devserver.effects import AddressRange
from devserver.errors import GuestMemoryError, MemoryMapError
from devserver.memory import MemoryRegion
from devserver.service.guest_memory import SharedGuestMemory


class Memfds:
    def __init__(self) -> None:
        self.fds: list[int] = []

    def make(self, size: int, *, seal: bool = True) -> int:
        fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        if seal:  # as QEMU's memory-backend-memfd does
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.fds.append(fd)
        return fd


@pytest.fixture
def memfds() -> Iterator[Memfds]:
    m = Memfds()
    yield m
    for fd in m.fds:
        os.close(fd)


@pytest.fixture
def memory() -> Iterator[SharedGuestMemory]:
    m = SharedGuestMemory()
    yield m
    m.close()


def path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def fds_to(target: str) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            count += os.readlink(f"/proc/self/fd/{name}") == target
    return count


def test_reads_and_writes_reach_the_memfd(memfds: Memfds, memory: SharedGuestMemory) -> None:
    fd = memfds.make(0x20000)
    # A region that starts mid-file and mid-page: the map is page-aligned below it.
    memory.update([MemoryRegion(0x10_0000, 0x1_0000, path=path(fd), file_offset=0x1800)])
    os.pwrite(fd, b"from the guest", 0x1800 + 0x10)
    assert memory.read(0x10_0010, 14) == b"from the guest"
    memory.write(0x10_FFF8, b"lastbyte")  # ends exactly at the region's end
    assert os.pread(fd, 8, 0x1800 + 0xFFF8) == b"lastbyte"


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(0xF_FFFF, 2), (0x11_0000, 1), (0x10_FFFF, 2), (0, 1), (2**64 - 1, 2)],
    ids=["below", "past-end", "runs-off", "zero", "wraps"],
)
def test_bounds(memfds: Memfds, memory: SharedGuestMemory, gpa: int, length: int) -> None:
    fd = memfds.make(0x1_0000)
    memory.update([MemoryRegion(0x10_0000, 0x1_0000, path=path(fd))])
    with pytest.raises(GuestMemoryError):
        memory.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        memory.write(gpa, bytes(length))
    assert os.pread(fd, 0x1_0000, 0) == bytes(0x1_0000)


def test_adjacent_regions_in_two_memfds_take_one_access(
    memfds: Memfds, memory: SharedGuestMemory
) -> None:
    low, high = memfds.make(0x1000), memfds.make(0x1000)
    memory.update(
        [
            MemoryRegion(0x0, 0x1000, path=path(low)),
            MemoryRegion(0x1000, 0x1000, path=path(high)),
            MemoryRegion(0x3000, 0x1000, path=path(high)),  # same file again, after a hole
        ]
    )
    memory.write(0xFFC, b"12345678")
    assert os.pread(low, 4, 0xFFC) == b"1234" and os.pread(high, 4, 0) == b"5678"
    assert memory.read(0xFFC, 8) == b"12345678"
    with pytest.raises(GuestMemoryError, match="hole at 0x2000"):
        memory.read(0x1FFC, 8)


def test_read_only_region(memfds: Memfds, memory: SharedGuestMemory) -> None:
    fd = memfds.make(0x1000)
    os.pwrite(fd, b"rom", 0)
    memory.update([MemoryRegion(0x0, 0x1000, path=path(fd), read_only=True)])
    assert memory.read(0, 3) == b"rom"
    with pytest.raises(GuestMemoryError, match="read-only"):
        memory.write(0, b"x")


def test_updates_remove_then_add_and_unmap(memfds: Memfds, memory: SharedGuestMemory) -> None:
    fd = memfds.make(0x2000)
    target = os.readlink(path(fd))
    memory.update([MemoryRegion(0x0, 0x2000, path=path(fd))])
    assert fds_to(target) == 2  # ours, and the one the mapping holds
    # Split it in two: one update removes the old region and adds both halves.
    memory.update(
        [
            MemoryRegion(0x0, 0x1000, path=path(fd)),
            MemoryRegion(0x1000, 0x1000, path=path(fd), file_offset=0x1000),
        ],
        [AddressRange(0x0, 0x2000)],
    )
    assert [e.base for e in memory.regions] == [0x0, 0x1000]
    assert fds_to(target) == 3
    memory.update([], [AddressRange(0x0, 0x2000)])
    assert len(memory.regions) == 0 and fds_to(target) == 1


@pytest.mark.parametrize(
    ("make", "needle", "unreachable"),
    [
        (lambda fd, tmp: MemoryRegion(0, 0x2000, path=path(fd)), "past the end", False),
        (
            lambda fd, tmp: MemoryRegion(0, 0x1000, path=path(fd), file_offset=0x800),
            "past the end",
            False,
        ),
        (lambda fd, tmp: MemoryRegion(0, 0x1000, path=str(tmp / "missing")), "cannot open", True),
        (lambda fd, tmp: MemoryRegion(0, 0x1000, path=str(tmp)), "cannot open", True),
        (lambda fd, tmp: MemoryRegion(0, 0x1000, path="/dev/null"), "not a regular file", False),
        (lambda fd, tmp: MemoryRegion(0, 0x1000), "needs a path", False),
        (lambda fd, tmp: MemoryRegion(0x8000, 0x1000, path=path(fd)), "overlaps", False),
    ],
    ids=["too-big", "offset-too-big", "missing", "directory", "device", "no-path", "overlap"],
)
def test_a_bad_update_changes_nothing(
    memfds: Memfds,
    memory: SharedGuestMemory,
    tmp_path: Path,
    make: Callable[[int, Path], MemoryRegion],
    needle: str,
    unreachable: bool,
) -> None:
    fd = memfds.make(0x1000)
    target = os.readlink(path(fd))
    memory.update([MemoryRegion(0x8000, 0x1000, path=path(fd))])
    good = MemoryRegion(0x20000, 0x1000, path=path(fd))
    with pytest.raises(MemoryMapError, match=needle) as info:
        memory.update([good, make(fd, tmp_path)])
    assert info.value.unreachable == unreachable
    assert [e.base for e in memory.regions] == [0x8000]
    assert fds_to(target) == 2  # the good region's mapping was undone


def test_unsealed_memfd_is_logged(
    memfds: Memfds, memory: SharedGuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    import devserver.service.guest_memory as gm

    gm._warned_unsealed = False
    memory.update([MemoryRegion(0, 0x1000, path=path(memfds.make(0x1000, seal=False)))])
    assert "F_SEAL_SHRINK" in caplog.text
    caplog.clear()
    memory.update([MemoryRegion(0x1000, 0x1000, path=path(memfds.make(0x1000, seal=False)))])
    assert "F_SEAL_SHRINK" not in caplog.text  # once


def test_close_unmaps_everything(memfds: Memfds) -> None:
    fd = memfds.make(0x1000)
    target = os.readlink(path(fd))
    memory = SharedGuestMemory()
    memory.update([MemoryRegion(0, 0x1000, path=path(fd))])
    memory.close()
    assert fds_to(target) == 1
    with pytest.raises(GuestMemoryError):
        memory.read(0, 1)
