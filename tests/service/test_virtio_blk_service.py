"""virtio-blk through a real server in SHARED memory mode (virtio 1.2 §5.2 over
§4.1): guest RAM is a memfd this process made (named /proc/self/fd/N to the
server, which runs in this process); the fake driver writes its rings into the
memfd and makes every register access over the gRPC stream, and requests
reach a real image file. The driver runs in a worker thread with SyncSession,
so the server's event loop (this test's) stays free to serve it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.config import parse_device_spec
from devserver.devices.blk import (
    HEADER,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlk,
)
from devserver.effects import Effect
from devserver.errors import ConfigError
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.service.server import DevServer, Listen
from devserver.virtio.device import QUEUE_WEIGHT
from devserver.virtio.pci_transport import VIRTIO_BAR, VirtioPciFunction
from devserver.virtio.spec import DeviceStatus
from tests.unit.devices.test_blk import FakeDisk
from tests.unit.virtio.driver import RAM_SIZE, FakeVirtioDriver
from vmm_client.client import FrontendOptions, MemoryRegion, SyncSession

SLOT = 3
IMAGE_SIZE = 1 << 20


class GrpcDriver(FakeVirtioDriver):
    """FakeVirtioDriver whose accesses travel over the Attach stream and whose
    guest RAM is the memfd the server maps."""

    def __init__(self, session: SyncSession, ram_fd: int) -> None:
        # The local function and memory only satisfy the base class; nothing uses them.
        local = VirtioPciFunction(VirtioBlk(FakeDisk()), presentation=Presentation(msix=False))
        super().__init__(local, BytearrayMemory(0x10))
        self.session = session
        self.ram_fd = ram_fd
        self.events: list[Effect] = []

    def read(self, offset: int, size: int) -> int:
        return self.session.bar_read(SLOT, VIRTIO_BAR, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.session.bar_write(SLOT, VIRTIO_BAR, offset, size, value)

    def cfg_read(self, offset: int, size: int) -> int:
        return self.session.config_read(0, SLOT, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.events.extend(self.session.config_write(0, SLOT, 0, offset, size, value))

    def take(self) -> list[Effect]:
        out, self.events = self.events, []
        return out

    def put(self, gpa: int, data: bytes) -> None:
        os.pwrite(self.ram_fd, data, gpa)

    def get(self, gpa: int, length: int) -> bytes:
        return os.pread(self.ram_fd, length, gpa)

    def wait_used(self, q: int, count: int) -> list[tuple[int, int]]:
        """Used entries until `count` arrived (a read is a barrier for the posted
        kick; continuations may finish a little later)."""
        got: list[tuple[int, int]] = []
        for _ in range(500):
            self.read(0x14, 1)
            got += self.used(q)
            if len(got) >= count:
                return got
            time.sleep(0.01)
        return got


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("virtio-blk-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    yield fd
    os.close(fd)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(IMAGE_SIZE))
    return path


async def start_server(tmp_path: Path, spec: str) -> DevServer:
    srv = DevServer([parse_device_spec(spec)], Listen(unix_path=tmp_path / "run" / "blk.sock"))
    await srv.start()
    return srv


@pytest_asyncio.fixture
async def server(tmp_path: Path, image: Path) -> AsyncIterator[DevServer]:
    srv = await start_server(tmp_path, f"virtio-blk,slot={SLOT},path={image},serial=svc-disk")
    yield srv
    await srv.stop(0)


def request(drv: GrpcDriver, type_: int, sector: int, out: bytes, in_len: int) -> tuple[int, int]:
    """Queue one request (not kicked); returns (data-in gpa, status gpa)."""
    hdr = drv.alloc(16)
    drv.put(hdr, HEADER.pack(type_, 0, sector))
    buffers = [(hdr, 16, False)]
    data = 0
    if out:
        data = drv.alloc(len(out))
        drv.put(data, out)
        buffers.append((data, len(out), False))
    if in_len:
        data = drv.alloc(in_len)
        buffers.append((data, in_len, True))
    status = drv.alloc(1)
    drv.put(status, b"\xee")
    buffers.append((status, 1, True))
    drv.publish(0, drv.add_chain(0, buffers))
    return data, status


def session(server: DevServer, mode: int, ram: int) -> SyncSession:
    regions: tuple[MemoryRegion, ...] = ()
    if mode == pb.MEMORY_MODE_SHARED:
        regions = (MemoryRegion(0, RAM_SIZE, path=f"/proc/self/fd/{ram}"),)
    return SyncSession(
        server.address,
        FrontendOptions("blk-test", msi=False, memory_mode=mode, regions=regions),
    )


async def test_requests_reach_the_image_file(server: DevServer, ram: int, image: Path) -> None:
    def drive() -> None:
        with session(server, pb.MEMORY_MODE_SHARED, ram) as s:
            drv = GrpcDriver(s, ram)
            drv.start(1, msix=False)
            assert drv.status & DeviceStatus.DRIVER_OK
            pattern = os.urandom(4096)
            _, st_out = request(drv, VIRTIO_BLK_T_OUT, 8, pattern, 0)
            _, st_flush = request(drv, VIRTIO_BLK_T_FLUSH, 0, b"", 0)
            data_in, st_in = request(drv, VIRTIO_BLK_T_IN, 8, b"", 4096)
            id_gpa, _ = request(drv, VIRTIO_BLK_T_GET_ID, 0, b"", 20)
            _, st_bad = request(drv, VIRTIO_BLK_T_IN, IMAGE_SIZE // 512, b"", 512)
            drv.kick(0)
            used = drv.wait_used(0, 5)
            assert [length for _, length in used] == [1, 1, 4097, 21, 1]
            assert drv.get(st_out, 1)[0] == drv.get(st_flush, 1)[0] == VIRTIO_BLK_S_OK
            assert drv.get(st_in, 1)[0] == VIRTIO_BLK_S_OK
            assert drv.get(data_in, 4096) == pattern
            assert drv.get(id_gpa, 20) == b"svc-disk".ljust(20, b"\0")
            assert drv.get(st_bad, 1)[0] == VIRTIO_BLK_S_IOERR
            # INTx rose for the used buffers; reading ISR lowers it.
            assert drv.isr() & 1
            with open(image, "rb") as f:
                f.seek(8 * 512)
                assert f.read(4096) == pattern

    await asyncio.to_thread(drive)


async def test_more_than_a_kicks_budget_completes_by_continuation(
    server: DevServer, ram: int, image: Path
) -> None:
    n = QUEUE_WEIGHT + 20  # three descriptors each: 252 of the queue's 256

    def drive() -> None:
        with session(server, pb.MEMORY_MODE_SHARED, ram) as s:
            drv = GrpcDriver(s, ram)
            drv.start(1, msix=False)
            statuses = []
            for i in range(n):
                _, st = request(drv, VIRTIO_BLK_T_OUT, i, bytes([i]) * 512, 0)
                statuses.append(st)
            drv.kick(0)  # one kick, more than one budget of work
            assert len(drv.wait_used(0, n)) == n
            assert all(drv.get(st, 1)[0] == VIRTIO_BLK_S_OK for st in statuses)
        data = image.read_bytes()
        assert all(data[i * 512 : (i + 1) * 512] == bytes([i]) * 512 for i in range(n))

    await asyncio.to_thread(drive)


@pytest.mark.parametrize("mode", [pb.MEMORY_MODE_NONE])
async def test_without_guest_memory_the_device_needs_reset(
    server: DevServer, ram: int, mode: int
) -> None:
    def drive() -> None:
        with session(server, mode, ram) as s:
            drv = GrpcDriver(s, ram)
            drv.enable_bus_master()
            drv.negotiate()
            drv.driver_ok()
            assert drv.status & DeviceStatus.DEVICE_NEEDS_RESET

    await asyncio.to_thread(drive)


async def test_a_bad_image_is_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "odd.img"
    bad.write_bytes(b"x" * 1000)
    with pytest.raises(ConfigError, match="multiple of 512"):
        await start_server(tmp_path, f"virtio-blk,path={bad}")
    with pytest.raises(ConfigError, match="cannot open"):
        await start_server(tmp_path, f"virtio-blk,path={tmp_path / 'none.img'}")


async def test_ram_given_by_memory_map_update_is_attached(server: DevServer, ram: int) -> None:
    """SHARED with no RAM at Hello: the queues cannot start until a MemoryMapUpdate
    brings RAM, which the server attaches to the virtio function."""

    def drive() -> None:
        with SyncSession(
            server.address,
            FrontendOptions("blk-test", msi=False, memory_mode=pb.MEMORY_MODE_SHARED),
        ) as s:
            s.memory_map_update([MemoryRegion(0, RAM_SIZE, path=f"/proc/self/fd/{ram}")])
            drv = GrpcDriver(s, ram)
            drv.start(1, msix=False)
            assert not drv.status & DeviceStatus.DEVICE_NEEDS_RESET
            _, st = request(drv, VIRTIO_BLK_T_FLUSH, 0, b"", 0)
            drv.kick(0)
            assert drv.wait_used(0, 1) == [(0, 1)]
            assert drv.get(st, 1)[0] == VIRTIO_BLK_S_OK

    await asyncio.to_thread(drive)


@pytest.mark.parametrize("cache", ["none", "directsync"])
async def test_direct_cache_modes_reach_the_image_file(
    tmp_path: Path, ram: int, image: Path, cache: str
) -> None:
    """cache=none / directsync (O_DIRECT): a block-aligned request and one that
    is only sector-aligned (the backend's bounce buffer widens it) both land."""
    try:
        os.close(os.open(image, os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        reason = f"{tmp_path} refuses O_DIRECT ({e.strerror})"
        print(reason)
        pytest.skip(reason)
    srv = await start_server(tmp_path, f"virtio-blk,slot={SLOT},path={image},cache={cache}")
    aligned, odd = os.urandom(4096), os.urandom(3 * 512)  # sectors 16-23, 17-19

    def drive() -> None:
        with session(srv, pb.MEMORY_MODE_SHARED, ram) as s:
            drv = GrpcDriver(s, ram)
            drv.start(1, msix=False)
            _, st_a = request(drv, VIRTIO_BLK_T_OUT, 16, aligned, 0)
            _, st_b = request(drv, VIRTIO_BLK_T_OUT, 17, odd, 0)  # inside the first
            _, st_flush = request(drv, VIRTIO_BLK_T_FLUSH, 0, b"", 0)
            data_in, st_in = request(drv, VIRTIO_BLK_T_IN, 15, b"", 10 * 512)
            drv.kick(0)
            assert [n for _, n in drv.wait_used(0, 4)] == [1, 1, 1, 10 * 512 + 1]
            for st in (st_a, st_b, st_flush, st_in):
                assert drv.get(st, 1)[0] == VIRTIO_BLK_S_OK
            want = bytes(512) + aligned[:512] + odd + aligned[2048:] + bytes(512)
            assert drv.get(data_in, 10 * 512) == want

    try:
        await asyncio.to_thread(drive)
    finally:
        await srv.stop(0)
    on_disk = await asyncio.to_thread(image.read_bytes)
    assert on_disk[15 * 512 : 25 * 512] == (
        bytes(512) + aligned[:512] + odd + aligned[2048:] + bytes(512)
    )
