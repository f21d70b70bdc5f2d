"""virtio-net through a real server on a real tap (virtio 1.2 §5.1 over §4.1;
root only): the fake driver reaches the device over the Attach stream, the
server's tap is moved into a private network namespace at 10.0.77.1/24, and
a UDP socket there is the other end. A frame the driver transmits arrives at
the socket; a datagram the socket sends arrives in the driver's receive ring
with no kick. Without root or /dev/net/tun the tests skip and say why.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.config import parse_device_spec
from devserver.devices.net import HEADER, HEADER_SIZE, RECEIVEQ, TRANSMITQ
from devserver.errors import ConfigError
from devserver.service.server import DevServer, Listen
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET
from devserver.virtio.spec import DeviceStatus
from tests.netns_tap import GUEST_ADDRESS, HOST_ADDRESS, HostNet, host, tap_name
from tests.service.test_virtio_blk_service import SLOT, GrpcDriver, ram, session

__all__ = ["host", "ram"]  # the fixture, shared with the virtio-blk service tests

pytestmark = pytest.mark.root

GUEST_MAC = bytes.fromhex("525400aa0001")
UDP_PORT = 7777
ETH_P_IP = 0x0800


@dataclass
class NetRig:
    server: DevServer
    host: HostNet
    tap: str


@pytest_asyncio.fixture
async def rig(tmp_path: Path, host: HostNet) -> AsyncIterator[NetRig]:
    tap = tap_name()
    spec = f"virtio-net,slot={SLOT},tap={tap},mac=52:54:00:aa:00:01"
    srv = DevServer([parse_device_spec(spec)], Listen(unix_path=tmp_path / "run" / "dev.sock"))
    await srv.start()
    try:
        await asyncio.to_thread(host.take_tap, tap, GUEST_MAC)
        yield NetRig(srv, host, tap)
    finally:
        await srv.stop(0)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, payload: bytes) -> bytes:
    """Ethernet + IPv4 + UDP (checksum 0: none) from the guest to the host."""
    udp = struct.pack("!HHHH", 40000, UDP_PORT, 8 + len(payload), 0) + payload
    src = socket.inet_aton(GUEST_ADDRESS)
    dst = socket.inet_aton(HOST_ADDRESS)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + GUEST_MAC + struct.pack("!H", ETH_P_IP) + ip + udp


class NetDriver(GrpcDriver):
    def post_rx(self, size: int) -> int:
        gpa = self.alloc(size)
        self.publish(RECEIVEQ, self.add_chain(RECEIVEQ, [(gpa, size, True)]))
        return gpa

    def send(self, frame: bytes) -> None:
        header = self.alloc(HEADER_SIZE)
        self.put(header, HEADER.pack(0, 0, 0, 0, 0, 0, 0))
        data = self.alloc(len(frame))
        self.put(data, frame)
        buffers = [(header, HEADER_SIZE, False), (data, len(frame), False)]
        self.publish(TRANSMITQ, self.add_chain(TRANSMITQ, buffers))
        self.kick(TRANSMITQ)


async def test_frames_flow_both_ways_through_the_tap(rig: NetRig, ram: int) -> None:
    tap_mac = await asyncio.to_thread(rig.host.tap_mac)
    listener = await asyncio.to_thread(rig.host.udp_socket, UDP_PORT)
    listener.settimeout(10)

    def drive() -> None:
        with session(rig.server, pb.MEMORY_MODE_SHARED, ram) as s, listener:
            drv = NetDriver(s, ram)
            drv.start(2, msix=False)
            assert drv.status & DeviceStatus.DRIVER_OK
            mac = bytes(drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(6))
            assert mac == GUEST_MAC
            # Guest → host: the frame comes out of the tap as a UDP datagram.
            drv.send(udp_frame(tap_mac, b"from the guest"))
            assert len(drv.wait_used(TRANSMITQ, 1)) == 1
            data, peer = listener.recvfrom(2048)
            assert data == b"from the guest"
            assert peer == (GUEST_ADDRESS, 40000)
            # Host → guest: receive buffers posted first; the datagram arrives with
            # no kick (the tap wakes the device). Other frames the namespace sends
            # (IPv6 neighbour discovery...) may come first: look for ours.
            gpas = [drv.post_rx(2048) for _ in range(16)]
            drv.kick(RECEIVEQ)
            listener.sendto(b"from the host", (GUEST_ADDRESS, 40000))
            found = False
            for _ in range(20):
                used = drv.wait_used(RECEIVEQ, 1)
                for head, length in used:
                    frame = drv.get(gpas[head], length)
                    assert HEADER.unpack(frame[:HEADER_SIZE])[6] == 1  # num_buffers
                    eth = frame[HEADER_SIZE:]
                    if eth[:6] == GUEST_MAC and eth.endswith(b"from the host"):
                        assert eth[6:12] == tap_mac
                        found = True
                if found:
                    break
                time.sleep(0.05)
            assert found, "the datagram from the namespace never reached the receive ring"

    await asyncio.to_thread(drive)
    stats = await asyncio.to_thread(rig.host.link_stats)
    assert stats["rx_packets"] >= 1  # the namespace got the guest's frame


async def test_a_missing_tap_name_and_bad_mac_are_refused(tmp_path: Path) -> None:
    for spec in ("virtio-net,slot=3", "virtio-net,tap=x,mac=01:00:00:00:00:00"):
        with pytest.raises(ConfigError):
            DevServer([parse_device_spec(spec)], Listen(unix_path=tmp_path / "s.sock"))
