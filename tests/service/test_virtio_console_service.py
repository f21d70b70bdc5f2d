"""virtio-console through a real server in SHARED memory mode (virtio 1.2 §5.3
over §4.1): the fake driver reaches the device over the Attach stream (as in
test_virtio_blk_service.py), and a real client on the console's UNIX socket
is the host end. Host bytes wake the device on their own (no kick) once the
driver has posted receive buffers; bytes the driver transmits reach the client.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.config import parse_device_spec
from devserver.devices.console import RECEIVEQ, TRANSMITQ
from devserver.errors import ConfigError
from devserver.service.server import DevServer, Listen
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET
from devserver.virtio.spec import DeviceStatus
from tests.service.test_virtio_blk_service import SLOT, GrpcDriver, ram, session

__all__ = ["ram"]  # the fixture, shared with the virtio-blk service tests


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DevServer]:
    spec = f"virtio-console,slot={SLOT},socket={tmp_path / 'con.sock'},cols=100,rows=30"
    srv = DevServer([parse_device_spec(spec)], Listen(unix_path=tmp_path / "run" / "dev.sock"))
    await srv.start()
    yield srv
    await srv.stop(0)


class ConsoleDriver(GrpcDriver):
    def post_rx(self, size: int) -> int:
        gpa = self.alloc(size)
        self.publish(RECEIVEQ, self.add_chain(RECEIVEQ, [(gpa, size, True)]))
        return gpa

    def send(self, pieces: list[bytes]) -> None:
        buffers = []
        for piece in pieces:
            gpa = self.alloc(len(piece))
            self.put(gpa, piece)
            buffers.append((gpa, len(piece), False))
        self.publish(TRANSMITQ, self.add_chain(TRANSMITQ, buffers))
        self.kick(TRANSMITQ)


def _client(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the console socket closed"
        data += chunk
    return data


async def test_bytes_flow_both_ways(server: DevServer, ram: int, tmp_path: Path) -> None:
    def drive() -> None:
        with session(server, pb.MEMORY_MODE_SHARED, ram) as s:
            drv = ConsoleDriver(s, ram)
            drv.start(2, msix=False)
            assert drv.status & DeviceStatus.DRIVER_OK
            cols = drv.read(DEVICE_CFG_OFFSET, 2)
            assert (cols, drv.read(DEVICE_CFG_OFFSET + 2, 2)) == (100, 30)
            drv.send([b"dropped: no client"])
            assert drv.wait_used(TRANSMITQ, 1)
            with _client(tmp_path / "con.sock") as client:
                time.sleep(0.1)  # the server accepts it on its loop
                drv.send([b"hel", b"lo ", b"host\n"])
                assert drv.wait_used(TRANSMITQ, 1)
                assert _recv_exactly(client, 11) == b"hello host\n"
                # Host bytes before any receive buffer wait (back-pressure) ...
                client.sendall(b"to the guest")
                time.sleep(0.1)
                assert drv.used(RECEIVEQ) == []
                # ... and the driver's buffers take them when posted and kicked.
                a = drv.post_rx(5)
                b = drv.post_rx(64)
                drv.kick(RECEIVEQ)
                assert drv.wait_used(RECEIVEQ, 2) == [(0, 5), (1, 7)]
                assert drv.get(a, 5) + drv.get(b, 7) == b"to the guest"
                # With buffers posted, host bytes arrive with no kick at all.
                c = drv.post_rx(64)
                client.sendall(b"pushed")
                assert drv.wait_used(RECEIVEQ, 1) == [(2, 6)]
                assert drv.get(c, 6) == b"pushed"

    await asyncio.to_thread(drive)


async def test_a_bad_socket_path_is_refused_at_start(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        DevServer(
            [parse_device_spec(f"virtio-console,socket={plain}")],
            Listen(unix_path=tmp_path / "run" / "dev.sock"),
        )
