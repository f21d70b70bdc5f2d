"""virtio-net (virtio 1.2 §5.1 Network Device): one receive and one transmit
queue, a MAC address, link status and an MTU; no offloads, no control queue.

Queues (§5.1.2): receiveq1 is 0 (device → driver), transmitq1 is 1.

Features: VIRTIO_NET_F_MAC (the configured address), VIRTIO_NET_F_STATUS (the
link is always up) and VIRTIO_NET_F_MTU. Nothing else: no checksum or
segmentation offload, so every header the driver sends is ignored and every
header the device writes is zero but for num_buffers.

Header (§5.1.6): with VIRTIO_F_VERSION_1 every packet starts with the 12-byte
struct virtio_net_hdr, num_buffers included, whatever MRG_RXBUF says. On
receive it is all zero (no flags, no GSO) with num_buffers = 1: without
MRG_RXBUF a frame fills exactly one chain.

receiveq: a frame waiting at the host end is copied, after the header, into a
posted chain; a chain is popped only when a frame waits, so buffers stay
posted otherwise, and the port is asked for a frame only when a chain is
there (back-pressure: the host end holds what it read in a bounded buffer and
stops reading when that is full). A frame longer than the chain's writable
bytes is dropped and counted, the chain stays with the driver.

transmitq: the device-readable bytes of a chain are a header then a frame; the
frame goes to the host end. A chain shorter than the header, or with a frame
longer than MAX_FRAME, is guest nonsense that latches nothing: it is dropped
and counted (only the header-sized prefix is ever read of a frame too long, so
a guest-chosen length never sizes an allocation). Heads return with 0.

The port is called synchronously, from a worker thread; the service wakes the
device (`notify` of receiveq) when frames arrive.
"""

from __future__ import annotations

import struct
from typing import Final

from ..errors import ConfigError
from ..ports import PacketPort
from ..virtio.chain import MAX_COPY, Reader, Writer
from ..virtio.device import QUEUE_WEIGHT, VirtioDevice
from ..virtio.spec import VirtioDeviceId, feature_bit

QUEUE_SIZE: Final = 256
RECEIVEQ: Final = 0
TRANSMITQ: Final = 1

# §5.1.3 feature bits
VIRTIO_NET_F_MTU: Final = 3
VIRTIO_NET_F_MAC: Final = 5
VIRTIO_NET_F_STATUS: Final = 16

# §5.1.4 status bits
VIRTIO_NET_S_LINK_UP: Final = 1

# struct virtio_net_config up to mtu: u8 mac[6], le16 status,
# le16 max_virtqueue_pairs, le16 mtu
CONFIG: Final = struct.Struct("<6sHHH")
# struct virtio_net_hdr: u8 flags, u8 gso_type, le16 hdr_len, le16 gso_size,
# le16 csum_start, le16 csum_offset, le16 num_buffers
HEADER: Final = struct.Struct("<BBHHHHH")
HEADER_SIZE: Final = HEADER.size  # 12
RX_HEADER: Final = HEADER.pack(0, 0, 0, 0, 0, 0, 1)

# The longest frame either way: a 65535-byte IP packet in an Ethernet frame
# with a VLAN tag (QEMU's bound, NET_BUFSIZE, is of the same size).
MAX_FRAME: Final = 65550
# The shortest frame worth passing on: an Ethernet header.
MIN_FRAME: Final = 14
DEFAULT_MTU: Final = 1500
MIN_MTU: Final = 68  # RFC 791's minimum, and Linux's ETH_MIN_MTU
MAX_MTU: Final = MAX_FRAME - 18  # header and VLAN tag fit in MAX_FRAME


