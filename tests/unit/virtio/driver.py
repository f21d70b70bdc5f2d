"""A fake virtio driver and a trivial test device (rust-vmm's MockSplitQueue idea).

`FakeVirtioDriver` plays the guest: it lays descriptor tables and rings out in
a BytearrayMemory and drives a VirtioPciFunction only through config and BAR
accesses, in the order Linux's virtio_pci_modern does (status handshake,
feature pages, queue set-up, MSI-X, kick).

`EchoDevice` is not a virtio device type from the spec and is registered
nowhere: queue 0 copies each chain's readable bytes into its writable ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from devserver.effects import Effect
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.pci.regs import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from devserver.virtio.chain import Reader, RingMemory, Writer
from devserver.virtio.device import QUEUE_WEIGHT, VirtioDevice, VirtioInterrupt
from devserver.virtio.pci_transport import (
    CONFIG_MSIX_VECTOR,
    DEVICE_FEATURE,
    DEVICE_FEATURE_SELECT,
    DEVICE_STATUS,
    DRIVER_FEATURE,
    DRIVER_FEATURE_SELECT,
    ISR_CFG_OFFSET,
    MSIX_BAR,
    NOTIFY_CFG_OFFSET,
    NOTIFY_OFF_MULTIPLIER,
    QUEUE_DESC_HI,
    QUEUE_DESC_LO,
    QUEUE_DEVICE_HI,
    QUEUE_DEVICE_LO,
    QUEUE_DRIVER_HI,
    QUEUE_DRIVER_LO,
    QUEUE_ENABLE,
    QUEUE_MSIX_VECTOR,
    QUEUE_NOTIFY_OFF,
    QUEUE_SELECT,
    QUEUE_SIZE,
    VIRTIO_BAR,
    VirtioPciFunction,
)
from devserver.virtio.queue import SplitQueue
from devserver.virtio.ring import DESC, U16, USED_ELEM, avail_event_offset, used_event_offset
from devserver.virtio.spec import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceStatus,
    feature_bit,
)

RAM_SIZE: Final = 0x10_0000  # 1 MiB at guest-physical 0
ECHO_DEVICE_TYPE: Final = 0x3F  # a number the spec leaves unassigned; tests only
ECHO_MAGIC: Final = b"ECHO"
MSIX_CAP_FLAGS: Final = 2
MSIX_ENABLE: Final = 0x8000
STANDARD_FEATURES: Final = (
    feature_bit(VIRTIO_F_VERSION_1)
    | feature_bit(VIRTIO_F_RING_INDIRECT_DESC)
    | feature_bit(VIRTIO_F_RING_EVENT_IDX)
)


class EchoDevice(VirtioDevice):
    """Queue 0 echoes readable bytes into writable buffers; config: magic + scratch."""

    device_type = ECHO_DEVICE_TYPE

    def __init__(
        self, queue_max_sizes: tuple[int, ...] = (16, 16), features: int = STANDARD_FEATURES
    ) -> None:
        super().__init__(queue_max_sizes, features)
        self.scratch = 0
        self.notifies = 0
        self.resets = 0
        self.activations = 0

    def config_bytes(self) -> bytes:
        return ECHO_MAGIC + self.scratch.to_bytes(4, "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == 4 and size == 4:
            self.scratch = value

    def activate(
        self,
        queues: Mapping[int, SplitQueue],
        memory: RingMemory,
        interrupt: VirtioInterrupt,
        features: int,
    ) -> None:
        super().activate(queues, memory, interrupt, features)
        self.activations += 1

    def reset(self) -> None:
        super().reset()
        self.resets += 1

    def notify(self, queue_index: int) -> bool:
        self.notifies += 1
        queue = self.queues[queue_index]
        assert self.memory is not None
        for _ in range(QUEUE_WEIGHT):
            chain = queue.pop()
            if chain is None:
                return False
            data = Reader(self.memory, chain.readable).read_all()
            written = Writer(self.memory, chain.writable).write(data)
            self.complete(queue, chain, written)
        return queue.available() > 0


@dataclass
class QueueLayout:
    """Where the driver put one queue, and its own view of the ring indices."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    next_desc: int = 0
    last_used: int = 0
    heads: list[int] = field(default_factory=list)


