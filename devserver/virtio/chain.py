"""Descriptor chains (virtio 1.2 §2.7.5 The Virtqueue Descriptor Table,
§2.7.5.3 Indirect Descriptors, §2.7.4 Message Framing).

A chain is walked once, when it is popped, into device-readable and
device-writable (gpa, length) segments (crosvm's descriptor_chain.rs);
`Reader`/`Writer` then copy bytes through guest memory. Nothing is validated
ahead of that walk (rust-vmm's rule: validation at the time of use avoids a
check-then-use gap), and an indirect table is copied out of guest memory once,
so a guest rewriting it mid-walk changes nothing we act on.

Every rule the walk enforces is a driver MUST from the spec, and breaking one
raises `ChainError`; the queue turns that into DEVICE_NEEDS_RESET (reliability.md
C1-C4):
- at most queue-size descriptors per table (a TTL, so a `next` loop ends);
- `next` inside the table it indexes;
- INDIRECT only with VIRTIO_F_RING_INDIRECT_DESC, not inside an indirect table,
  not with NEXT; a table length that is a non-zero multiple of 16 and holds at
  most queue-size entries;
- every device-readable descriptor before every device-writable one;
- at most 2^32 bytes in all;
- every buffer wholly inside guest RAM (GuestMemory's bounds checks; an address
  plus length wrapping past 2^64 is outside RAM too).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from ..errors import DevserverError, GuestMemoryError
from ..memory import MAX_ACCESS, GuestMemory
from .ring import DESC, DESC_SIZE
from .spec import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

# §2.7.5.1: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total".
MAX_CHAIN_BYTES: Final = 1 << 32
# The most one Reader.read or Writer.write call moves: a guest's lengths decide
# how much a chain holds, never how much the server allocates at once.
MAX_COPY: Final = MAX_ACCESS

_NEXT: Final = int(VIRTQ_DESC_F_NEXT)
_WRITE: Final = int(VIRTQ_DESC_F_WRITE)
_INDIRECT: Final = int(VIRTQ_DESC_F_INDIRECT)

Segment = tuple[int, int]
"""A guest buffer: (guest-physical address, length in bytes)."""


class RingMemory(GuestMemory, Protocol):
    """Guest memory a virtqueue can use: GuestMemory plus a bounds check with no
    size cap (devserver.memory.RegionMemory and its subclasses provide it)."""

    def check_ram(self, gpa: int, length: int) -> None: ...


@runtime_checkable
class BatchedRingMemory(RingMemory, Protocol):
    """A RingMemory whose every access is a round trip to another process (DMA
    by message, devserver.service.dma_messages). Optional: SplitQueue checks
    for it once, and without it (SHARED) none of the below happens.

    With it the queue reads the descriptor table and the available ring whole,
    in one access, right after an avail.idx read (what that idx covers, the
    driver leaves alone until it is used), and `write` may return before it is
    done: writes are posted, and the queue puts a `fence` wherever the spec
    orders a write before a later access (the used element before used.idx,
    used.idx before reading used_event, avail_event before re-reading
    avail.idx). A read still sees every earlier write to the bytes it covers.
    """

    def fence(self) -> None:
        """Return once every write made so far is done; GuestMemoryError (the
        first failure's) if one failed."""

    def read_many(self, pieces: Sequence[Segment]) -> list[bytes]:
        """The bytes at each (gpa, length), as `read` would return them, the
        requests in flight together (a scattered buffer's segments)."""

    def epoch(self) -> int:
        """A number that changes whenever a driver notification may have arrived
        since it was last read (every request the frontend sends moves it): a
        ring found empty at epoch E, after avail_event was published, stays
        empty for the device until the epoch moves (the driver must kick). A
        kick that reached the device any other way (an ioeventfd) would have
        to move it too."""


class ChainError(DevserverError):
    """The guest broke a split-ring rule; the device must be reset (DEVICE_NEEDS_RESET)."""


@dataclass(frozen=True, slots=True)
class DescriptorChain:
    """A popped chain: its head index and its buffers, in order."""

    head: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]
    readable_len: int
    writable_len: int


