"""virtio-console through a real server in SHARED memory mode (virtio 1.2 §5.3
over §4.1): the fake driver reaches the device over the Attach stream (as in
test_virtio_blk_service.py), and a real client on the console's UNIX socket
is the host end. Host bytes wake the device on their own (no kick) once the
driver has posted receive buffers; bytes the driver transmits reach the client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.backends.console_fd import set_terminal_size
from devserver.config import parse_device_spec
from devserver.devices.console import (
    CONTROL,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    RECEIVEQ,
    TRANSMITQ,
    ConsoleControlEvent,
    receive_queue,
    transmit_queue,
)
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


async def test_dropped_bytes_are_counted_in_stats_and_metrics(ram: int, tmp_path: Path) -> None:
    import urllib.request

    from vmm_client.client import get_stats, open_channel

    spec = f"virtio-console,slot={SLOT},name=con,socket={tmp_path / 'con.sock'}"
    srv = DevServer(
        [parse_device_spec(spec)],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
        metrics=("127.0.0.1", 0),
    )
    await srv.start()
    try:

        def drive() -> None:
            with session(srv, pb.MEMORY_MODE_SHARED, ram) as s:
                drv = ConsoleDriver(s, ram)
                drv.start(2, msix=False)
                drv.send([b"nobody ", b"listens"])  # no client on the socket
                assert drv.wait_used(TRANSMITQ, 1)

        await asyncio.to_thread(drive)
        async with open_channel(srv.address) as channel:
            stats = await get_stats(channel)
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
    finally:
        await srv.stop(0)
    (device,) = [d for d in stats.devices if d.device_id == SLOT]
    assert device.console_bytes_dropped == 14
    assert f'devmodel_device_console_bytes_dropped_total{{device_id="{SLOT}",name="con"}} 14.0' in (
        text
    )


class MultiportDriver(ConsoleDriver):
    """Plays Linux's multiport probe over the stream (virtio 1.2 §5.3.6.2)."""

    def post_control(self, count: int) -> None:
        for _ in range(count):
            gpa = self.alloc(64)
            self.publish(CONTROL_RECEIVEQ, self.add_chain(CONTROL_RECEIVEQ, [(gpa, 64, True)]))
        self.kick(CONTROL_RECEIVEQ)

    def control(self, port: int, event: int, value: int = 1) -> None:
        gpa = self.alloc(CONTROL.size)
        self.put(gpa, CONTROL.pack(port, event, value))
        self.publish(CONTROL_TRANSMITQ, self.add_chain(CONTROL_TRANSMITQ, [(gpa, 8, False)]))
        self.kick(CONTROL_TRANSMITQ)

    def control_in(self, count: int) -> list[tuple[int, int, int, bytes]]:
        out = []
        layout = self.queues[CONTROL_RECEIVEQ]
        for head, length in self.wait_used(CONTROL_RECEIVEQ, count):
            gpa = int.from_bytes(self.get(layout.desc + 16 * head, 8), "little")
            raw = self.get(gpa, length)
            port, event, value = CONTROL.unpack_from(raw)
            out.append((port, event, value, raw[CONTROL.size :]))
        return out