class FakeVirtioDriver:
    def __init__(self, function: VirtioPciFunction, memory: BytearrayMemory) -> None:
        self.fn = function
        self.mem = memory
        self.effects: list[Effect] = []
        self.queues: dict[int, QueueLayout] = {}
        self._next_free = 0x1000

    # -- raw accesses, as a guest's CPU makes them

    def read(self, offset: int, size: int) -> int:
        return self.fn.bar_read(VIRTIO_BAR, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.effects.extend(self.fn.bar_write(VIRTIO_BAR, offset, size, value))

    def cfg_read(self, offset: int, size: int) -> int:
        return self.fn.config_read(offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.effects.extend(self.fn.config_write(offset, size, value))

    def take(self) -> list[Effect]:
        out = self.effects + self.fn.take_effects()
        self.effects = []
        return out

    # -- memory

    def alloc(self, size: int, align: int = 16) -> int:
        at = (self._next_free + align - 1) & ~(align - 1)
        self._next_free = at + size
        assert self._next_free <= RAM_SIZE
        return at

    def put(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data)

    def get(self, gpa: int, length: int) -> bytes:
        return self.mem.read(gpa, length)

    # -- initialisation (§3.1.1)

    @property
    def status(self) -> int:
        return self.read(DEVICE_STATUS, 1)

    def set_status(self, value: int) -> None:
        self.write(DEVICE_STATUS, 1, value)

    def enable_bus_master(self) -> None:
        self.cfg_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def device_features(self) -> int:
        self.write(DEVICE_FEATURE_SELECT, 4, 0)
        low = self.read(DEVICE_FEATURE, 4)
        self.write(DEVICE_FEATURE_SELECT, 4, 1)
        return low | self.read(DEVICE_FEATURE, 4) << 32

    def set_driver_features(self, features: int) -> None:
        for page in (0, 1):
            self.write(DRIVER_FEATURE_SELECT, 4, page)
            self.write(DRIVER_FEATURE, 4, (features >> (32 * page)) & 0xFFFF_FFFF)

    def negotiate(self, features: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back."""
        self.set_status(0)
        self.set_status(DeviceStatus.ACKNOWLEDGE)
        self.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        self.set_driver_features(self.device_features() if features is None else features)
        self.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)
        return self.status

    def driver_ok(self) -> None:
        self.set_status(self.status | DeviceStatus.DRIVER_OK)

    def enable_msix(self) -> None:
        """Program vector v to address 0xFEE00000, data 0x40 + v, unmasked, and enable."""
        msix = self.fn.msix
        assert msix is not None
        for v in range(msix.vectors):
            base = 16 * v
            self.effects.extend(self.fn.bar_write(MSIX_BAR, base, 4, 0xFEE0_0000))
            self.effects.extend(self.fn.bar_write(MSIX_BAR, base + 4, 4, 0))
            self.effects.extend(self.fn.bar_write(MSIX_BAR, base + 8, 4, 0x40 + v))
            self.effects.extend(self.fn.bar_write(MSIX_BAR, base + 12, 4, 0))
        self.cfg_write(msix.cap_offset + MSIX_CAP_FLAGS, 2, MSIX_ENABLE)
        self.write(CONFIG_MSIX_VECTOR, 2, 0)

    def setup_queue(
        self, index: int, size: int | None = None, *, vector: int = 0xFFFF
    ) -> QueueLayout:
        self.write(QUEUE_SELECT, 2, index)
        size = self.read(QUEUE_SIZE, 2) if size is None else size
        self.write(QUEUE_SIZE, 2, size)
        layout = QueueLayout(
            index,
            size,
            desc=self.alloc(16 * size, 16),
            avail=self.alloc(6 + 2 * size, 2),
            used=self.alloc(6 + 8 * size, 4),
        )
        for lo, hi, gpa in (
            (QUEUE_DESC_LO, QUEUE_DESC_HI, layout.desc),
            (QUEUE_DRIVER_LO, QUEUE_DRIVER_HI, layout.avail),
            (QUEUE_DEVICE_LO, QUEUE_DEVICE_HI, layout.used),
        ):
            self.write(lo, 4, gpa & 0xFFFF_FFFF)
            self.write(hi, 4, gpa >> 32)
        self.write(QUEUE_MSIX_VECTOR, 2, vector)
        assert self.read(QUEUE_NOTIFY_OFF, 2) == index
        self.write(QUEUE_ENABLE, 2, 1)
        self.queues[index] = layout
        return layout

    def start(self, queues: int = 1, *, msix: bool = True, features: int | None = None) -> None:
        """The whole of Linux's probe: bus master, handshake, MSI-X, queues, DRIVER_OK."""
        self.enable_bus_master()
        assert self.negotiate(features) & DeviceStatus.FEATURES_OK
        if msix:
            self.enable_msix()
        for q in range(queues):
            self.setup_queue(q, vector=q + 1 if msix else 0xFFFF)
        self.driver_ok()
        self.take()

    # -- rings

    def put_desc(
        self, q: int, index: int, addr: int, length: int, flags: int = 0, next_: int = 0
    ) -> None:
        layout = self.queues[q]
        self.put(layout.desc + 16 * index, DESC.pack(addr, length, flags, next_))

    def add_chain(self, q: int, buffers: list[tuple[int, int, bool]]) -> int:
        """Descriptors for (addr, length, device_writable) buffers, chained; returns the head."""
        layout = self.queues[q]
        indices = [(layout.next_desc + i) % layout.size for i in range(len(buffers))]
        layout.next_desc = (layout.next_desc + len(buffers)) % layout.size
        for i, (addr, length, writable) in enumerate(buffers):
            flags = VIRTQ_DESC_F_WRITE if writable else 0
            nxt = 0
            if i + 1 < len(buffers):
                flags |= VIRTQ_DESC_F_NEXT
                nxt = indices[i + 1]
            self.put_desc(q, indices[i], addr, length, flags, nxt)
        return indices[0]

    def add_request(self, q: int, data: bytes, reply: int) -> tuple[int, int]:
        """A readable buffer holding `data` and a writable one of `reply` bytes:
        returns (head, reply address)."""
        src = self.alloc(max(len(data), 1))
        dst = self.alloc(max(reply, 1))
        self.put(src, data)
        buffers = [(src, len(data), False), (dst, reply, True)]
        return self.add_chain(q, buffers), dst

    def publish(self, q: int, head: int) -> None:
        layout = self.queues[q]
        self.put(layout.avail + 4 + 2 * (layout.avail_idx % layout.size), U16.pack(head))
        layout.avail_idx = (layout.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(q, layout.avail_idx)

    def set_avail_idx(self, q: int, idx: int) -> None:
        self.put(self.queues[q].avail + 2, U16.pack(idx & 0xFFFF))

    def set_avail_flags(self, q: int, flags: int) -> None:
        self.put(self.queues[q].avail, U16.pack(flags))

    def set_used_event(self, q: int, value: int) -> None:
        layout = self.queues[q]
        self.put(layout.avail + used_event_offset(layout.size), U16.pack(value))

    def avail_event(self, q: int) -> int:
        layout = self.queues[q]
        return int(U16.unpack(self.get(layout.used + avail_event_offset(layout.size), 2))[0])

    def kick(self, q: int) -> None:
        self.write(NOTIFY_CFG_OFFSET + NOTIFY_OFF_MULTIPLIER * q, 2, q)

    def used_idx(self, q: int) -> int:
        return int(U16.unpack(self.get(self.queues[q].used + 2, 2))[0])

    def used(self, q: int) -> list[tuple[int, int]]:
        """New used elements since the last call: (id, len)."""
        layout = self.queues[q]
        out = []
        idx = self.used_idx(q)
        while layout.last_used != idx:
            slot = layout.last_used % layout.size
            raw = self.get(layout.used + 4 + 8 * slot, 8)
            head, length = USED_ELEM.unpack(raw)
            out.append((int(head), int(length)))
            layout.last_used = (layout.last_used + 1) & 0xFFFF
        return out

    def isr(self) -> int:
        return self.read(ISR_CFG_OFFSET, 1)


def make(
    device: EchoDevice | None = None, *, msix: bool = True, memory: bool = True
) -> tuple[VirtioPciFunction, FakeVirtioDriver, EchoDevice]:
    dev = device or EchoDevice()
    mem = BytearrayMemory(RAM_SIZE)
    fn = VirtioPciFunction(
        dev, presentation=Presentation(msix=msix), memory=mem if memory else None
    )
    fn.device_id = 3
    return fn, FakeVirtioDriver(fn, mem), dev
