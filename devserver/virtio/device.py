"""The device side of virtio, kept apart from any transport (virtio 1.2 §2 Basic
Facilities of a Virtio Device; crosvm `virtio_device.rs`, Firecracker
`VirtioDevice`, kvmtool `struct virtio_ops`).

A device says what it is (type, features, queue sizes, config bytes) and what
it does with its queues; the transport (pci_transport.py) owns status,
feature negotiation, queue registers and interrupts. Lifecycle:

    created ──activate(queues, memory, interrupt, features)──▶ active
       ▲                                                          │
       └──────────────────────────── reset() ─────────────────────┘
    (reset comes from a driver writing 0 to device_status, or a function reset)

`notify(q)` is called for a kick of an active queue and must do bounded work
(reliability.md C8: vhost's weight): at most QUEUE_WEIGHT chains, then return
True to be called again later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final, Protocol

from .chain import DescriptorChain, RingMemory
from .queue import SplitQueue
from .spec import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    feature_bit,
)

# Chains handled per notify() call before yielding (vhost_exceeds_weight's idea).
QUEUE_WEIGHT: Final = 64


class VirtioInterrupt(Protocol):
    """How a device raises interrupts (Firecracker's VirtioInterrupt)."""

    def signal_used(self, queue_index: int) -> None:
        """Used buffer notification for queue `queue_index` (§2.3.2)."""

    def signal_config(self) -> None:
        """Configuration change notification (§2.3.1)."""


class VirtioDevice:
    """Base of every virtio device model; override what the device needs."""

    device_type: ClassVar[int] = 0
    type_name: ClassVar[str] = "virtio-pci"  # its --device type, in topology and logs
    pci_class_code: ClassVar[int] = 0xFF0000  # "device does not fit any class"

    def __init__(self, queue_max_sizes: tuple[int, ...], features: int = 0) -> None:
        self.queue_max_sizes = queue_max_sizes
        # §6.1: a modern device offers VERSION_1 (Linux refuses a device without it).
        # The ring features are the transport's (the queue code implements them for
        # every device): indirect tables let a driver post long requests in one
        # ring slot, EVENT_IDX halves the kicks and interrupts of a busy queue.
        self.avail_features = (
            features
            | feature_bit(VIRTIO_F_VERSION_1)
            | feature_bit(VIRTIO_F_RING_INDIRECT_DESC)
            | feature_bit(VIRTIO_F_RING_EVENT_IDX)
        )
        self.acked_features = 0
        self.queues: Mapping[int, SplitQueue] = {}
        self.memory: RingMemory | None = None
        self.interrupt: VirtioInterrupt | None = None

    # -- configuration space (§4.1.4.6 device-specific configuration)

    def config_bytes(self) -> bytes:
        """The device configuration structure, little-endian."""
        return b""

    def read_config(self, offset: int, size: int) -> int:
        """A driver read; bytes past the structure read 0 (Firecracker's default)."""
        data = self.config_bytes()
        chunk = data[offset : offset + size] if 0 <= offset < len(data) else b""
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """A driver write; most fields are read-only, so the default ignores it.

        It only stores: the shell serves it on the event loop, not in a worker
        (VirtioPciFunction.access_may_block); a device whose config write does
        I/O must say so there."""

    # -- lifecycle

    def activate(
        self,
        queues: Mapping[int, SplitQueue],
        memory: RingMemory,
        interrupt: VirtioInterrupt,
        features: int,
    ) -> None:
        """DRIVER_OK: `queues` are the enabled ones, by index; `features` negotiated."""
        self.queues = queues
        self.memory = memory
        self.interrupt = interrupt
        self.acked_features = features

    def reset(self) -> None:
        """Back to 'created': drop queues and anything in flight."""
        self.queues = {}
        self.memory = None
        self.interrupt = None
        self.acked_features = 0

    def notify(self, queue_index: int) -> bool:
        """The driver kicked an active queue. True: work remains (call again)."""
        return False

    # -- helpers

    def complete(self, queue: SplitQueue, chain: DescriptorChain, written: int) -> None:
        """Return a chain to the driver and interrupt it if it asked to be."""
        interrupt = self.interrupt
        if queue.complete(chain, written) and queue.needs_notification() and interrupt:
            interrupt.signal_used(queue.index)
