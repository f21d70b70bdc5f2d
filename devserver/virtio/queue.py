"""Split virtqueues (virtio 1.2 §2.7 Split Virtqueues, §2.7.7 Used Buffer
Notification Suppression, §2.7.10 Available Buffer Notification Suppression,
§4.1.4.3 Common configuration structure layout: the queue_* fields).

Two objects, as crosvm keeps them apart:

- `QueueConfig` is what the driver programmed through the transport: size,
  ring addresses, MSI-X vector, enable. Size and addresses are frozen once the
  queue is enabled, until reset (Firecracker CVE-2026-5747: changing them under
  a running device; reliability.md C6).
- `SplitQueue` is the running queue the device uses: `pop`, `add_used`,
  `needs_notification`. It copies the addresses at activation.

A driver breaking a ring rule (avail.idx moving more than a queue size, a head
outside the table, a bad chain, rings outside RAM) breaks the queue: `pop`
returns None from then on and the `on_error` callback (the transport's
DEVICE_NEEDS_RESET latch) hears why, once. Nothing raises out of here
(reliability.md C5, QEMU's `virtio_error`).

Indices: avail.idx and used.idx are free-running u16 (Python ints do not wrap,
hence the explicit `& 0xffff`); ring slots are `idx & (size - 1)`.

Reads: avail.idx is read again only once the chains its last value covered
are popped (vhost's shadow avail_idx: what the driver made available stays
available until used), and their ring entries are read together, in one read
(two where they wrap). On a `BatchedRingMemory` (DMA by message: every access
a round trip) the queue also reads the descriptor table with the ring in one
access (`_read_heads`), puts fences where the spec orders a write before a
later access, and reuses an "empty" verdict until the frontend says anything
(`_empty_seen`); on any other memory nothing else changes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError, GuestMemoryError
from .chain import BatchedRingMemory, ChainError, DescriptorChain, RingMemory, read_chain
from .ring import (
    RING_HEADER,
    RING_HEADER_SIZE,
    U16,
    USED_ELEM,
    avail_entry_offset,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    used_entry_offset,
    used_event_offset,
    used_ring_size,
)
from .spec import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
)

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = (1 << 64) - 1
# BatchedRingMemory: descriptor tables up to this size are read whole (4096
# entries; Linux's virtio-blk uses 256); larger ones descriptor by descriptor.
MAX_TABLE_SNAPSHOT: Final = 64 * 1024
# ... in the same access as the available ring when at most this many bytes lie
# between them (Linux allocates the ring right after the table).
MAX_SNAPSHOT_GAP: Final = 4096


class QueueArea(enum.Enum):
    """The three guest areas of a split queue (§2.6: descriptor, driver, device)."""

    DESC = "desc"
    DRIVER = "driver"  # the available ring
    DEVICE = "device"  # the used ring


def is_valid_queue_size(size: int, max_size: int) -> bool:
    """§2.7: a power of two, at most the device's maximum (and at most 32768)."""
    return 0 < size <= min(max_size, VIRTQ_MAX_SIZE) and not size & (size - 1)


@dataclass(slots=True)
class QueueConfig:
    """One queue's common-config registers (queue_size .. queue_device)."""

    max_size: int
    size: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enabled: bool = False

    def __post_init__(self) -> None:
        if not is_valid_queue_size(self.max_size, VIRTQ_MAX_SIZE):
            raise ConfigError(f"queue max size {self.max_size} is not a power of two <= 32768")
        self.reset()

    def reset(self) -> None:
        """§4.1.4.3.2: queue_size reads the maximum after reset, everything else 0."""
        self.size = self.max_size
        self.desc = self.driver = self.device = 0
        self.msix_vector = VIRTIO_MSI_NO_VECTOR
        self.enabled = False

    def set_size(self, value: int) -> None:
        if not self.enabled:  # frozen while enabled (C6)
            self.size = value & _U16

    def address(self, area: QueueArea) -> int:
        match area:
            case QueueArea.DESC:
                return self.desc
            case QueueArea.DRIVER:
                return self.driver
            case QueueArea.DEVICE:
                return self.device

    def set_address(self, area: QueueArea, value: int, *, shift: int = 0, width: int = 64) -> None:
        """Write `width` bits of an area's address at bit `shift` (the lo/hi halves)."""
        if self.enabled:
            return  # frozen while enabled (C6)
        mask = ((1 << width) - 1) << shift
        new = (self.address(area) & ~mask | (value << shift) & mask) & _U64
        match area:
            case QueueArea.DESC:
                self.desc = new
            case QueueArea.DRIVER:
                self.driver = new
            case QueueArea.DEVICE:
                self.device = new

    def enable(self) -> bool:
        """queue_enable = 1: refused (stays 0) unless the size is valid."""
        if not self.enabled and is_valid_queue_size(self.size, self.max_size):
            self.enabled = True
        return self.enabled


