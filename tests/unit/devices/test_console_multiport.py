"""virtio-console multiport (virtio 1.2 §5.3.6.2) and console size (§5.3.4),
driven like Linux's virtio_console: control queues, PORT_ADD/READY/OPEN/NAME,
named ports carrying data both ways, and hostile control messages refused."""

from __future__ import annotations

import pytest

from devserver.devices.console import (
    CONFIG,
    CONTROL,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    RESIZE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    ConsoleControlEvent,
    VirtioConsole,
    port_of_queue,
    receive_queue,
    transmit_queue,
)
from devserver.effects import MsiRaised
from devserver.errors import ConfigError
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET, VirtioPciFunction
from devserver.virtio.spec import feature_bit
from tests.unit.devices.test_console import FakeStream
from tests.unit.virtio.driver import RAM_SIZE, FakeVirtioDriver

E = ConsoleControlEvent
BAD_ID = 0xFFFF_FFFF  # Linux's VIRTIO_CONSOLE_BAD_ID for DEVICE_READY
CONFIG_VECTOR = 0  # FakeVirtioDriver.enable_msix: config changes on vector 0


def msg(port: int, event: int, value: int = 1, extra: bytes = b"") -> bytes:
    return CONTROL.pack(port, event, value) + extra


class MultiConsole:
    """A console with named ports `names`, started by a multiport driver."""

    def __init__(self, names: tuple[str, ...] = ("agent",), *, features: int | None = None) -> None:
        self.console = FakeStream()
        self.named = {name: FakeStream() for name in names}
        self.dev = VirtioConsole(self.console, cols=100, rows=40, ports=list(self.named.items()))
        self.mem = BytearrayMemory(RAM_SIZE)
        self.fn = VirtioPciFunction(self.dev, presentation=Presentation(), memory=self.mem)
        self.fn.device_id = 6
        self.drv = FakeVirtioDriver(self.fn, self.mem)
        self.drv.start(len(self.dev.queue_max_sizes), features=features)

    def post_control(self, count: int = 1, size: int = 64) -> None:
        for _ in range(count):
            gpa = self.drv.alloc(size)
            self.drv.publish(
                CONTROL_RECEIVEQ, self.drv.add_chain(CONTROL_RECEIVEQ, [(gpa, size, True)])
            )
        self.drv.kick(CONTROL_RECEIVEQ)

    def control_in(self) -> list[tuple[int, int, int, bytes]]:
        """Messages the device put in the control receiveq since last call."""
        out = []
        layout = self.drv.queues[CONTROL_RECEIVEQ]
        for head, length in self.drv.used(CONTROL_RECEIVEQ):
            gpa = int.from_bytes(self.drv.get(layout.desc + 16 * head, 8), "little")
            raw = self.drv.get(gpa, length)
            if length < CONTROL.size:
                out.append((-1, -1, -1, raw))
                continue
            port, event, value = CONTROL.unpack_from(raw)
            out.append((port, event, value, raw[CONTROL.size :]))
        return out

    def control_out(self, *messages: bytes) -> None:
        """The driver sends control messages, one buffer each, and kicks."""
        for message in messages:
            gpa = self.drv.alloc(max(len(message), 1))
            self.drv.put(gpa, message)
            head = self.drv.add_chain(CONTROL_TRANSMITQ, [(gpa, len(message), False)])
            self.drv.publish(CONTROL_TRANSMITQ, head)
        self.drv.kick(CONTROL_TRANSMITQ)

    def bring_up(self) -> None:
        """Linux's probe: control buffers, DEVICE_READY, then PORT_READY for each
        PORT_ADD; port 0's PORT_OPEN once it became the console."""
        self.post_control(16)
        self.control_out(msg(BAD_ID, E.VIRTIO_CONSOLE_DEVICE_READY))
        added = [m[0] for m in self.control_in() if m[1] == E.VIRTIO_CONSOLE_DEVICE_ADD]
        self.control_out(*(msg(p, E.VIRTIO_CONSOLE_PORT_READY) for p in added))
        self.control_in()
        self.control_out(msg(0, E.VIRTIO_CONSOLE_PORT_OPEN))

    def post_rx(self, port: int, size: int) -> tuple[int, int]:
        q = receive_queue(port)
        gpa = self.drv.alloc(size)
        head = self.drv.add_chain(q, [(gpa, size, True)])
        self.drv.publish(q, head)
        self.drv.kick(q)
        return head, gpa

    def send(self, port: int, data: bytes) -> None:
        q = transmit_queue(port)
        gpa = self.drv.alloc(len(data))
        self.drv.put(gpa, data)
        self.drv.publish(q, self.drv.add_chain(q, [(gpa, len(data), False)]))
        self.drv.kick(q)


def test_queue_numbering_follows_the_spec() -> None:
    assert [receive_queue(p) for p in range(4)] == [0, 4, 6, 8]
    assert [transmit_queue(p) for p in range(4)] == [1, 5, 7, 9]
    assert [port_of_queue(q) for q in range(8)] == [0, 0, None, None, 1, 1, 2, 2]


