"""virtio-balloon through a real server and the Balloon RPC (protocol 1.3;
virtio 1.2 §5.5 over §4.1): guest RAM is a memfd this process made, mapped by
the server in SHARED mode; the fake driver makes every register access over
the Attach stream from a worker thread while the RPCs go on their own channel.
A target reaches the driver as a configuration interrupt, inflated pages are
really freed in the memfd, stats come back in the reply, hostile PFNs are
ignored and counted, and a target outlives the session it was set in.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc
from devserver.config import parse_device_spec
from devserver.devices.balloon import (
    CONFIG,
    INFLATEQ,
    PAGE_SIZE,
    STAT,
    STATSQ,
    VirtioBalloon,
)
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.service.balloon import describe, main
from devserver.service.server import DevServer, Listen
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET, VIRTIO_BAR, VirtioPciFunction
from devserver.virtio.spec import DeviceStatus
from tests.unit.virtio.driver import RAM_SIZE, FakeVirtioDriver
from vmm_client.client import FrontendOptions, MemoryRegion, SyncSession

SLOT = 3
TESTDEV_SLOT = 4
MIB = 1 << 20
VIRTIO_PCI_ISR_CONFIG = 2


class GrpcDriver(FakeVirtioDriver):
    """FakeVirtioDriver over the Attach stream, its rings in the shared memfd."""

    def __init__(self, session: SyncSession, ram_fd: int) -> None:
        local = VirtioPciFunction(VirtioBalloon(), presentation=Presentation(msix=False))
        super().__init__(local, BytearrayMemory(0x10))
        self.session = session
        self.ram_fd = ram_fd

    def read(self, offset: int, size: int) -> int:
        return self.session.bar_read(SLOT, VIRTIO_BAR, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.session.bar_write(SLOT, VIRTIO_BAR, offset, size, value)

    def cfg_read(self, offset: int, size: int) -> int:
        return self.session.config_read(0, SLOT, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.session.config_write(0, SLOT, 0, offset, size, value)

    def take(self) -> list[object]:  # type: ignore[override]
        return []

    def put(self, gpa: int, data: bytes) -> None:
        os.pwrite(self.ram_fd, data, gpa)

    def get(self, gpa: int, length: int) -> bytes:
        return os.pread(self.ram_fd, length, gpa)

    def wait_used(self, q: int, count: int) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        for _ in range(500):
            self.read(0x14, 1)  # a read is a barrier for the posted kick
            got += self.used(q)
            if len(got) >= count:
                return got
            time.sleep(0.01)
        return got

    def config(self) -> tuple[int, int]:
        num_pages = self.read(DEVICE_CFG_OFFSET, 4)
        actual = self.read(DEVICE_CFG_OFFSET + 4, 4)
        return num_pages, actual

    def post(self, q: int, data: bytes) -> int:
        gpa = self.alloc(max(len(data), 1))
        self.put(gpa, data)
        head = self.add_chain(q, [(gpa, len(data), False)])
        self.publish(q, head)
        self.kick(q)
        return head


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("virtio-balloon-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    yield fd
    os.close(fd)


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DevServer]:
    specs = [
        parse_device_spec(f"virtio-balloon,slot={SLOT}"),
        parse_device_spec(f"pci-testdev,slot={TESTDEV_SLOT}"),
    ]
    srv = DevServer(specs, Listen(unix_path=tmp_path / "run" / "balloon.sock"))
    await srv.start()
    yield srv
    await srv.stop(0)


def session(server: DevServer, ram: int) -> SyncSession:
    regions = (MemoryRegion(0, RAM_SIZE, path=f"/proc/self/fd/{ram}"),)
    return SyncSession(
        server.address,
        FrontendOptions(
            "balloon-test", msi=False, memory_mode=pb.MEMORY_MODE_SHARED, regions=regions
        ),
    )


def call(stub: devmodel_pb2_grpc.DeviceModelStub, target: int | None = None) -> pb.BalloonReply:
    request = pb.BalloonRequest(device_id=SLOT)
    if target is not None:
        request.target_bytes = target
    reply: pb.BalloonReply = stub.Balloon(request, timeout=30)
    return reply


def test_config_registers_the_type() -> None:
    spec = parse_device_spec("virtio-balloon,name=mem")
    assert spec.type == "virtio-balloon" and spec.name == "mem"


async def test_target_actual_inflate_and_stats(server: DevServer, ram: int) -> None:
    def drive() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = devmodel_pb2_grpc.DeviceModelStub(channel)
            before = call(stub)
            assert (before.target_bytes, before.actual_bytes, before.driver_ok) == (0, 0, False)
            with session(server, ram) as s:
                drv = GrpcDriver(s, ram)
                # Linux primes statsq before DRIVER_OK (so that kick is dropped).
                drv.enable_bus_master()
                drv.negotiate()
                for q in range(3):
                    drv.setup_queue(q)
                stats_head = drv.post(STATSQ, STAT.pack(4, 123 * MIB) + STAT.pack(5, 512 * MIB))
                drv.driver_ok()
                assert drv.status & DeviceStatus.DRIVER_OK
                drv.isr()  # clear
                # A target: the driver is told by a configuration interrupt.
                reply = call(stub, 64 * MIB + 100)  # rounded down to pages
                assert reply.target_bytes == 64 * MIB and reply.driver_ok
                assert reply.stats["free-memory"] == 123 * MIB
                assert reply.stats["total-memory"] == 512 * MIB
                assert drv.isr() & VIRTIO_PCI_ISR_CONFIG
                assert drv.config() == (64 * MIB // PAGE_SIZE, 0)
                # The stats request gave the buffer back for a refill.
                assert drv.wait_used(STATSQ, 1) == [(stats_head, 0)]
                # Inflate pages the guest wrote: the memfd's blocks go.
                first = RAM_SIZE // PAGE_SIZE // 2
                pages = 32
                os.pwrite(ram, b"\xab" * pages * PAGE_SIZE, first * PAGE_SIZE)
                blocks = os.fstat(ram).st_blocks
                pfns = [*range(first, first + pages), 0xFFFF_FFFF]  # one hostile PFN
                head = drv.post(INFLATEQ, b"".join(struct.pack("<I", p) for p in pfns))
                assert drv.wait_used(INFLATEQ, 1) == [(head, 0)]
                # (the PFN array itself may have taken a new ring-side page)
                assert os.fstat(ram).st_blocks <= blocks - (pages - 1) * PAGE_SIZE // 512
                with pytest.raises(OSError):  # ENXIO: no data from there to the end
                    os.lseek(ram, first * PAGE_SIZE, os.SEEK_DATA)
                assert drv.get(first * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
                drv.write(DEVICE_CFG_OFFSET + 4, 4, pages)  # the driver's actual
                reply = call(stub)
                assert reply.actual_bytes == pages * PAGE_SIZE
                assert reply.pages_freed == pages and reply.pfns_ignored == 1
                assert "guest holds 0.125 MiB" in describe(reply)
                # Target 0: another interrupt; the config says so.
                call(stub, 0)
                assert drv.isr() & VIRTIO_PCI_ISR_CONFIG
                assert drv.config() == (0, pages)
            # A target set with no frontend waits for the next one.
            assert call(stub, 2 * MIB).target_bytes == 2 * MIB
            with session(server, ram) as s:
                drv = GrpcDriver(s, ram)
                drv.start(3, msix=False)
                assert drv.config() == (2 * MIB // PAGE_SIZE, 0)

    await asyncio.to_thread(drive)


@pytest.mark.parametrize(
    ("device_id", "target", "code"),
    [
        (30, None, grpc.StatusCode.NOT_FOUND),
        (TESTDEV_SLOT, None, grpc.StatusCode.FAILED_PRECONDITION),
        (SLOT, 1 << 44, grpc.StatusCode.INVALID_ARGUMENT),  # 2^32 pages
    ],
)
async def test_bad_requests(
    server: DevServer, device_id: int, target: int | None, code: grpc.StatusCode
) -> None:
    request = pb.BalloonRequest(device_id=device_id)
    if target is not None:
        request.target_bytes = target
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = devmodel_pb2_grpc.DeviceModelStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Balloon(request, timeout=30)
        assert info.value.code() == code
        # The server goes on.
        ok = await stub.Balloon(pb.BalloonRequest(device_id=SLOT), timeout=30)
        assert ok.target_bytes == 0


async def test_cli(server: DevServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(main, [server.address, str(SLOT), "--target", "8"]) == 0
    assert "target 8 MiB" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [server.address, "30"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [server.address, str(SLOT), "--target", "-1"]) == 2


def test_config_struct() -> None:
    assert CONFIG.size == 8
