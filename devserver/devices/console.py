"""virtio-console (virtio 1.2 §5.3 Console Device), one port.

Queues (§5.3.2): receiveq0 (index 0, host → guest) and transmitq0 (index 1,
guest → host). Only VIRTIO_CONSOLE_F_SIZE is offered (§5.3.3), so the
configuration structure's cols and rows are valid.

receiveq0: the driver posts device-writable buffers. Bytes the host end has
waiting are copied into them, across as many chained or scattered segments as
a chain has, and the head is returned with the count written. A buffer is
popped only when bytes are waiting, so with none the guest's buffers stay
posted; with no buffers posted the bytes stay in the ByteStream, whose bound
stops it reading from the host (reliability.md C9: back-pressure, never
unbounded buffering).

transmitq0: every device-readable byte of a chain, over every descriptor, goes
to the host end; when the stream refuses it (no client) it is dropped and
counted. Every popped head is returned with length 0 (nothing is written).

The stream is called synchronously; the service runs this device's work off
the event loop, and calls `pump_rx()` when host bytes arrive.
"""

from __future__ import annotations

import struct
from typing import Final

from ..errors import ConfigError
from ..ports import ByteStream
from ..virtio.chain import MAX_COPY, Reader, Writer
from ..virtio.device import QUEUE_WEIGHT, VirtioDevice
from ..virtio.spec import VirtioDeviceId, feature_bit

QUEUE_SIZE: Final = 128
RECEIVEQ: Final = 0
TRANSMITQ: Final = 1

# §5.3.3 feature bits
VIRTIO_CONSOLE_F_SIZE: Final = 0
VIRTIO_CONSOLE_F_MULTIPORT: Final = 1
VIRTIO_CONSOLE_F_EMERG_WRITE: Final = 2

# struct virtio_console_config: le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr
CONFIG: Final = struct.Struct("<HHII")


class VirtioConsole(VirtioDevice):
    """A single-port console joined to a ByteStream."""

    device_type = VirtioDeviceId.CONSOLE
    pci_class_code = 0x078000  # simple communication controller, other (QEMU's)

    def __init__(self, stream: ByteStream, *, cols: int = 80, rows: int = 25) -> None:
        for name, value in (("cols", cols), ("rows", rows)):
            if not 0 <= value <= 0xFFFF:
                raise ConfigError(f"virtio-console {name}={value} is not 0..65535")
        super().__init__((QUEUE_SIZE, QUEUE_SIZE), feature_bit(VIRTIO_CONSOLE_F_SIZE))
        self.stream = stream
        self.cols = cols
        self.rows = rows
        self.rx_bytes = 0  # host → guest, delivered
        self.tx_bytes = 0  # guest → host, accepted by the stream
        self.tx_dropped = 0  # guest → host, dropped (no client)

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.cols, self.rows, 1, 0)

    def notify(self, queue_index: int) -> bool:
        if queue_index == RECEIVEQ:
            return self.pump_rx()
        if queue_index == TRANSMITQ:
            return self._transmit()
        return False

    def pump_rx(self) -> bool:
        """Move waiting host bytes into posted receive buffers (at most
        QUEUE_WEIGHT chains). True: more could move now (call again)."""
        queue = self.queues.get(RECEIVEQ)
        memory = self.memory
        if queue is None or memory is None:
            return False
        for _ in range(QUEUE_WEIGHT):
            if not self.stream.readable() or not queue.available():
                return False
            chain = queue.pop()
            if chain is None:
                return False
            writer = Writer(memory, chain.writable)
            while writer.remaining:
                data = self.stream.read(min(writer.remaining, MAX_COPY))
                if not data:
                    break
                writer.write(data)
            self.rx_bytes += writer.written
            self.complete(queue, chain, writer.written)
        return bool(self.stream.readable()) and queue.available() > 0

    def _transmit(self) -> bool:
        queue = self.queues.get(TRANSMITQ)
        memory = self.memory
        if queue is None or memory is None:
            return False
        for _ in range(QUEUE_WEIGHT):
            chain = queue.pop()
            if chain is None:
                return False
            reader = Reader(memory, chain.readable)
            while reader.remaining:
                data = reader.read(MAX_COPY)
                if self.stream.write(data):
                    self.tx_bytes += len(data)
                else:
                    self.tx_dropped += len(data)
            self.complete(queue, chain, 0)
        return queue.available() > 0
