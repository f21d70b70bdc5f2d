"""virtio-9p through a real server in SHARED memory mode (virtio 1.2 §5.11 over
§4.1): the fake driver (test_virtio_blk_service's GrpcDriver) puts 9P2000.L
requests in a memfd the server maps and kicks over the gRPC stream; the
server's worker thread serves them from a real exported directory."""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.config import parse_device_spec
from devserver.devices import p9_protocol as p9
from devserver.errors import ConfigError
from devserver.service.server import DevServer, Listen
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET
from devserver.virtio.spec import DeviceStatus
from tests.service.test_virtio_blk_service import SLOT, GrpcDriver, ram, session

__all__ = ["ram"]  # the memfd fixture, shared with the blk service tests


def s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


def msg(type_: int, body: bytes, tag: int) -> bytes:
    return struct.pack("<IBH", 7 + len(body), type_, tag) + body


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    (root / "hello.txt").write_text("hello over grpc\n")
    (root / "abs").symlink_to("/")
    return root


async def start_server(tmp_path: Path, spec: str) -> DevServer:
    srv = DevServer([parse_device_spec(spec)], Listen(unix_path=tmp_path / "run" / "9p.sock"))
    await srv.start()
    return srv


@pytest_asyncio.fixture
async def server(tmp_path: Path, export: Path) -> AsyncIterator[DevServer]:
    srv = await start_server(tmp_path, f"virtio-9p,slot={SLOT},path={export},tag=hostshare")
    yield srv
    await srv.stop(0)


def call(drv: GrpcDriver, requests: list[bytes], room: int = 8192) -> list[bytes]:
    """Post every request (one chain each), kick once; the replies, in order."""
    gpas = []
    for data in requests:
        src = drv.alloc(len(data))
        drv.put(src, data)
        dst = drv.alloc(room)
        drv.publish(0, drv.add_chain(0, [(src, len(data), False), (dst, room, True)]))
        gpas.append(dst)
    drv.kick(0)
    used = drv.wait_used(0, len(requests))
    assert len(used) == len(requests)
    return [drv.get(gpa, length) for gpa, (_, length) in zip(gpas, used, strict=True)]


async def test_a_host_file_is_read_and_a_guest_file_written(
    server: DevServer, ram: int, export: Path
) -> None:
    def drive() -> None:
        with session(server, pb.MEMORY_MODE_SHARED, ram) as sess:
            drv = GrpcDriver(sess, ram)
            drv.start(1, msix=False)
            assert drv.status & DeviceStatus.DRIVER_OK
            tag = bytes(drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(2 + 9))
            assert tag == b"\x09\x00hostshare"
            replies = call(
                drv,
                [
                    msg(p9.TVERSION, struct.pack("<I", 8192) + s("9P2000.L"), 0xFFFF),
                    msg(p9.TATTACH, struct.pack("<II", 0, p9.NOFID) + s("") + s("") + b"\0" * 4, 1),
                    msg(p9.TWALK, struct.pack("<IIH", 0, 1, 1) + s("hello.txt"), 2),
                    msg(p9.TLOPEN, struct.pack("<II", 1, 0), 3),
                    msg(p9.TREAD, struct.pack("<IQI", 1, 0, 4096), 4),
                    msg(p9.TWALK, struct.pack("<IIH", 0, 2, 0), 5),
                    msg(
                        p9.TLCREATE,
                        struct.pack("<I", 2) + s("out.txt") + struct.pack("<III", 2, 0o644, 0),
                        6,
                    ),
                    msg(p9.TWRITE, struct.pack("<IQI", 2, 0, 5) + b"guest", 7),
                    msg(p9.TCLUNK, struct.pack("<I", 2), 8),
                    # The escape: through /abs (-> /) to etc: one qid, no newfid.
                    msg(p9.TWALK, struct.pack("<IIH", 0, 3, 2) + s("abs") + s("etc"), 9),
                    msg(p9.TGETATTR, struct.pack("<IQ", 3, p9.GETATTR_BASIC), 10),
                ],
            )
            assert [r[4] for r in replies[:9]] == [
                p9.TVERSION + 1,
                p9.TATTACH + 1,
                p9.TWALK + 1,
                p9.TLOPEN + 1,
                p9.TREAD + 1,
                p9.TWALK + 1,
                p9.TLCREATE + 1,
                p9.TWRITE + 1,
                p9.TCLUNK + 1,
            ]
            assert replies[4][11:] == b"hello over grpc\n"
            assert struct.unpack_from("<H", replies[9], 7)[0] == 1
            assert replies[10] == p9.rlerror(10, errno.EBADF)
            assert (export / "out.txt").read_bytes() == b"guest"
            # Hostile: a size field past the chain is answered EINVAL, server goes on.
            bad = struct.pack("<IBH", 0x7FFFFFFF, p9.TCLUNK, 11) + b"\0" * 4
            assert call(drv, [bad]) == [p9.rlerror(11, errno.EINVAL)]
            assert not drv.status & DeviceStatus.DEVICE_NEEDS_RESET

    await asyncio.to_thread(drive)


async def test_bad_specs_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="path="):
        await start_server(tmp_path, f"virtio-9p,path={tmp_path / 'none'},tag=t")
    with pytest.raises(ConfigError, match="tag="):
        await start_server(tmp_path, f"virtio-9p,path={tmp_path}")
    with pytest.raises(ConfigError, match="tag="):
        await start_server(tmp_path, f"virtio-9p,path={tmp_path},tag=a b")
    with pytest.raises(ConfigError, match="readonly="):
        await start_server(tmp_path, f"virtio-9p,path={tmp_path},tag=t,readonly=yes")