def parse_mac(text: str) -> bytes:
    """`52:54:00:12:34:56` → 6 bytes; ConfigError for anything else, or for a
    multicast address (its low bit of the first octet set: no unicast NIC)."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ConfigError(f"virtio-net mac={text!r}: use six hex octets, 52:54:00:12:34:56")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"virtio-net mac={text!r} is not hex octets") from None
    if mac[0] & 1:
        raise ConfigError(f"virtio-net mac={text!r} is a multicast address")
    return mac


def default_mac(number: int) -> bytes:
    """QEMU's locally administered prefix 52:54:00 and the device's number."""
    return bytes((0x52, 0x54, 0x00, 0x12, (number >> 8) & 0xFF, number & 0xFF))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class VirtioNet(VirtioDevice):
    """A NIC whose wire is `port` (a tap device in the shell)."""

    device_type = VirtioDeviceId.NET
    type_name = "virtio-net"
    pci_class_code = 0x020000  # network controller, Ethernet

    def __init__(self, port: PacketPort, *, mac: bytes, mtu: int = DEFAULT_MTU) -> None:
        if len(mac) != 6:
            raise ConfigError(f"virtio-net MAC address must be 6 bytes, not {len(mac)}")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ConfigError(f"virtio-net mtu={mtu} is not {MIN_MTU}..{MAX_MTU}")
        features = (
            feature_bit(VIRTIO_NET_F_MAC)
            | feature_bit(VIRTIO_NET_F_STATUS)
            | feature_bit(VIRTIO_NET_F_MTU)
        )
        super().__init__((QUEUE_SIZE, QUEUE_SIZE), features)
        self.port = port
        self.mac = bytes(mac)
        self.mtu = mtu
        self.rx_frames = 0  # host → guest, delivered
        self.rx_dropped = 0  # host → guest, too long for the chain given
        self.tx_frames = 0  # guest → host, accepted by the port
        self.tx_dropped = 0  # guest → host, refused by the port (down, full)
        self.tx_malformed = 0  # guest → host, shorter than a header or longer than MAX_FRAME

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1, self.mtu)

    # -- notifications

    def notify(self, queue_index: int) -> bool:
        if queue_index == TRANSMITQ:
            return self._transmit()
        # receiveq got buffers, or the host end woke us (frames arrived).
        return self.pump_host()

    def pump_host(self) -> bool:
        """Frames waiting at the host end into posted receive chains (at most
        QUEUE_WEIGHT chains). True: more could move now (call again)."""
        queue = self.queues.get(RECEIVEQ)
        memory = self.memory
        if queue is None or memory is None:
            return False
        port = self.port
        for _ in range(QUEUE_WEIGHT):
            if not port.pending() or not queue.available():
                return False
            chain = queue.pop()
            if chain is None:
                return False
            frame = port.receive()
            if frame is None:
                # Taken by nobody else, so this cannot happen; give the chain back empty.
                self.complete(queue, chain, 0)
                return False
            if HEADER_SIZE + len(frame) > chain.writable_len:
                # §5.1.6.3: without MRG_RXBUF a frame must fit one chain. Linux
                # posts chains for its MTU; a bigger frame is dropped here. The
                # chain goes back unused (0 bytes: the driver recycles it).
                self.rx_dropped += 1
                self.complete(queue, chain, 0)
                continue
            writer = Writer(memory, chain.writable)
            writer.write(RX_HEADER)
            at = 0
            while at < len(frame):
                at += writer.write(frame[at : at + MAX_COPY])
            self.rx_frames += 1
            self.complete(queue, chain, writer.written)
        return port.pending() and queue.available() > 0

    def _transmit(self) -> bool:
        queue = self.queues.get(TRANSMITQ)
        memory = self.memory
        if queue is None or memory is None:
            return False
        for _ in range(QUEUE_WEIGHT):
            chain = queue.pop()
            if chain is None:
                return False
            frame_len = chain.readable_len - HEADER_SIZE
            if not MIN_FRAME <= frame_len <= MAX_FRAME:
                self.tx_malformed += 1
            else:
                reader = Reader(memory, chain.readable)
                reader.skip(HEADER_SIZE)  # no offloads: nothing in it to act on
                frame = reader.read(frame_len)  # ≤ MAX_FRAME < MAX_COPY: one read
                if self.port.send(frame):
                    self.tx_frames += 1
                else:
                    self.tx_dropped += 1
            self.complete(queue, chain, 0)
        return queue.available() > 0
