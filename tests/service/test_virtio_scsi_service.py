"""virtio-scsi through a real server (virtio 1.2 §5.6 over §4.1): the fake
driver makes every register access over the gRPC stream and its rings live
in a memfd the server maps (SHARED mode; DMA messages are the guest tests');
commands reach real image files, two disks on one device (targets 0 and 1),
and a `readonly=on` device refuses writes.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.config import parse_device_spec
from devserver.devices import scsi_commands as sc
from devserver.devices.scsi import CDB_SIZE, CMD_REQ, CMD_RESP, REQUEST_QUEUE, RESP_SIZE
from devserver.errors import ConfigError
from devserver.service.server import DevServer, Listen
from devserver.virtio.spec import DeviceStatus
from tests.service.test_virtio_blk_service import SLOT, GrpcDriver
from tests.unit.virtio.driver import RAM_SIZE
from vmm_client.client import FrontendOptions, MemoryRegion, SyncSession

IMAGE_SIZE = 1 << 20


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("virtio-scsi-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    yield fd
    os.close(fd)


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(IMAGE_SIZE))
    b.write_bytes(b"\x5a" * (IMAGE_SIZE // 2))
    return a, b


@pytest_asyncio.fixture
async def server(tmp_path: Path, images: tuple[Path, Path]) -> AsyncIterator[DevServer]:
    a, b = images
    srv = await start_server(tmp_path, f"virtio-scsi,slot={SLOT},disk={a},disk={b}")
    yield srv
    await srv.stop(0)


@pytest_asyncio.fixture
async def ro_server(tmp_path: Path, images: tuple[Path, Path]) -> AsyncIterator[DevServer]:
    srv = await start_server(tmp_path, f"virtio-scsi,slot={SLOT},disk={images[1]},readonly=on")
    yield srv
    await srv.stop(0)


async def start_server(tmp_path: Path, spec: str) -> DevServer:
    srv = DevServer([parse_device_spec(spec)], Listen(unix_path=tmp_path / "run" / "scsi.sock"))
    await srv.start()
    return srv


def lun(target: int) -> bytes:
    return bytes((1, target, 0x40, 0, 0, 0, 0, 0))


def command(
    drv: GrpcDriver, cdb: bytes, target: int = 0, out: bytes = b"", din: int = 0
) -> tuple[int, int]:
    """Queue one command (not kicked); returns (response gpa, data-in gpa)."""
    req = CMD_REQ.pack(lun(target), 1, 0, 0, 0, cdb.ljust(CDB_SIZE, b"\0"))
    gpa = drv.alloc(len(req))
    drv.put(gpa, req)
    buffers = [(gpa, len(req), False)]
    if out:
        data = drv.alloc(len(out))
        drv.put(data, out)
        buffers.append((data, len(out), False))
    resp = drv.alloc(RESP_SIZE)
    buffers.append((resp, RESP_SIZE, True))
    data_in = 0
    if din:
        data_in = drv.alloc(din)
        buffers.append((data_in, din, True))
    drv.publish(REQUEST_QUEUE, drv.add_chain(REQUEST_QUEUE, buffers))
    return resp, data_in


def status(drv: GrpcDriver, resp: int) -> tuple[int, int, bytes]:
    """(SCSI status, virtio response, sense)."""
    sense_len, _resid, _q, st, response = CMD_RESP.unpack(drv.get(resp, CMD_RESP.size))
    return st, response, drv.get(resp + CMD_RESP.size, sense_len)


def session(server: DevServer, ram: int) -> SyncSession:
    regions = (MemoryRegion(0, RAM_SIZE, path=f"/proc/self/fd/{ram}"),)
    return SyncSession(
        server.address,
        FrontendOptions("scsi-test", msi=False, memory_mode=pb.MEMORY_MODE_SHARED, regions=regions),
    )


async def test_commands_reach_the_images(
    server: DevServer, ram: int, images: tuple[Path, Path]
) -> None:
    a, _ = images

    def drive() -> None:
        with session(server, ram) as s:
            drv = GrpcDriver(s, ram)
            drv.start(3, msix=False)
            assert drv.status & DeviceStatus.DRIVER_OK
            pattern = os.urandom(4096)
            r_inq, d_inq = command(drv, bytes((0x12, 0, 0, 0, 36)), din=36)
            r_cap, d_cap = command(drv, bytes((0x25,)), target=1, din=8)
            r_w, _ = command(drv, bytes((0x2A, 0)) + struct.pack(">IxH", 16, 8), out=pattern)
            r_sync, _ = command(drv, bytes((0x35,)))
            r_r, d_r = command(drv, bytes((0x28, 0)) + struct.pack(">IxH", 16, 8), din=4096)
            r_bad, _ = command(drv, bytes((0x28, 0)) + struct.pack(">IxH", 2048, 1), din=512)
            drv.kick(REQUEST_QUEUE)
            used = drv.wait_used(REQUEST_QUEUE, 6)
            assert [n for _, n in used] == [
                RESP_SIZE + 36,
                RESP_SIZE + 8,
                RESP_SIZE,
                RESP_SIZE,
                RESP_SIZE + 4096,
                RESP_SIZE,
            ]
            for resp in (r_inq, r_cap, r_w, r_sync, r_r):
                assert status(drv, resp)[:2] == (sc.GOOD, 0)
            assert drv.get(d_inq + 8, 8) == sc.VENDOR
            assert struct.unpack(">II", drv.get(d_cap, 8)) == (IMAGE_SIZE // 2 // 512 - 1, 512)
            assert drv.get(d_r, 4096) == pattern
            st, _, sense = status(drv, r_bad)
            assert st == sc.CHECK_CONDITION and sense[12] == 0x21
        with open(a, "rb") as f:
            f.seek(16 * 512)
            assert f.read(4096) == pattern

    await asyncio.to_thread(drive)


async def test_readonly_device_refuses_writes(
    ro_server: DevServer, ram: int, images: tuple[Path, Path]
) -> None:
    _, b = images
    before = b.read_bytes()

    def drive() -> None:
        with session(ro_server, ram) as s:
            drv = GrpcDriver(s, ram)
            drv.start(3, msix=False)
            r_w, _ = command(drv, bytes((0x2A, 0)) + struct.pack(">IxH", 0, 1), out=bytes(512))
            r_ms, d_ms = command(drv, bytes((0x1A, 0, 0x3F, 0, 64)), din=64)
            drv.kick(REQUEST_QUEUE)
            assert len(drv.wait_used(REQUEST_QUEUE, 2)) == 2
            st, _, sense = status(drv, r_w)
            assert st == sc.CHECK_CONDITION and sense[2] == sc.DATA_PROTECT
            assert status(drv, r_ms)[0] == sc.GOOD and drv.get(d_ms, 4)[2] == 0x80

    await asyncio.to_thread(drive)
    assert b.read_bytes() == before


def test_missing_image_is_refused_at_start(tmp_path: Path) -> None:
    spec = parse_device_spec(f"virtio-scsi,disk={tmp_path / 'nope.img'}")
    with pytest.raises(ConfigError, match="cannot open disk image"):
        DevServer([spec], Listen(unix_path=tmp_path / "run" / "x.sock"))
