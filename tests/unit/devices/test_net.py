"""virtio-net driven like a guest (virtio 1.2 §5.1; reliability.md: bounded
frames, RX back-pressure, TX nonsense dropped and counted, never latched)."""

from __future__ import annotations

from collections import deque

import pytest

from devserver.devices.net import (
    CONFIG,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME,
    RECEIVEQ,
    TRANSMITQ,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    VirtioNet,
    default_mac,
    format_mac,
    parse_mac,
)
from devserver.effects import MsiRaised
from devserver.errors import ConfigError
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET, VirtioPciFunction
from devserver.virtio.spec import DeviceStatus, VirtioDeviceId, feature_bit
from tests.unit.virtio.driver import RAM_SIZE, FakeVirtioDriver

MAC = bytes.fromhex("525400abcdef")
FRAME = bytes.fromhex("ffffffffffff525400abcdef0806") + b"\x00" * 28  # an ARP-sized frame


class FakePort:
    """A PacketPort: host frames waiting in `incoming`, guest frames in `sent`."""

    def __init__(self) -> None:
        self.incoming: deque[bytes] = deque()
        self.sent: list[bytes] = []
        self.up = True

    def pending(self) -> bool:
        return bool(self.incoming)

    def receive(self) -> bytes | None:
        return self.incoming.popleft() if self.incoming else None

    def send(self, frame: bytes) -> bool:
        if not self.up:
            return False
        self.sent.append(frame)
        return True