class SplitQueue:
    """A running split virtqueue over guest memory (the device's side)."""

    __slots__ = (
        "_avail_event",
        "_batched",
        "_empty_epoch",
        "_heads",
        "_in_flight",
        "_known",
        "_memory",
        "_no_notify",
        "_on_error",
        "_signalled_used",
        "_table",
        "desc",
        "device",
        "driver",
        "error",
        "event_idx",
        "index",
        "indirect",
        "next_avail",
        "next_used",
        "size",
    )

    def __init__(
        self,
        index: int,
        config: QueueConfig,
        memory: RingMemory,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.index = index
        self.size = config.size
        self.desc = config.desc
        self.driver = config.driver
        self.device = config.device
        self.event_idx = event_idx
        self.indirect = indirect
        self._memory = memory
        self._on_error = on_error
        self.next_avail = 0
        self.next_used = 0
        self._signalled_used = 0
        self._in_flight: set[int] = set()
        self.error: str | None = None
        self._batched = memory if isinstance(memory, BatchedRingMemory) else None
        self._known = 0  # chains past next_avail that the last avail.idx read showed
        self._heads: list[int] = []  # ring entries read for them, last first
        self._table: bytes | None = None  # the descriptor table read with them (batched)
        self._avail_event: int | None = None  # what we last wrote there
        self._no_notify = False  # used.flags has VIRTQ_USED_F_NO_NOTIFY (set_notification)
        self._empty_epoch: int | None = None  # see _empty_seen
        self._check_layout()

    def _check_layout(self) -> None:
        if not is_valid_queue_size(self.size, VIRTQ_MAX_SIZE):
            self.fail(f"queue size {self.size} is not a power of two <= 32768")
            return
        extra = 0 if self.event_idx else 2  # the event fields exist only with EVENT_IDX
        for what, gpa, length in (
            ("descriptor table", self.desc, desc_table_size(self.size)),
            ("available ring", self.driver, avail_ring_size(self.size) - extra),
            ("used ring", self.device, used_ring_size(self.size) - extra),
        ):
            try:
                self._memory.check_ram(gpa, length)
            except GuestMemoryError as e:
                self.fail(f"{what}: {e}")
                return

    # -- state

    @property
    def broken(self) -> bool:
        return self.error is not None

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet returned with add_used."""
        return len(self._in_flight)

    def fail(self, reason: str) -> None:
        """Break the queue (first reason wins) and tell the transport."""
        if self.error is not None:
            return
        self.error = f"queue {self.index}: {reason}"
        if self._on_error is not None:
            self._on_error(self.error)

    # -- guest memory helpers (any failure breaks the queue)

    def _u16(self, gpa: int) -> int:
        (value,) = U16.unpack(self._memory.read(gpa, 2))
        return int(value)

    def _put_u16(self, gpa: int, value: int) -> None:
        self._memory.write(gpa, U16.pack(value & _U16))

    # -- the device's operations

    def available(self) -> int:
        """How many chains the driver has made available and we have not popped
        (0 when broken); breaks the queue if avail.idx is impossible. While
        chains from the last avail.idx read remain, that count, without a read."""
        if self.error is not None:
            return 0
        if self._known:
            return self._known
        if self._empty_seen():
            return 0
        batched = self._batched
        epoch = batched.epoch() if batched is not None else None
        try:
            if batched is not None:
                self._fence()  # what we published is visible before we look (§2.7.10)
            avail_idx = self._u16(self.driver + 2)
        except GuestMemoryError as e:
            self.fail(f"reading avail.idx: {e}")
            return 0
        return self._saw_avail_idx(avail_idx, epoch)

    def _saw_avail_idx(self, avail_idx: int, epoch: int | None) -> int:
        """Take a fresh avail.idx (read after every write we made); call with no
        chains known (`_known` 0)."""
        pending = (avail_idx - self.next_avail) & _U16
        if pending > self.size:
            # C5 (Firecracker's check): more than a queue's worth, or idx went back.
            self.fail(f"avail.idx {avail_idx} is {pending} ahead of {self.next_avail}")
            return 0
        self._known = pending
        self._heads = []
        self._table = None
        if pending == 0 and epoch is not None and self._kick_armed():
            self._empty_epoch = epoch
        return pending

    def _kick_armed(self) -> bool:
        """Whether the driver must kick when it makes entry next_avail available:
        avail_event says so (EVENT_IDX), or used.flags does not suppress kicks."""
        if self.event_idx:
            return self._avail_event == self.next_avail
        return not self._no_notify

    def _empty_seen(self) -> bool:
        """BatchedRingMemory only: the ring was found empty by a read made after
        the driver was asked to kick for the next entry, and nothing has come
        from the frontend since (the memory's epoch). A chain made available
        after that read comes with a kick, which moves the epoch and is served
        as a step of its own; so the ring is empty for us without another
        round trip."""
        epoch = self._empty_epoch
        if epoch is None or self._batched is None:
            return False
        if self._batched.epoch() == epoch and self._kick_armed():
            return True
        self._empty_epoch = None
        return False

    def _fence(self) -> None:
        """BatchedRingMemory: wait for the writes posted so far (GuestMemoryError
        if one failed)."""
        if self._batched is not None:
            self._batched.fence()

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None (ring empty, or queue broken)."""
        # Empty: ask the driver to kick for the next entry, then look once more if
        # that changed anything (§2.7.10): a chain made available in between
        # would otherwise wait for a kick that never comes.
        if not self.available() and not (self._publish_avail_event() and self.available()):
            return None
        try:
            if not self._heads:
                self._read_heads()
            head = self._heads.pop()
            if head in self._in_flight:
                raise ChainError(f"head {head} is made available again while in flight")
            chain = read_chain(
                self._memory, self.desc, self.size, head, indirect=self.indirect, table=self._table
            )
        except (ChainError, GuestMemoryError) as e:
            self.fail(str(e))
            return None
        self._known -= 1
        if not self._known:
            self._table = None  # valid for the chains that idx covered only
        self.next_avail = (self.next_avail + 1) & _U16
        self._in_flight.add(head)
        if self._batched is None or not self._known:
            # Batched: not while chains we know of remain (a write each, and the
            # driver need not kick for entries we will pop anyway); the pop that
            # finds the ring empty publishes and looks again.
            self._publish_avail_event()
        return chain

    def _read_heads(self) -> None:
        """The ring entries of the `_known` chains past next_avail, read after
        the avail.idx that covers them (ring.py on ordering)."""
        count = self._known
        first = self.next_avail & (self.size - 1)
        ring_at = self.driver + avail_entry_offset(0)
        table_len = desc_table_size(self.size)
        if self._batched is not None and table_len <= MAX_TABLE_SNAPSHOT:
            table, ring = self._read_snapshot(ring_at, table_len, 2 * self.size)
            self._table = table
            raw = (ring[2 * first :] + ring[: 2 * first])[: 2 * count]
        else:
            n = min(count, self.size - first)
            raw = _read_exact(self._memory, ring_at + 2 * first, 2 * n, "available ring")
            if count > n:  # the entries wrap to the ring's start
                raw += _read_exact(self._memory, ring_at, 2 * (count - n), "available ring")
        heads = [int(head) for (head,) in U16.iter_unpack(raw)]
        heads.reverse()
        self._heads = heads

    def _read_snapshot(self, ring_at: int, table_len: int, ring_len: int) -> tuple[bytes, bytes]:
        """The descriptor table and the available ring's entries, in one access
        when they lie close together, else two."""
        lo = min(self.desc, ring_at)
        hi = max(self.desc + table_len, ring_at + ring_len)
        if hi - lo <= table_len + ring_len + MAX_SNAPSHOT_GAP:
            try:
                self._memory.check_ram(lo, hi - lo)
                raw = _read_exact(self._memory, lo, hi - lo, "descriptor table and ring")
            except (ChainError, GuestMemoryError):
                pass  # a gap that is not RAM: read the two apart
            else:
                table = raw[self.desc - lo : self.desc - lo + table_len]
                return table, raw[ring_at - lo : ring_at - lo + ring_len]
        table = _read_exact(self._memory, self.desc, table_len, "descriptor table")
        return table, _read_exact(self._memory, ring_at, ring_len, "available ring")

    def add_used(self, head: int, length: int) -> bool:
        """Return `head` to the driver with `length` bytes written (clamped to u32).

        The element is written before used.idx (ring.py on ordering; on a
        BatchedRingMemory, with everything the device wrote before it, and
        used.idx is done when this returns). False, and nothing written, if the
        queue is broken or `head` is not in flight.
        """
        if self.error is not None or head not in self._in_flight:
            return False
        slot = self.next_used & (self.size - 1)
        new_used = (self.next_used + 1) & _U16
        try:
            elem = USED_ELEM.pack(head, max(0, min(length, _U32)))
            self._memory.write(self.device + used_entry_offset(slot), elem)
            self._fence()
            self._put_u16(self.device + 2, new_used)
            self._fence()
        except GuestMemoryError as e:
            self.fail(f"writing the used ring: {e}")
            return False
        self._in_flight.discard(head)
        self.next_used = new_used
        return True

    def complete(self, chain: DescriptorChain, written: int) -> bool:
        """add_used for a popped chain; `written` is capped at what the chain can hold
        (§2.7.8.1: used len never more than the device wrote)."""
        return self.add_used(chain.head, min(written, chain.writable_len))

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the
        last call (§2.7.7: used_event with EVENT_IDX, else avail.flags)."""
        if self.error is not None:
            return False
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        if old == new:
            return False
        try:
            if self._batched is not None and not self._known:
                # One access for the flags or used_event and a fresh avail.idx (read
                # after used.idx and avail_event are done: add_used fenced), which
                # the next pop would otherwise read on its own.
                epoch = self._batched.epoch()
                self._fence()
                length = avail_ring_size(self.size) if self.event_idx else RING_HEADER_SIZE
                area = _read_exact(self._memory, self.driver, length, "available ring")
                flags, avail_idx = RING_HEADER.unpack_from(area)
                if not self._saw_avail_idx(avail_idx, epoch) and self.error is not None:
                    return False
                if self.event_idx:
                    used_event = int(U16.unpack_from(area, used_event_offset(self.size))[0])
                    return ((new - used_event - 1) & _U16) < ((new - old) & _U16)
                return not int(flags) & VIRTQ_AVAIL_F_NO_INTERRUPT
            if self.event_idx:
                used_event = self._u16(self.driver + used_event_offset(self.size))
                # vring_need_event(): did new pass used_event since old?
                return ((new - used_event - 1) & _U16) < ((new - old) & _U16)
            return not self._u16(self.driver) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except (ChainError, GuestMemoryError) as e:
            self.fail(f"reading the available ring: {e}")
            return False

    def set_notification(self, enable: bool) -> None:
        """Ask the driver to kick (or not) for new buffers (§2.7.10). With EVENT_IDX
        the avail_event field does this and is kept up to date by pop."""
        if self.error is not None or self.event_idx:
            return
        self._no_notify = not enable
        self._empty_epoch = None  # an empty ring seen before this says nothing now
        try:
            self._put_u16(self.device, 0 if enable else VIRTQ_USED_F_NO_NOTIFY)
        except GuestMemoryError as e:
            self.fail(f"writing used.flags: {e}")

    def _publish_avail_event(self) -> bool:
        """EVENT_IDX: "kick me when you make entry next_avail available". True if
        it wrote (a value equal to the last one written is not written again)."""
        if self.error is not None or not self.event_idx or self._avail_event == self.next_avail:
            return False
        self._avail_event = self.next_avail
        try:
            self._put_u16(self.device + avail_event_offset(self.size), self.next_avail)
        except GuestMemoryError as e:
            self.fail(f"writing avail_event: {e}")
            return False
        return True


def _read_exact(memory: RingMemory, gpa: int, length: int, what: str) -> bytes:
    """`length` bytes at `gpa`; ChainError if the memory returns anything else."""
    data = memory.read(gpa, length)
    if len(data) != length:  # a GuestMemory must not do this; refuse rather than guess
        raise ChainError(f"{what}: read {len(data)} of {length} bytes")
    return data