def read_chain(
    memory: RingMemory,
    desc_table: int,
    queue_size: int,
    head: int,
    *,
    indirect: bool,
    table: bytes | None = None,
) -> DescriptorChain:
    """Walk the chain starting at `head`; ChainError if it breaks a rule.

    `table`, if given, is a copy of the whole descriptor table read after the
    avail.idx that made this chain available (the queue's BatchedRingMemory
    path): its descriptors come from there instead of one read each."""
    if not 0 <= head < queue_size:
        raise ChainError(f"head {head} is outside the {queue_size}-entry descriptor table")
    if table is not None and len(table) != DESC_SIZE * queue_size:
        table = None  # not a whole table: read descriptor by descriptor
    readable: list[Segment] = []
    writable: list[Segment] = []
    readable_len = writable_len = 0
    indirect_table: bytes | None = None  # the copied indirect table once we are in one
    limit = queue_size  # entries in the table being walked
    ttl = queue_size
    index = head
    while True:
        if ttl == 0:
            where = "indirect table" if indirect_table is not None else "queue"
            raise ChainError(f"chain from head {head} is longer than its {where} (a loop?)")
        ttl -= 1
        if indirect_table is not None:
            addr, length, flags, nxt = DESC.unpack_from(indirect_table, DESC_SIZE * index)
        elif table is not None:  # index < queue_size: checked above or by `next`
            addr, length, flags, nxt = DESC.unpack_from(table, DESC_SIZE * index)
        else:
            raw = _read(memory, desc_table + DESC_SIZE * index, DESC_SIZE, "descriptor")
            addr, length, flags, nxt = DESC.unpack(raw)

        if flags & _INDIRECT:
            if indirect_table is not None:
                raise ChainError("indirect descriptor inside an indirect table (§2.7.5.3.1)")
            if not indirect:
                raise ChainError("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")
            if flags & _NEXT:
                raise ChainError("indirect descriptor with NEXT set (§2.7.5.3.1)")
            if length == 0 or length % DESC_SIZE:
                raise ChainError(f"indirect table length {length} is not a multiple of 16")
            entries = length // DESC_SIZE
            if entries > queue_size:
                raise ChainError(f"indirect table of {entries} entries > queue size {queue_size}")
            # Copied once (at most 16 * 32768 = 512 KiB, under MAX_ACCESS).
            indirect_table = _read(memory, addr, length, "indirect table")
            limit = ttl = entries
            index = 0
            continue  # the device ignores WRITE on the table's own descriptor

        if flags & _WRITE:
            writable_len += length
            if length:
                writable.append((addr, length))
        else:
            if writable_len or writable:
                raise ChainError("device-readable descriptor after a device-writable one")
            readable_len += length
            if length:
                readable.append((addr, length))
        if readable_len + writable_len > MAX_CHAIN_BYTES:
            raise ChainError(f"chain from head {head} holds more than 2^32 bytes")
        if length:
            try:
                memory.check_ram(addr, length)
            except GuestMemoryError as e:
                raise ChainError(f"descriptor buffer: {e}") from None

        if not flags & _NEXT:
            break
        if nxt >= limit:
            raise ChainError(f"next {nxt} is outside the {limit}-entry table")
        index = nxt
    return DescriptorChain(head, tuple(readable), tuple(writable), readable_len, writable_len)


def _read(memory: GuestMemory, gpa: int, length: int, what: str) -> bytes:
    try:
        data = memory.read(gpa, length)
    except GuestMemoryError as e:
        raise ChainError(f"{what}: {e}") from None
    if len(data) != length:  # a GuestMemory must not do this; refuse rather than guess
        raise ChainError(f"{what}: read {len(data)} of {length} bytes")
    return data


class _Cursor:
    """A position in a list of segments."""

    __slots__ = ("_index", "_memory", "_offset", "_segments", "done", "remaining")

    def __init__(self, memory: GuestMemory, segments: Sequence[Segment]) -> None:
        self._memory = memory
        self._segments = segments
        self._index = 0
        self._offset = 0
        self.remaining = sum(length for _, length in segments)
        self.done = 0

    def _pieces(self, n: int) -> list[Segment]:
        """The next (gpa, length) pieces covering n bytes (n <= remaining); advances."""
        pieces: list[Segment] = []
        while n:
            gpa, length = self._segments[self._index]
            take = min(n, length - self._offset)
            pieces.append((gpa + self._offset, take))
            n -= take
            self._offset += take
            self.remaining -= take
            self.done += take
            if self._offset == length:
                self._index += 1
                self._offset = 0
        return pieces


class Reader(_Cursor):
    """Copies the device-readable bytes of a chain out of guest memory."""

    __slots__ = ()

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (fewer at the end of the chain, at most MAX_COPY)."""
        n = max(0, min(n, self.remaining, MAX_COPY))
        pieces = self._pieces(n)
        memory = self._memory
        try:
            if len(pieces) > 1 and isinstance(memory, BatchedRingMemory):
                return b"".join(memory.read_many(pieces))  # in flight together
            return b"".join(memory.read(gpa, take) for gpa, take in pieces)
        except GuestMemoryError as e:
            raise ChainError(f"reading a chain: {e}") from None

    def read_all(self) -> bytes:
        """The rest of the readable bytes, at most MAX_COPY of them."""
        return self.read(self.remaining)

    def skip(self, n: int) -> int:
        """Skip up to `n` bytes without copying them; returns how many."""
        n = max(0, min(n, self.remaining))
        self._pieces(n)
        return n


class Writer(_Cursor):
    """Copies bytes into the device-writable buffers of a chain, and only those
    (§2.7.5.2: "A device MUST NOT write to a device-readable buffer")."""

    __slots__ = ()

    def write(self, data: bytes) -> int:
        """Write as much of `data` as fits (at most MAX_COPY); returns how many bytes."""
        n = min(len(data), self.remaining, MAX_COPY)
        at = 0
        try:
            for gpa, take in self._pieces(n):
                self._memory.write(gpa, data[at : at + take])
                at += take
        except GuestMemoryError as e:
            raise ChainError(f"writing a chain: {e}") from None
        return n

    @property
    def written(self) -> int:
        return self.done


def reader(memory: GuestMemory, chain: DescriptorChain) -> Reader:
    return Reader(memory, chain.readable)


def writer(memory: GuestMemory, chain: DescriptorChain) -> Writer:
    return Writer(memory, chain.writable)


def skip_bytes(segments: Sequence[Segment], skip: int) -> Iterator[Segment]:
    """`segments` without their first `skip` bytes (a request's payload after
    its header, whatever descriptors the header straddles)."""
    for gpa, length in segments:
        if skip >= length:
            skip -= length
            continue
        yield gpa + skip, length - skip
        skip = 0