class CountingMemory(BytearrayMemory):
    """Guest RAM that notes the length of every read."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads: list[int] = []

    def read(self, gpa: int, length: int) -> bytes:
        self.reads.append(length)
        return super().read(gpa, length)


class Net:
    def __init__(self, mtu: int = 1500) -> None:
        self.port = FakePort()
        self.dev = VirtioNet(self.port, mac=MAC, mtu=mtu)
        self.mem = CountingMemory(RAM_SIZE)
        self.fn = VirtioPciFunction(self.dev, presentation=Presentation(), memory=self.mem)
        self.fn.device_id = 7
        self.drv = FakeVirtioDriver(self.fn, self.mem)
        self.drv.start(2)

    def post_rx(self, sizes: list[int]) -> tuple[int, list[int]]:
        gpas = [self.drv.alloc(max(n, 1)) for n in sizes]
        head = self.drv.add_chain(
            RECEIVEQ, [(g, n, True) for g, n in zip(gpas, sizes, strict=True)]
        )
        self.drv.publish(RECEIVEQ, head)
        return head, gpas

    def send(self, pieces: list[bytes]) -> int:
        buffers = []
        for piece in pieces:
            gpa = self.drv.alloc(max(len(piece), 1))
            self.drv.put(gpa, piece)
            buffers.append((gpa, len(piece), False))
        head = self.drv.add_chain(TRANSMITQ, buffers)
        self.drv.publish(TRANSMITQ, head)
        return head

    def send_long(self, length: int) -> int:
        """A transmit chain whose readable bytes are `length` long (zeroes)."""
        gpa = self.drv.alloc(length)
        head = self.drv.add_chain(TRANSMITQ, [(gpa, length, False)])
        self.drv.publish(TRANSMITQ, head)
        return head


def tx_header() -> bytes:
    return HEADER.pack(0, 0, 0, 0, 0, 0, 0)


def test_identity_features_and_config() -> None:
    n = Net(mtu=9000)
    assert n.dev.device_type == VirtioDeviceId.NET and int(n.dev.device_type) == 1
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU):
        assert n.dev.avail_features & feature_bit(bit)
    raw = bytes(n.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(CONFIG.size))
    assert CONFIG.unpack(raw) == (MAC, VIRTIO_NET_S_LINK_UP, 1, 9000)
    assert n.drv.status & DeviceStatus.DRIVER_OK
    assert n.dev.pci_class_code == 0x020000


@pytest.mark.parametrize("mtu", [0, 67, MAX_FRAME])
def test_bad_mtu_is_a_config_error(mtu: int) -> None:
    with pytest.raises(ConfigError):
        VirtioNet(FakePort(), mac=MAC, mtu=mtu)


def test_mac_parsing_and_default() -> None:
    assert parse_mac("52:54:00:AB:cd:ef") == MAC
    assert format_mac(MAC) == "52:54:00:ab:cd:ef"
    for bad in ("52:54:00:ab:cd", "52:54:00:ab:cd:zz", "01:00:5e:00:00:01", "5254.00ab.cdef"):
        with pytest.raises(ConfigError):
            parse_mac(bad)
    assert default_mac(0) != default_mac(1)
    assert not default_mac(3)[0] & 1  # unicast
    assert default_mac(3)[0] & 2  # locally administered


def test_tx_scattered_header_and_frame_reach_the_port() -> None:
    n = Net()
    # Header split across descriptors, frame split too (any layout, §2.7.4).
    head = n.send([tx_header()[:5], tx_header()[5:] + FRAME[:10], FRAME[10:]])
    n.drv.kick(TRANSMITQ)
    assert n.port.sent == [FRAME]
    assert n.drv.used(TRANSMITQ) == [(head, 0)]
    assert n.dev.tx_frames == 1
    assert any(isinstance(e, MsiRaised) for e in n.drv.take())


def test_tx_port_down_is_dropped_and_counted() -> None:
    n = Net()
    n.port.up = False
    head = n.send([tx_header() + FRAME])
    n.drv.kick(TRANSMITQ)
    assert n.drv.used(TRANSMITQ) == [(head, 0)]
    assert n.dev.tx_dropped == 1 and not n.port.sent


@pytest.mark.parametrize("length", [0, HEADER_SIZE - 1, HEADER_SIZE + 13])
def test_tx_too_short_is_dropped_not_latched(length: int) -> None:
    n = Net()
    head = n.send([b"\0" * length]) if length else n.send_long(0)
    n.drv.kick(TRANSMITQ)
    assert n.drv.used(TRANSMITQ) == [(head, 0)]
    assert n.dev.tx_malformed == 1 and not n.port.sent
    assert not n.drv.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_tx_longest_frame_passes_one_longer_is_dropped() -> None:
    n = Net()
    ok = n.send_long(HEADER_SIZE + MAX_FRAME)
    too_long = n.send_long(HEADER_SIZE + MAX_FRAME + 1)
    n.drv.kick(TRANSMITQ)
    assert n.drv.used(TRANSMITQ) == [(ok, 0), (too_long, 0)]
    assert [len(f) for f in n.port.sent] == [MAX_FRAME]
    assert n.dev.tx_malformed == 1
    assert not n.drv.status & DeviceStatus.DEVICE_NEEDS_RESET
    # The device goes on working.
    head = n.send([tx_header() + FRAME])
    n.drv.kick(TRANSMITQ)
    assert n.drv.used(TRANSMITQ) == [(head, 0)] and n.port.sent[-1] == FRAME


def test_rx_fills_header_and_frame_across_buffers() -> None:
    n = Net()
    head, gpas = n.post_rx([HEADER_SIZE - 2, 10, 100])  # header split, frame split
    n.drv.kick(RECEIVEQ)
    assert n.drv.used(RECEIVEQ) == []  # nothing waiting: buffers stay posted
    n.port.incoming.append(FRAME)
    assert n.dev.pump_host() is False
    written = HEADER_SIZE + len(FRAME)
    assert n.drv.used(RECEIVEQ) == [(head, written)]
    data = n.drv.get(gpas[0], HEADER_SIZE - 2) + n.drv.get(gpas[1], 10) + n.drv.get(gpas[2], 100)
    assert HEADER.unpack(data[:HEADER_SIZE]) == (0, 0, 0, 0, 0, 0, 1)  # num_buffers 1
    assert data[HEADER_SIZE:written] == FRAME
    assert n.dev.rx_frames == 1
    assert any(isinstance(e, MsiRaised) for e in n.drv.take())


def test_rx_back_pressure_without_buffers() -> None:
    n = Net()
    n.port.incoming.extend([FRAME, FRAME])
    assert n.dev.pump_host() is False
    assert len(n.port.incoming) == 2  # left with the port, not taken
    head, _ = n.post_rx([1526])
    n.drv.kick(RECEIVEQ)
    assert n.drv.used(RECEIVEQ) == [(head, HEADER_SIZE + len(FRAME))]
    assert len(n.port.incoming) == 1  # waits for the next buffer


def test_rx_frame_too_big_for_the_chain_is_dropped() -> None:
    n = Net()
    small, _ = n.post_rx([HEADER_SIZE + 10])
    big, _ = n.post_rx([2048])
    n.port.incoming.extend([FRAME, FRAME])
    n.dev.pump_host()
    # The first frame did not fit: dropped, chain back with 0; the next fits.
    assert n.drv.used(RECEIVEQ) == [(small, 0), (big, HEADER_SIZE + len(FRAME))]
    assert n.dev.rx_dropped == 1 and n.dev.rx_frames == 1


def test_rx_is_bounded_per_call() -> None:
    n = Net()
    for _ in range(100):
        n.post_rx([64])
    n.port.incoming.extend([FRAME] * 100)
    assert n.dev.pump_host() is True  # QUEUE_WEIGHT chains, then more to do
    assert len(n.drv.used(RECEIVEQ)) == 64
    assert n.dev.pump_host() is False
    assert len(n.drv.used(RECEIVEQ)) == 36


def test_reset_keeps_host_frames() -> None:
    n = Net()
    n.post_rx([64])
    n.drv.set_status(0)
    assert n.dev.queues == {}
    n.port.incoming.append(FRAME)
    assert n.dev.pump_host() is False
    assert len(n.port.incoming) == 1
    n.drv.queues.clear()
    n.drv.start(2)
    head, _ = n.post_rx([64])
    n.drv.kick(RECEIVEQ)
    assert n.drv.used(RECEIVEQ) == [(head, HEADER_SIZE + len(FRAME))]


def test_tx_chain_of_many_mib_is_counted_never_read() -> None:
    """Descriptors may alias: 64 x 512 KiB over the same RAM make a 32 MiB
    "frame"; it is dropped by its length alone, nothing of it is copied."""
    n = Net()
    gpa = n.drv.alloc(512 * 1024)
    head = n.drv.add_chain(TRANSMITQ, [(gpa, 512 * 1024, False)] * 64)
    n.drv.publish(TRANSMITQ, head)
    n.mem.reads.clear()
    n.drv.kick(TRANSMITQ)
    assert n.drv.used(TRANSMITQ) == [(head, 0)]
    assert n.dev.tx_malformed == 1 and not n.port.sent
    assert max(n.mem.reads, default=0) <= 4096  # ring and table reads only
    assert not n.drv.status & DeviceStatus.DEVICE_NEEDS_RESET
