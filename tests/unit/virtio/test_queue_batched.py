"""SplitQueue on a BatchedRingMemory (devserver.virtio.chain): the rings read
whole, writes posted and fenced where the spec orders them, and the "empty"
verdict kept only until the frontend says anything (dma_messages.DeviceDma is
the real one; here a bytearray that logs every access)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from devserver.memory import BytearrayMemory
from devserver.virtio.chain import BatchedRingMemory, Reader
from devserver.virtio.queue import QueueArea, QueueConfig, SplitQueue
from devserver.virtio.ring import DESC, U16, avail_event_offset, used_event_offset
from devserver.virtio.spec import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

SIZE = 8
# The driver's layout Linux uses: the available ring right after the table.
DESC_GPA, AVAIL, USED = 0x1000, 0x1000 + 16 * SIZE, 0x3000


class Logged(BytearrayMemory):
    """Guest RAM whose writes are "posted" (applied at once, logged) and whose
    every access, fence and epoch read is logged, as ("r"|"w", gpa, length) or
    ("fence",)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.log: list[tuple[object, ...]] = []
        self.now = 0  # the epoch

    def read(self, gpa: int, length: int) -> bytes:
        self.log.append(("r", gpa, length))
        return super().read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        self.log.append(("w", gpa, len(data)))
        super().write(gpa, data)

    def fence(self) -> None:
        self.log.append(("fence",))

    def read_many(self, pieces: Sequence[tuple[int, int]]) -> list[bytes]:
        self.log.append(("many", *pieces))
        return [super(Logged, self).read(gpa, length) for gpa, length in pieces]

    def epoch(self) -> int:
        return self.now

    def accesses(self) -> list[tuple[object, ...]]:
        out, self.log = self.log, []
        return out


@pytest.fixture
def mem() -> Logged:
    return Logged(0x10000)


def make_queue(mem: Logged, *, event_idx: bool = True) -> SplitQueue:
    config = QueueConfig(SIZE)
    config.set_address(QueueArea.DESC, DESC_GPA)
    config.set_address(QueueArea.DRIVER, AVAIL)
    config.set_address(QueueArea.DEVICE, USED)
    assert config.enable()
    errors: list[str] = []
    q = SplitQueue(0, config, mem, event_idx=event_idx, on_error=errors.append)
    assert not errors
    mem.accesses()
    return q


def offer(mem: BytearrayMemory, slot: int, head: int, idx: int, addr: int = 0x8000) -> None:
    """A two-descriptor chain at `head`, `head + 1`: 8 readable, 8 writable bytes."""
    mem.write(DESC_GPA + 16 * head, DESC.pack(addr, 8, VIRTQ_DESC_F_NEXT, head + 1))
    mem.write(DESC_GPA + 16 * (head + 1), DESC.pack(addr + 8, 8, VIRTQ_DESC_F_WRITE, 0))
    mem.write(AVAIL + 4 + 2 * (slot % SIZE), U16.pack(head))
    mem.write(AVAIL + 2, U16.pack(idx & 0xFFFF))


def test_the_memory_is_recognised(mem: Logged) -> None:
    assert isinstance(mem, BatchedRingMemory)
    assert not isinstance(BytearrayMemory(16), BatchedRingMemory)


def test_one_read_brings_the_table_and_the_ring(mem: Logged) -> None:
    q = make_queue(mem)
    offer(mem, 0, 0, 1)
    offer(mem, 1, 2, 2)
    mem.accesses()
    first, second = q.pop(), q.pop()
    assert first is not None and second is not None
    assert (first.head, second.head) == (0, 2)
    assert first.readable == ((0x8000, 8),) and first.writable == ((0x8008, 8),)
    # fence + avail.idx, then table and ring as one access; avail_event once,
    # when no chain we know of is left.
    assert mem.accesses() == [
        ("fence",),
        ("r", AVAIL + 2, 2),
        ("r", DESC_GPA, 16 * SIZE + 4 + 2 * SIZE),
        ("w", USED + avail_event_offset(SIZE), 2),
    ]


