"""Where the server serves a virtio access (virtio_runner.py): on its event loop
when it only moves transport state, in a worker thread when it can run the
device (a kick, a status write, a function reset); and the NEEDS_RESET log
line a latch leaves on the server (needs_reset_log.py). Through a real server
in this process and the fake driver of test_virtio_blk_service.py.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.devices.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from devserver.service import virtio_runner
from devserver.service.requests import serve_request
from devserver.service.server import DevServer
from devserver.service.session import Session
from devserver.virtio.pci_transport import DEVICE_STATUS, NOTIFY_CFG_OFFSET
from devserver.virtio.spec import DeviceStatus
from tests.service.test_virtio_blk_service import (
    IMAGE_SIZE,
    SLOT,
    GrpcDriver,
    request,
    session,
    start_server,
)
from tests.unit.virtio.driver import RAM_SIZE


@dataclass(frozen=True)
class Served:
    kind: str
    offset: int  # BAR or config offset; -1 for other requests
    on_loop: bool


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("runner-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    yield fd
    os.close(fd)


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DevServer]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_SIZE))
    srv = await start_server(tmp_path, f"virtio-blk,slot={SLOT},path={image}")
    yield srv
    await srv.stop(0)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Served]:
    """Every virtio access the server serves, and whether it ran on the loop."""
    seen: list[Served] = []
    loop_thread = threading.get_ident()

    def spy(s: Session, req: pb.Request, items: list[pb.ServerItem]) -> None:
        kind = req.WhichOneof("kind") or ""
        offset = getattr(getattr(req, kind), "offset", -1) if kind else -1
        seen.append(Served(kind, offset, threading.get_ident() == loop_thread))
        serve_request(s, req, items)

    monkeypatch.setattr(virtio_runner, "serve_request", spy)
    return seen


def drive_one_read_and_write(server: DevServer, ram: int) -> None:
    with session(server, pb.MEMORY_MODE_SHARED, ram) as s:
        drv = GrpcDriver(s, ram)
        drv.start(1, msix=False)
        assert drv.status & DeviceStatus.DRIVER_OK
        pattern = os.urandom(512)
        _, st_out = request(drv, VIRTIO_BLK_T_OUT, 1, pattern, 0)
        data_in, st_in = request(drv, VIRTIO_BLK_T_IN, 1, b"", 512)
        drv.kick(0)
        assert len(drv.wait_used(0, 2)) == 2
        assert drv.get(st_out, 1)[0] == drv.get(st_in, 1)[0] == VIRTIO_BLK_S_OK
        assert drv.get(data_in, 512) == pattern


def blocking(access: Served) -> bool:
    return access.kind == "bar_write" and (
        access.offset == DEVICE_STATUS or access.offset >= NOTIFY_CFG_OFFSET
    )


async def test_only_what_can_run_the_device_leaves_the_loop(
    server: DevServer, ram: int, served: list[Served]
) -> None:
    await asyncio.to_thread(drive_one_read_and_write, server, ram)
    writes = [a for a in served if a.kind in ("bar_write", "config_write")]
    assert any(a.kind == "config_write" for a in writes)  # bus master enable
    assert sum(not a.on_loop for a in served) >= 2  # status writes and the kick
    assert any(a.offset >= NOTIFY_CFG_OFFSET and not a.on_loop for a in writes)
    for access in served:
        assert access.on_loop is not blocking(access), access


async def test_the_old_path_still_works(
    server: DevServer, ram: int, served: list[Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(virtio_runner, "THREAD_EVERY_WRITE", True)
    await asyncio.to_thread(drive_one_read_and_write, server, ram)
    for access in served:
        assert access.on_loop is access.kind.endswith("_read"), access


async def test_a_latch_is_logged_once_per_interval(
    server: DevServer, ram: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Mode NONE: every DRIVER_OK latches NEEDS_RESET; a guest that resets and
    starts again in a loop gets one server log line, the rest are counted."""
    caplog.set_level(logging.WARNING, logger="devserver.service.needs_reset_log")

    def drive() -> None:
        with session(server, pb.MEMORY_MODE_NONE, ram) as s:
            drv = GrpcDriver(s, ram)
            drv.enable_bus_master()
            for _ in range(3):
                drv.write(DEVICE_STATUS, 1, 0)
                drv.negotiate()
                drv.driver_ok()
                assert drv.status & DeviceStatus.DEVICE_NEEDS_RESET

    await asyncio.to_thread(drive)
    lines = [r.getMessage() for r in caplog.records if "needs a reset" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"device {SLOT} (" in lines[0] and "no guest memory" in lines[0]
    assert server.servicer.needs_reset_log.suppressed(SLOT) == 2
