"""virtio-console (virtio 1.2 §5.3 Console Device): port 0 (the console, hvc0)
and, with VIRTIO_CONSOLE_F_MULTIPORT, named ports (virtio-serial).

Queues (§5.3.2): receiveq0 (0, host → guest), transmitq0 (1, guest → host);
with multiport also control receiveq (2, device → driver), control transmitq
(3, driver → device) and port N's receiveq/transmitq at 2N+2 and 2N+3. Every
queue a port count could need is offered; a driver without multiport enables
only the first two. Multiport is offered only when named ports are configured,
so a plain console stays the single-port device Linux binds to hvc0 at once.

Console size (§5.3.4, F_SIZE): cols/rows are in the configuration structure.
Without multiport Linux reads them only on a configuration change
interrupt, never at probe, so the device announces them with one when the
driver first transmits (hvc0 exists by then) and whenever the host end's size
changes (the transport bumps config_generation and interrupts). With
multiport the size goes to port 0 as a RESIZE control message.

receiveqN: host bytes waiting in the port's ByteStream are copied into posted
device-writable buffers, across every segment of a chain; a chain is popped
only when bytes wait, so the guest's buffers stay posted otherwise, and with no
buffers the bytes stay in the bounded stream (reliability.md C9: back-pressure).
A named port gets host bytes only while the guest has it open (Linux discards
data for a port nobody opened), port 0 only once the driver set it up.

transmitqN: every device-readable byte of a chain goes to the port's host end;
what it refuses (no peer, full) is dropped and counted. Heads return with 0.

Control messages (§5.3.6.2), struct virtio_console_control {le32 id; le16
event; le16 value}: the driver sends DEVICE_READY, PORT_READY and PORT_OPEN; the
device answers DEVICE_READY with PORT_ADD for each port and PORT_READY with
CONSOLE_PORT (port 0), RESIZE, PORT_NAME (named ports) and PORT_OPEN (the host
end's connection). Anything else from the driver (an unknown or device-only
event, a port id out of range, a buffer shorter than the header) is refused:
counted, nothing changes. Messages for the driver wait in a backlog bounded by
the port count; a driver that asks again and again without posting control
buffers loses the excess (counted), it never grows the device's memory.

Streams are called synchronously; the service runs this device's work off the
event loop and wakes it (`notify` of a receive queue) when host bytes arrive.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from ..errors import ConfigError
from ..ports import ByteStream
from ..virtio.chain import MAX_COPY, Reader, Writer
from ..virtio.device import QUEUE_WEIGHT, VirtioDevice
from ..virtio.spec import VirtioDeviceId, feature_bit

QUEUE_SIZE: Final = 128
RECEIVEQ: Final = 0
TRANSMITQ: Final = 1
CONTROL_RECEIVEQ: Final = 2
CONTROL_TRANSMITQ: Final = 3

# §5.3.3 feature bits
VIRTIO_CONSOLE_F_SIZE: Final = 0
VIRTIO_CONSOLE_F_MULTIPORT: Final = 1
VIRTIO_CONSOLE_F_EMERG_WRITE: Final = 2

# struct virtio_console_config: le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr
CONFIG: Final = struct.Struct("<HHII")
# struct virtio_console_control: le32 id, le16 event, le16 value
CONTROL: Final = struct.Struct("<IHH")
# struct virtio_console_resize: le16 cols, le16 rows
RESIZE: Final = struct.Struct("<HH")

# Ports a device may have (port 0 included). Linux takes any count; this bound
# keeps the queue count (2 per port + 2 control) and MSI-X table small.
MAX_PORTS: Final = 32
# Longest port name, in UTF-8 bytes (a control buffer is a page in Linux).
MAX_NAME: Final = 255


class ConsoleControlEvent(enum.IntEnum):
    """§5.3.6.2: virtio_console_control.event."""

    VIRTIO_CONSOLE_DEVICE_READY = 0
    VIRTIO_CONSOLE_DEVICE_ADD = 1  # PORT_ADD in Linux
    VIRTIO_CONSOLE_DEVICE_REMOVE = 2
    VIRTIO_CONSOLE_PORT_READY = 3
    VIRTIO_CONSOLE_CONSOLE_PORT = 4
    VIRTIO_CONSOLE_RESIZE = 5
    VIRTIO_CONSOLE_PORT_OPEN = 6
    VIRTIO_CONSOLE_PORT_NAME = 7


E = ConsoleControlEvent


class ConsoleHostEnd(ByteStream, Protocol):
    """A port's host end: a ByteStream that also says whether a peer is there
    and, for a terminal, its size."""

    @property
    def connected(self) -> bool:
        """A peer is attached (a socket client; always for a pty or stdio)."""

    def window_size(self) -> tuple[int, int] | None:
        """(cols, rows) of a host terminal; None: not a terminal (size is static)."""


def receive_queue(port_id: int) -> int:
    """§5.3.2: port 0's receiveq is 0, port N's (N ≥ 1) is 2N + 2."""
    return RECEIVEQ if port_id == 0 else 2 * port_id + 2


def transmit_queue(port_id: int) -> int:
    return receive_queue(port_id) + 1


def port_of_queue(index: int) -> int | None:
    """The port a data queue belongs to; None for the control queues."""
    if index in (RECEIVEQ, TRANSMITQ):
        return 0
    if index in (CONTROL_RECEIVEQ, CONTROL_TRANSMITQ):
        return None
    return (index - 2) // 2


@dataclass(slots=True)
class ConsolePort:
    """One port: its host end and what the driver told us about it."""

    port_id: int
    name: str  # "" for port 0
    stream: ConsoleHostEnd
    ready: bool = False  # the driver sent PORT_READY 1
    guest_open: bool = False  # the driver sent PORT_OPEN 1 (a guest process has it open)
    host_open: bool | None = None  # the connection state last sent to the driver

    @property
    def is_console(self) -> bool:
        return self.port_id == 0


class VirtioConsole(VirtioDevice):
    """Port 0 on `stream`; named ports (multiport) on the streams of `ports`."""

    device_type = VirtioDeviceId.CONSOLE
    type_name = "virtio-console"
    pci_class_code = 0x078000  # simple communication controller, other (QEMU's)

    def __init__(
        self,
        stream: ConsoleHostEnd,
        *,
        cols: int = 80,
        rows: int = 25,
        ports: Sequence[tuple[str, ConsoleHostEnd]] = (),
    ) -> None:
        for what, value in (("cols", cols), ("rows", rows)):
            if not 0 <= value <= 0xFFFF:
                raise ConfigError(f"virtio-console {what}={value} is not 0..65535")
        if len(ports) + 1 > MAX_PORTS:
            raise ConfigError(f"virtio-console has {len(ports) + 1} ports; at most {MAX_PORTS}")
        names = [name for name, _ in ports]
        for name in names:
            if not name or len(name.encode()) > MAX_NAME or "\0" in name:
                raise ConfigError(
                    f"virtio-console port name {name!r} must be 1..{MAX_NAME} bytes, no NUL"
                )
            if names.count(name) > 1:
                raise ConfigError(f"virtio-console has two ports named {name!r}")
        self.ports = [ConsolePort(0, "", stream)] + [
            ConsolePort(i, name, end) for i, (name, end) in enumerate(ports, start=1)
        ]
        self.offers_multiport = bool(ports)
        queues = 2 * (len(self.ports) + 1) if self.offers_multiport else 2
        features = feature_bit(VIRTIO_CONSOLE_F_SIZE)
        if self.offers_multiport:
            features |= feature_bit(VIRTIO_CONSOLE_F_MULTIPORT)
        super().__init__((QUEUE_SIZE,) * queues, features)
        self.stream = stream
        self.cols = cols
        self.rows = rows
        # Device → driver control messages: a handful per port answers all a
        # driver may ask; more only from a driver that asks without reading.
        self.control_backlog_limit = 8 * len(self.ports) + 8
        self._control_out: deque[bytes] = deque()
        self._size_announced = False
        self.rx_bytes = 0  # host → guest, delivered
        self.tx_bytes = 0  # guest → host, accepted by a host end
        self.tx_dropped = 0  # guest → host, refused by a host end (no peer, full)
        self.control_refused = 0  # driver control messages refused as malformed
        self.control_dropped = 0  # device control messages lost (backlog full, short buffer)

    @property
    def multiport(self) -> bool:
        return bool(self.acked_features & feature_bit(VIRTIO_CONSOLE_F_MULTIPORT))

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.cols, self.rows, len(self.ports), 0)

    def reset(self) -> None:
        super().reset()
        for port in self.ports:
            port.ready = port.guest_open = False
            port.host_open = None
        self._control_out.clear()
        self._size_announced = False

    # -- notifications

    def notify(self, queue_index: int) -> bool:
        if queue_index == CONTROL_TRANSMITQ:
            return self._control_transmit() if self.multiport else False
        port_id = port_of_queue(queue_index)
        if port_id is not None and queue_index == transmit_queue(port_id):
            if port_id < len(self.ports):
                return self._transmit(self.ports[port_id])
            return False
        # A receive queue (data or control) got buffers, or the host end woke us.
        return self.pump_host()

    def pump_host(self) -> bool:
        """Everything the host side has for the driver: size and connection
        changes, control messages, waiting bytes (at most QUEUE_WEIGHT chains in
        all). True: more could move now (call again)."""
        if self.memory is None or not self.queues:
            return False
        self._refresh_host_state()
        budget = QUEUE_WEIGHT
        more = False
        if self.multiport:
            budget, more = self._control_receive(budget)
        for port in self.ports:
            if not self._delivers(port):
                continue
            budget, port_more = self._receive(port, budget)
            more = more or port_more
        return more

    # -- host state

    def _refresh_host_state(self) -> None:
        size = self.ports[0].stream.window_size()
        if size is not None and size != (self.cols, self.rows):
            self.cols, self.rows = size
            if self.multiport:
                if self.ports[0].ready:
                    self._send_resize()
            else:
                self._config_changed()
        if not self.multiport:
            return
        for port in self.ports:
            connected = port.stream.connected
            if port.ready and port.host_open != connected:
                self._send_control(port.port_id, E.VIRTIO_CONSOLE_PORT_OPEN, int(connected))
                port.host_open = connected

    def _config_changed(self) -> None:
        """cols/rows changed: the transport bumps config_generation and
        interrupts (§4.1.4.3). VirtioInterrupt has only signal_config, so the
        transport's config_changed is used when the interrupt sink has one."""
        interrupt = self.interrupt
        if interrupt is None:
            return
        changed = getattr(interrupt, "config_changed", None)
        if callable(changed):
            changed()
        else:
            interrupt.signal_config()

    def _delivers(self, port: ConsolePort) -> bool:
        if not self.multiport:
            return port.is_console
        return port.guest_open

    # -- data queues

    def _receive(self, port: ConsolePort, budget: int) -> tuple[int, bool]:
        queue = self.queues.get(receive_queue(port.port_id))
        memory = self.memory
        if queue is None or memory is None:
            return budget, False
        stream = port.stream
        while budget > 0:
            if not stream.readable() or not queue.available():
                return budget, False
            chain = queue.pop()
            if chain is None:
                return budget, False
            budget -= 1
            writer = Writer(memory, chain.writable)
            while writer.remaining:
                data = stream.read(min(writer.remaining, MAX_COPY))
                if not data:
                    break
                writer.write(data)
            self.rx_bytes += writer.written
            self.complete(queue, chain, writer.written)
        return budget, bool(stream.readable()) and queue.available() > 0

    def _transmit(self, port: ConsolePort) -> bool:
        queue = self.queues.get(transmit_queue(port.port_id))
        memory = self.memory
        if queue is None or memory is None:
            return False
        if port.is_console and not self.multiport and not self._size_announced:
            # Linux reads cols/rows only on a config interrupt; once the driver
            # transmits, hvc0 is registered and takes it (values unchanged, so
            # no generation bump: a plain signal).
            self._size_announced = True
            if self.interrupt is not None:
                self.interrupt.signal_config()
        for _ in range(QUEUE_WEIGHT):
            chain = queue.pop()
            if chain is None:
                return False
            reader = Reader(memory, chain.readable)
            while reader.remaining:
                data = reader.read(MAX_COPY)
                if port.stream.write(data):
                    self.tx_bytes += len(data)
                else:
                    self.tx_dropped += len(data)
            self.complete(queue, chain, 0)
        return queue.available() > 0

    # -- control queues (§5.3.6.2)

    def _send_control(
        self, port_id: int, event: ConsoleControlEvent, value: int, extra: bytes = b""
    ) -> None:
        if len(self._control_out) >= self.control_backlog_limit:
            self.control_dropped += 1
            return
        self._control_out.append(CONTROL.pack(port_id, event, value) + extra)

    def _send_resize(self) -> None:
        self._send_control(0, E.VIRTIO_CONSOLE_RESIZE, 0, RESIZE.pack(self.cols, self.rows))

    def _control_receive(self, budget: int) -> tuple[int, bool]:
        queue = self.queues.get(CONTROL_RECEIVEQ)
        memory = self.memory
        if queue is None or memory is None:
            return budget, False
        while budget > 0 and self._control_out:
            if not queue.available():
                return budget, False
            chain = queue.pop()
            if chain is None:
                return budget, False
            budget -= 1
            message = self._control_out.popleft()
            writer = Writer(memory, chain.writable)
            if writer.remaining < len(message):
                # A message must arrive whole: a short buffer gets nothing.
                self.control_dropped += 1
                self.complete(queue, chain, 0)
                continue
            writer.write(message)
            self.complete(queue, chain, writer.written)
        return budget, bool(self._control_out) and queue.available() > 0

    def _control_transmit(self) -> bool:
        queue = self.queues.get(CONTROL_TRANSMITQ)
        memory = self.memory
        if queue is None or memory is None:
            return False
        more = False
        for _ in range(QUEUE_WEIGHT):
            chain = queue.pop()
            if chain is None:
                break
            # Only the header is read: a longer buffer's rest is ignored, so a
            # guest-chosen length never sizes anything here.
            raw = Reader(memory, chain.readable).read(CONTROL.size)
            self.complete(queue, chain, 0)
            self._control_message(raw)
        else:
            more = queue.available() > 0
        # What the driver asked for (PORT_ADD, names, ...) goes out now.
        return self.pump_host() or more

    def _control_message(self, raw: bytes) -> None:
        if len(raw) < CONTROL.size:
            self.control_refused += 1
            return
        port_id, event, value = CONTROL.unpack(raw)
        if event == E.VIRTIO_CONSOLE_DEVICE_READY:
            if value:
                for port in self.ports:
                    self._send_control(port.port_id, E.VIRTIO_CONSOLE_DEVICE_ADD, 1)
            return
        if event not in (E.VIRTIO_CONSOLE_PORT_READY, E.VIRTIO_CONSOLE_PORT_OPEN):
            self.control_refused += 1  # device-only or unknown event
            return
        if port_id >= len(self.ports):
            self.control_refused += 1
            return
        port = self.ports[port_id]
        if event == E.VIRTIO_CONSOLE_PORT_OPEN:
            port.guest_open = bool(value)
            return
        if not value:  # the driver failed to add the port: it stays unused
            port.ready = False
            return
        port.ready = True
        if port.is_console:
            self._send_control(0, E.VIRTIO_CONSOLE_CONSOLE_PORT, 1)
            self._send_resize()
        if port.name:
            # §5.3.6.2: the UTF-8 name follows the header, without a NUL.
            self._send_control(port_id, E.VIRTIO_CONSOLE_PORT_NAME, 1, port.name.encode())
        connected = port.stream.connected
        self._send_control(port_id, E.VIRTIO_CONSOLE_PORT_OPEN, int(connected))
        port.host_open = connected