def test_the_table_read_holds_only_for_the_chains_its_idx_covered(mem: Logged) -> None:
    q = make_queue(mem)
    offer(mem, 0, 0, 1)
    assert q.pop() is not None
    # The driver reuses descriptor 2 for a new chain after we read the table:
    offer(mem, 1, 2, 2, addr=0x9000)
    chain = q.pop()
    assert chain is not None and chain.readable == ((0x9000, 8),)  # read again, not stale


def test_used_idx_waits_for_the_element_and_is_done_before_used_event(mem: Logged) -> None:
    q = make_queue(mem)
    offer(mem, 0, 0, 1)
    chain = q.pop()
    assert chain is not None
    mem.accesses()
    assert q.complete(chain, 8)
    assert q.needs_notification()  # used_event 0: passed
    log = mem.accesses()
    assert log[:4] == [("w", USED + 4, 8), ("fence",), ("w", USED + 2, 2), ("fence",)]
    # Then the whole available ring after another fence: used_event and avail.idx.
    assert log[4:] == [("fence",), ("r", AVAIL, 4 + 2 * SIZE + 2)]


def test_an_empty_ring_seen_after_publishing_stays_empty_until_the_epoch_moves(
    mem: Logged,
) -> None:
    q = make_queue(mem)
    offer(mem, 0, 0, 1)
    chain = q.pop()
    assert chain is not None and q.complete(chain, 0)
    q.needs_notification()  # read avail.idx (1: nothing new) after avail_event = 1
    mem.accesses()
    assert q.pop() is None and q.available() == 0
    assert mem.accesses() == []  # no round trip: the driver must kick for entry 1
    offer(mem, 1, 2, 2)
    assert q.available() == 0  # made available, but no kick has arrived yet
    mem.now += 1  # the kick (any request from the frontend)
    chain = q.pop()
    assert chain is not None and chain.head == 2


def test_the_verdict_needs_the_driver_to_have_been_asked_to_kick(mem: Logged) -> None:
    q = make_queue(mem)
    # First look: avail_event was never written, so an empty ring proves nothing.
    assert q.pop() is None
    assert mem.accesses() == [
        ("fence",),
        ("r", AVAIL + 2, 2),
        ("w", USED + avail_event_offset(SIZE), 2),
        ("fence",),  # §2.7.10: look again after publishing
        ("r", AVAIL + 2, 2),
    ]
    assert q.available() == 0 and mem.accesses() == []  # now it does


def test_without_event_idx_suppressed_kicks_void_the_verdict(mem: Logged) -> None:
    q = make_queue(mem, event_idx=False)
    assert q.pop() is None
    assert q.available() == 0 and not [a for a in mem.accesses() if a[0] == "r"][1:]
    q.set_notification(False)
    mem.accesses()
    assert q.available() == 0
    assert ("r", AVAIL + 2, 2) in mem.accesses()  # read: the driver may not kick now


def test_avail_idx_checks_still_apply_to_the_combined_read(mem: Logged) -> None:
    q = make_queue(mem)
    offer(mem, 0, 0, 1)
    chain = q.pop()
    assert chain is not None and q.complete(chain, 0)
    mem.write(AVAIL + 2, U16.pack(1 + SIZE + 1))  # more than a queue's worth
    assert not q.needs_notification()
    assert q.broken and "ahead" in (q.error or "")


def test_used_event_from_the_combined_read(mem: Logged) -> None:
    q = make_queue(mem)
    mem.write(AVAIL + used_event_offset(SIZE), U16.pack(1))  # interrupt once used passes 1
    for slot in range(2):
        offer(mem, slot, 2 * slot, slot + 1)
    chains = [q.pop(), q.pop()]
    assert all(chains)
    assert q.add_used(0, 0) and not q.needs_notification()
    assert q.add_used(2, 0) and q.needs_notification()


def test_a_scattered_buffer_is_read_in_one_go(mem: Logged) -> None:
    mem.write(0x8000, b"abc")
    mem.write(0x9000, b"defg")
    mem.accesses()
    reader = Reader(mem, ((0x8000, 3), (0x9000, 4)))
    assert reader.read(6) == b"abcdef"
    assert mem.accesses() == [("many", (0x8000, 3), (0x9000, 3))]
    assert reader.read(10) == b"g"  # one piece: a plain read
    assert mem.accesses() == [("r", 0x9003, 1)]
