"""virtio-console driven like a guest (virtio 1.2 §5.3; reliability.md C9:
chained/scattered buffers consumed whole, RX back-pressure, bounded buffering)."""

from __future__ import annotations

import pytest

from devserver.devices.console import (
    CONFIG,
    RECEIVEQ,
    TRANSMITQ,
    VIRTIO_CONSOLE_F_SIZE,
    VirtioConsole,
)
from devserver.effects import MsiRaised
from devserver.errors import ConfigError
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET, VirtioPciFunction
from devserver.virtio.spec import DeviceStatus, VirtioDeviceId, feature_bit
from tests.unit.virtio.driver import RAM_SIZE, FakeVirtioDriver


class FakeStream:
    """A ByteStream: host bytes waiting in `incoming`, guest bytes in `sent`."""

    def __init__(self) -> None:
        self.incoming = bytearray()
        self.sent = bytearray()
        self.connected = True
        self.size: tuple[int, int] | None = None  # (cols, rows) of a host terminal

    def window_size(self) -> tuple[int, int] | None:
        return self.size

    def readable(self) -> int:
        return len(self.incoming)

    def read(self, limit: int) -> bytes:
        data = bytes(self.incoming[:limit])
        del self.incoming[:limit]
        return data

    def write(self, data: bytes) -> bool:
        if not self.connected:
            return False
        self.sent += data
        return True


class Console:
    def __init__(self, *, cols: int = 80, rows: int = 25) -> None:
        self.stream = FakeStream()
        self.dev = VirtioConsole(self.stream, cols=cols, rows=rows)
        self.mem = BytearrayMemory(RAM_SIZE)
        self.fn = VirtioPciFunction(self.dev, presentation=Presentation(), memory=self.mem)
        self.fn.device_id = 5
        self.drv = FakeVirtioDriver(self.fn, self.mem)
        self.drv.start(2)

    def post_rx(self, sizes: list[int]) -> tuple[int, list[int]]:
        """One receive chain of writable buffers of `sizes`; (head, their gpas)."""
        gpas = [self.drv.alloc(max(n, 1)) for n in sizes]
        head = self.drv.add_chain(
            RECEIVEQ, [(g, n, True) for g, n in zip(gpas, sizes, strict=True)]
        )
        self.drv.publish(RECEIVEQ, head)
        return head, gpas

    def send(self, pieces: list[bytes]) -> int:
        """One transmit chain of readable buffers holding `pieces`."""
        buffers = []
        for piece in pieces:
            gpa = self.drv.alloc(max(len(piece), 1))
            self.drv.put(gpa, piece)
            buffers.append((gpa, len(piece), False))
        head = self.drv.add_chain(TRANSMITQ, buffers)
        self.drv.publish(TRANSMITQ, head)
        return head


def test_identity_features_and_config() -> None:
    c = Console(cols=132, rows=43)
    assert c.dev.device_type == VirtioDeviceId.CONSOLE
    assert int(c.dev.device_type) == 3
    assert c.dev.avail_features & feature_bit(VIRTIO_CONSOLE_F_SIZE)
    raw = bytes(c.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(CONFIG.size))
    assert CONFIG.unpack(raw) == (132, 43, 1, 0)
    assert c.drv.status & DeviceStatus.DRIVER_OK


def test_bad_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        VirtioConsole(FakeStream(), cols=70000)


def test_tx_consumes_every_descriptor_of_a_scattered_chain() -> None:
    c = Console()
    head = c.send([b"hel", b"", b"lo ", b"world\n"])
    c.drv.kick(TRANSMITQ)
    assert bytes(c.stream.sent) == b"hello world\n"
    assert c.drv.used(TRANSMITQ) == [(head, 0)]
    assert c.dev.tx_bytes == 12
    assert any(isinstance(e, MsiRaised) for e in c.drv.take())


def test_tx_without_client_is_dropped_and_counted() -> None:
    c = Console()
    c.stream.connected = False
    heads = [c.send([b"abc", b"de"]), c.send([b"f"])]
    c.drv.kick(TRANSMITQ)
    assert c.drv.used(TRANSMITQ) == [(h, 0) for h in heads]
    assert c.dev.tx_dropped == 6 and c.dev.tx_bytes == 0
    assert not c.stream.sent


def test_rx_delivers_across_several_buffers() -> None:
    c = Console()
    h1, g1 = c.post_rx([3, 2])  # one chain, scattered
    h2, g2 = c.post_rx([4])
    c.drv.kick(RECEIVEQ)
    assert c.drv.used(RECEIVEQ) == []  # nothing waiting: buffers stay posted
    c.stream.incoming += b"abcdefgh"
    assert c.dev.pump_host() is False
    assert c.drv.used(RECEIVEQ) == [(h1, 5), (h2, 3)]
    assert c.drv.get(g1[0], 3) + c.drv.get(g1[1], 2) == b"abcde"
    assert c.drv.get(g2[0], 3) == b"fgh"
    assert c.dev.rx_bytes == 8 and not c.stream.incoming
    assert any(isinstance(e, MsiRaised) for e in c.drv.take())


def test_rx_back_pressure_without_buffers() -> None:
    c = Console()
    c.stream.incoming += b"x" * 10
    assert c.dev.pump_host() is False
    assert c.stream.readable() == 10  # left with the stream, not taken
    head, gpas = c.post_rx([4])
    c.drv.kick(RECEIVEQ)
    assert c.drv.used(RECEIVEQ) == [(head, 4)]
    assert c.stream.readable() == 6  # still waiting for the next buffer
    head, gpas = c.post_rx([16])
    c.drv.kick(RECEIVEQ)
    assert c.drv.used(RECEIVEQ) == [(head, 6)]
    assert c.drv.get(gpas[0], 6) == b"x" * 6


def test_rx_is_bounded_per_call() -> None:
    c = Console()
    for _ in range(100):
        c.post_rx([1])
    c.stream.incoming += b"y" * 100
    assert c.dev.pump_host() is True  # QUEUE_WEIGHT chains, then more to do
    assert len(c.drv.used(RECEIVEQ)) == 64
    assert c.dev.pump_host() is False
    assert len(c.drv.used(RECEIVEQ)) == 36


def test_reset_drops_queues_and_keeps_host_bytes() -> None:
    c = Console()
    c.post_rx([8])
    c.drv.set_status(0)
    assert c.dev.queues == {}
    c.stream.incoming += b"later"
    assert c.dev.pump_host() is False
    assert c.stream.readable() == 5
    c.drv.queues.clear()
    c.drv.start(2)
    head, gpas = c.post_rx([8])
    c.drv.kick(RECEIVEQ)
    assert c.drv.used(RECEIVEQ) == [(head, 5)]
    assert c.drv.get(gpas[0], 5) == b"later"