async def test_named_port_over_the_stream(ram: int, tmp_path: Path) -> None:
    agent_path = tmp_path / "agent.sock"
    spec = (
        f"virtio-console,slot={SLOT},socket={tmp_path / 'con.sock'},"
        f"port=org.test.agent:socket:{agent_path}"
    )
    srv = DevServer([parse_device_spec(spec)], Listen(unix_path=tmp_path / "run" / "dev.sock"))
    await srv.start()
    E = ConsoleControlEvent
    try:

        def drive() -> None:
            with session(srv, pb.MEMORY_MODE_SHARED, ram) as s:
                drv = MultiportDriver(s, ram)
                drv.start(6, msix=False)
                drv.post_control(32)
                drv.control(0xFFFF_FFFF, E.VIRTIO_CONSOLE_DEVICE_READY)
                assert [m[:2] for m in drv.control_in(2)] == [
                    (0, E.VIRTIO_CONSOLE_DEVICE_ADD),
                    (1, E.VIRTIO_CONSOLE_DEVICE_ADD),
                ]
                drv.control(1, E.VIRTIO_CONSOLE_PORT_READY)
                assert drv.control_in(2) == [
                    (1, E.VIRTIO_CONSOLE_PORT_NAME, 1, b"org.test.agent"),
                    (1, E.VIRTIO_CONSOLE_PORT_OPEN, 0, b""),
                ]
                drv.control(1, E.VIRTIO_CONSOLE_PORT_OPEN, 1)  # a guest process opened it
                rx = receive_queue(1)
                gpa = drv.alloc(64)
                drv.publish(rx, drv.add_chain(rx, [(gpa, 64, True)]))
                drv.kick(rx)
                with _client(agent_path) as client:
                    # The client's arrival reaches the driver on its own (no kick).
                    assert drv.control_in(1) == [(1, E.VIRTIO_CONSOLE_PORT_OPEN, 1, b"")]
                    client.sendall(b"to the agent")
                    assert drv.wait_used(rx, 1) == [(0, 12)]
                    assert drv.get(gpa, 12) == b"to the agent"
                    tx = transmit_queue(1)
                    src = drv.alloc(9)
                    drv.put(src, b"from it\r\n")
                    drv.publish(tx, drv.add_chain(tx, [(src, 9, False)]))
                    drv.kick(tx)
                    assert _recv_exactly(client, 9) == b"from it\r\n"
                assert drv.control_in(1) == [(1, E.VIRTIO_CONSOLE_PORT_OPEN, 0, b"")]

        await asyncio.to_thread(drive)
    finally:
        await srv.stop(0)


async def test_pty_host_end_and_its_resize(ram: int, tmp_path: Path) -> None:
    link = tmp_path / "con.pty"
    spec = f"virtio-console,slot={SLOT},chardev=pty,pty-link={link},cols=90,rows=20"
    srv = DevServer([parse_device_spec(spec)], Listen(unix_path=tmp_path / "run" / "dev.sock"))
    await srv.start()
    try:
        assert os.readlink(link).startswith("/dev/pts/")
        (path,) = srv.servicer._consoles.pty_paths(srv.servicer._default_bus)[SLOT].values()
        assert path == os.readlink(link)

        def drive() -> None:
            fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
            try:
                with session(srv, pb.MEMORY_MODE_SHARED, ram) as s:
                    drv = ConsoleDriver(s, ram)
                    drv.start(2, msix=False)
                    assert drv.read(DEVICE_CFG_OFFSET, 4) == 90 | 20 << 16
                    drv.send([b"to the pty\n"])
                    assert drv.wait_used(TRANSMITQ, 1)
                    assert os.read(fd, 64) == b"to the pty\n"  # raw: no \r added
                    gpa = drv.post_rx(64)
                    drv.kick(RECEIVEQ)
                    os.write(fd, b"typed")
                    assert drv.wait_used(RECEIVEQ, 1) == [(0, 5)]
                    assert drv.get(gpa, 5) == b"typed"
                    set_terminal_size(fd, 132, 43)
                    for _ in range(300):  # the size is polled
                        if drv.read(DEVICE_CFG_OFFSET, 4) == 132 | 43 << 16:
                            break
                        time.sleep(0.01)
                    assert drv.read(DEVICE_CFG_OFFSET, 4) == 132 | 43 << 16
            finally:
                os.close(fd)

        await asyncio.to_thread(drive)
    finally:
        await srv.stop(0)
    assert not link.exists()


async def test_stdio_may_be_taken_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stdio"):
        DevServer(
            [
                parse_device_spec("virtio-console,chardev=stdio"),
                parse_device_spec("virtio-console,chardev=pty,port=a:stdio"),
            ],
            Listen(unix_path=tmp_path / "run" / "dev.sock"),
        )