def test_multiport_is_offered_only_with_named_ports() -> None:
    plain = VirtioConsole(FakeStream())
    assert not plain.avail_features & feature_bit(VIRTIO_CONSOLE_F_MULTIPORT)
    assert len(plain.queue_max_sizes) == 2
    c = MultiConsole(("a", "b"))
    assert c.dev.avail_features & feature_bit(VIRTIO_CONSOLE_F_MULTIPORT)
    assert c.dev.avail_features & feature_bit(VIRTIO_CONSOLE_F_SIZE)
    assert len(c.dev.queue_max_sizes) == 8  # (3 ports + control) x 2
    raw = bytes(c.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(CONFIG.size))
    assert CONFIG.unpack(raw) == (100, 40, 3, 0)
    assert c.dev.multiport


@pytest.mark.parametrize(
    ("ports", "match"),
    [
        ([("", FakeStream())], "must be 1"),
        ([("a\0b", FakeStream())], "no NUL"),
        ([("x" * 256, FakeStream())], "must be 1"),
        ([("a", FakeStream()), ("a", FakeStream())], "two ports named"),
        ([(f"p{i}", FakeStream()) for i in range(32)], "at most 32"),
    ],
)
def test_bad_ports_are_config_errors(ports: list[tuple[str, FakeStream]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        VirtioConsole(FakeStream(), ports=ports)


def test_device_ready_adds_every_port_and_port_ready_describes_it() -> None:
    c = MultiConsole(("agent",))
    c.named["agent"].connected = False
    c.post_control(16)
    c.control_out(msg(BAD_ID, E.VIRTIO_CONSOLE_DEVICE_READY))
    assert c.control_in() == [
        (0, E.VIRTIO_CONSOLE_DEVICE_ADD, 1, b""),
        (1, E.VIRTIO_CONSOLE_DEVICE_ADD, 1, b""),
    ]
    c.control_out(msg(0, E.VIRTIO_CONSOLE_PORT_READY), msg(1, E.VIRTIO_CONSOLE_PORT_READY))
    assert c.control_in() == [
        (0, E.VIRTIO_CONSOLE_CONSOLE_PORT, 1, b""),
        (0, E.VIRTIO_CONSOLE_RESIZE, 0, RESIZE.pack(100, 40)),
        (0, E.VIRTIO_CONSOLE_PORT_OPEN, 1, b""),
        (1, E.VIRTIO_CONSOLE_PORT_NAME, 1, b"agent"),  # no NUL (§5.3.6.2)
        (1, E.VIRTIO_CONSOLE_PORT_OPEN, 0, b""),  # no client on its host end yet
    ]
    assert any(isinstance(e, MsiRaised) for e in c.drv.take())


def test_control_messages_wait_for_buffers() -> None:
    c = MultiConsole()
    c.control_out(msg(BAD_ID, E.VIRTIO_CONSOLE_DEVICE_READY))  # no buffers posted yet
    assert c.drv.used(CONTROL_RECEIVEQ) == []
    c.post_control(1)
    assert [m[:2] for m in c.control_in()] == [(0, E.VIRTIO_CONSOLE_DEVICE_ADD)]
    c.post_control(1)
    assert [m[:2] for m in c.control_in()] == [(1, E.VIRTIO_CONSOLE_DEVICE_ADD)]


def test_named_port_carries_data_both_ways_once_the_guest_opens_it() -> None:
    c = MultiConsole()
    c.bring_up()
    agent = c.named["agent"]
    agent.incoming += b"ping"
    head, gpa = c.post_rx(1, 16)
    assert c.drv.used(receive_queue(1)) == []  # not open in the guest: held (Linux drops it)
    c.control_out(msg(1, E.VIRTIO_CONSOLE_PORT_OPEN, 1))
    assert c.drv.used(receive_queue(1)) == [(head, 4)]
    assert c.drv.get(gpa, 4) == b"ping"
    c.send(1, b"pong")
    assert bytes(agent.sent) == b"pong"
    assert bytes(c.console.sent) == b""
    # port 0 is the console: its bytes stay apart
    c.console.incoming += b"hvc"
    head0, _gpa0 = c.post_rx(0, 8)
    assert c.drv.used(receive_queue(0)) == [(head0, 3)]
    assert agent.readable() == 0
    c.control_out(msg(1, E.VIRTIO_CONSOLE_PORT_OPEN, 0))  # the guest closed it
    assert not c.dev.ports[1].guest_open


def test_host_connection_changes_are_relayed() -> None:
    c = MultiConsole()
    c.bring_up()
    agent = c.named["agent"]
    agent.connected = False
    c.dev.pump_host()
    assert c.control_in() == [(1, E.VIRTIO_CONSOLE_PORT_OPEN, 0, b"")]
    c.dev.pump_host()
    assert c.control_in() == []  # told once
    agent.connected = True
    c.dev.pump_host()
    assert c.control_in() == [(1, E.VIRTIO_CONSOLE_PORT_OPEN, 1, b"")]


def test_multiport_resize_goes_to_port0_as_a_control_message() -> None:
    c = MultiConsole()
    c.bring_up()
    c.console.size = (132, 50)
    c.dev.pump_host()
    assert c.control_in() == [(0, E.VIRTIO_CONSOLE_RESIZE, 0, RESIZE.pack(132, 50))]
    assert (c.dev.cols, c.dev.rows) == (132, 50)


@pytest.mark.parametrize(
    "message",
    [
        msg(0, 99),  # unknown event
        msg(1, E.VIRTIO_CONSOLE_PORT_NAME, 1, b"evil"),  # device → driver only
        msg(1, E.VIRTIO_CONSOLE_RESIZE),
        msg(1, E.VIRTIO_CONSOLE_DEVICE_ADD),
        msg(2, E.VIRTIO_CONSOLE_PORT_OPEN),  # port id out of range
        msg(0xFFFF_FFFF, E.VIRTIO_CONSOLE_PORT_READY),
        CONTROL.pack(1, E.VIRTIO_CONSOLE_PORT_OPEN, 1)[:7],  # short buffer
        b"",
    ],
)
def test_hostile_control_messages_are_refused_without_harm(message: bytes) -> None:
    c = MultiConsole()
    c.bring_up()
    before = [(p.ready, p.guest_open, p.host_open) for p in c.dev.ports]
    c.control_out(message)
    assert c.dev.control_refused == 1
    assert [(p.ready, p.guest_open, p.host_open) for p in c.dev.ports] == before
    assert c.control_in() == []
    assert not c.fn.needs_reset_reason
    # and the device still works
    c.control_out(msg(1, E.VIRTIO_CONSOLE_PORT_OPEN, 1))
    c.named["agent"].incoming += b"ok"
    head, _ = c.post_rx(1, 8)
    assert c.drv.used(receive_queue(1)) == [(head, 2)]


def test_long_control_buffer_is_read_no_further_than_the_header() -> None:
    c = MultiConsole()
    c.bring_up()
    c.control_out(msg(1, E.VIRTIO_CONSOLE_PORT_OPEN, 1, b"\xff" * 5000))
    assert c.dev.ports[1].guest_open
    assert c.dev.control_refused == 0


def test_backlog_is_bounded_when_the_driver_posts_no_buffers() -> None:
    c = MultiConsole()
    for _ in range(20):
        c.control_out(*[msg(BAD_ID, E.VIRTIO_CONSOLE_DEVICE_READY)] * 10)
    assert len(c.dev._control_out) == c.dev.control_backlog_limit
    assert c.dev.control_dropped == 400 - c.dev.control_backlog_limit


def test_a_message_longer_than_its_buffer_is_dropped() -> None:
    c = MultiConsole()
    c.post_control(2, size=6)  # a control message needs 8 bytes
    c.control_out(msg(BAD_ID, E.VIRTIO_CONSOLE_DEVICE_READY))
    assert [length for _, length in c.drv.used(CONTROL_RECEIVEQ)] == [0, 0]
    assert c.dev.control_dropped == 2


def test_without_multiport_acked_only_port0_runs() -> None:
    offered = VirtioConsole(FakeStream(), ports=[("a", FakeStream())]).avail_features
    c = MultiConsole(features=offered & ~feature_bit(VIRTIO_CONSOLE_F_MULTIPORT))
    assert not c.dev.multiport
    c.console.incoming += b"hi"
    head, _gpa = c.post_rx(0, 4)
    assert c.drv.used(receive_queue(0)) == [(head, 2)]


def test_reset_forgets_what_the_driver_said() -> None:
    c = MultiConsole()
    c.bring_up()
    c.control_out(msg(1, E.VIRTIO_CONSOLE_PORT_OPEN, 1))
    c.drv.set_status(0)
    assert all(not p.ready and not p.guest_open and p.host_open is None for p in c.dev.ports)


def test_single_port_size_change_is_a_config_interrupt() -> None:
    stream = FakeStream()
    dev = VirtioConsole(stream, cols=80, rows=25)
    mem = BytearrayMemory(RAM_SIZE)
    fn = VirtioPciFunction(dev, presentation=Presentation(), memory=mem)
    drv = FakeVirtioDriver(fn, mem)
    drv.start(2)
    generation = fn.config_generation
    stream.size = (120, 33)
    dev.pump_host()
    assert fn.config_generation != generation
    raw = bytes(drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(4))
    assert RESIZE.unpack(raw) == (120, 33)
    assert MsiRaised in {type(e) for e in drv.take()}


def test_first_transmit_announces_the_size() -> None:
    stream = FakeStream()
    dev = VirtioConsole(stream, cols=90, rows=30)
    mem = BytearrayMemory(RAM_SIZE)
    fn = VirtioPciFunction(dev, presentation=Presentation(), memory=mem)
    drv = FakeVirtioDriver(fn, mem)
    drv.start(2)

    def config_msis() -> int:
        return sum(
            1 for e in drv.take() if isinstance(e, MsiRaised) and e.data == 0x40 + CONFIG_VECTOR
        )

    for n in range(2):
        gpa = drv.alloc(1)
        drv.put(gpa, b"x")
        drv.publish(1, drv.add_chain(1, [(gpa, 1, False)]))
        drv.kick(1)
        assert config_msis() == (1 if n == 0 else 0)
