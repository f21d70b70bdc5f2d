"""Split queues: index arithmetic, ring abuse (reliability.md C5), used-ring
ordering, notification suppression (§2.7.7, §2.7.10), frozen configuration (C6)."""

from __future__ import annotations

import pytest

from devserver.memory import BytearrayMemory
from devserver.virtio.queue import QueueArea, QueueConfig, SplitQueue
from devserver.virtio.ring import DESC, U16, USED_ELEM, avail_event_offset, used_event_offset
from devserver.virtio.spec import VIRTIO_MSI_NO_VECTOR, VIRTQ_AVAIL_F_NO_INTERRUPT

SIZE = 8
DESC_GPA, AVAIL, USED = 0x1000, 0x2000, 0x3000


class Recording(BytearrayMemory):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.writes: list[int] = []

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append(gpa)
        super().write(gpa, data)


@pytest.fixture
def mem() -> Recording:
    return Recording(0x10000)


def make_queue(
    mem: BytearrayMemory, *, event_idx: bool = False, size: int = SIZE
) -> tuple[SplitQueue, list[str]]:
    errors: list[str] = []
    config = QueueConfig(size)
    config.set_address(QueueArea.DESC, DESC_GPA)
    config.set_address(QueueArea.DRIVER, AVAIL)
    config.set_address(QueueArea.DEVICE, USED)
    assert config.enable()
    return SplitQueue(0, config, mem, event_idx=event_idx, on_error=errors.append), errors


def offer(mem: BytearrayMemory, slot: int, head: int, idx: int) -> None:
    mem.write(DESC_GPA + 16 * head, DESC.pack(0x8000, 8, 0, 0))
    mem.write(AVAIL + 4 + 2 * (slot % SIZE), U16.pack(head))
    mem.write(AVAIL + 2, U16.pack(idx & 0xFFFF))


def used_idx(mem: BytearrayMemory) -> int:
    return int(U16.unpack(mem.read(USED + 2, 2))[0])


def test_pop_and_add_used(mem: Recording) -> None:
    q, errors = make_queue(mem)
    assert q.pop() is None
    offer(mem, 0, 5, 1)
    chain = q.pop()
    assert chain is not None and chain.head == 5 and q.in_flight == 1
    assert q.pop() is None
    mem.writes.clear()
    assert q.add_used(5, 3)
    # §2.7.8 / ring.py: the element is written before the index that publishes it.
    assert mem.writes == [USED + 4, USED + 2]
    assert USED_ELEM.unpack(mem.read(USED + 4, 8)) == (5, 3) and used_idx(mem) == 1
    assert not q.add_used(5, 3)  # not in flight any more: nothing written
    assert used_idx(mem) == 1 and not errors


def test_indices_wrap_at_16_bits(mem: Recording) -> None:
    q, errors = make_queue(mem)
    q.next_avail = q.next_used = 0xFFFE
    for n, idx in enumerate((0xFFFF, 0x0000, 0x0001)):
        offer(mem, 0xFFFE + n, n, idx)
        chain = q.pop()
        assert chain is not None and chain.head == n
        assert q.add_used(n, 0)
    assert q.next_avail == 1 and used_idx(mem) == 1 and not errors


@pytest.mark.parametrize("idx", [SIZE + 1, 0xFFFF, 0x8000])
def test_avail_idx_jumping_or_going_back_breaks_the_queue(mem: Recording, idx: int) -> None:
    q, errors = make_queue(mem)
    mem.write(AVAIL + 2, U16.pack(idx))
    assert q.pop() is None and q.broken and len(errors) == 1
    offer(mem, 0, 0, 1)  # even a now-valid ring stays dead until reset
    assert q.pop() is None and len(errors) == 1


def test_exactly_a_queue_full_is_fine(mem: Recording) -> None:
    q, errors = make_queue(mem)
    for slot in range(SIZE):
        offer(mem, slot, slot, slot + 1)
    assert q.available() == SIZE and all(q.pop() is not None for _ in range(SIZE))
    assert not errors


def test_head_outside_the_table_breaks_the_queue(mem: Recording) -> None:
    q, errors = make_queue(mem)
    mem.write(AVAIL + 4, U16.pack(SIZE))
    mem.write(AVAIL + 2, U16.pack(1))
    assert q.pop() is None and q.broken and "head" in errors[0]


def test_a_head_made_available_twice_while_in_flight_breaks_the_queue(mem: Recording) -> None:
    q, errors = make_queue(mem)
    offer(mem, 0, 2, 1)
    offer(mem, 1, 2, 2)
    assert q.pop() is not None
    assert q.pop() is None and "in flight" in errors[0]


def test_a_bad_chain_breaks_the_queue(mem: Recording) -> None:
    q, errors = make_queue(mem)
    offer(mem, 0, 0, 1)
    mem.write(DESC_GPA, DESC.pack(0x8000, 8, 1, 0))  # NEXT to itself
    assert q.pop() is None and "longer" in errors[0]
    assert not q.add_used(0, 0) and not q.needs_notification()


def test_rings_outside_ram_break_the_queue_at_activation() -> None:
    mem = BytearrayMemory(0x3000 + 4 + 8 * SIZE - 1)  # the used ring is one byte short
    q, errors = make_queue(mem)
    assert q.broken and "used ring" in errors[0]


def test_notification_without_event_idx(mem: Recording) -> None:
    q, _ = make_queue(mem)
    assert not q.needs_notification()  # nothing used yet
    offer(mem, 0, 0, 1)
    chain = q.pop()
    assert chain is not None and q.add_used(0, 0)
    assert q.needs_notification() and not q.needs_notification()
    mem.write(AVAIL, U16.pack(VIRTQ_AVAIL_F_NO_INTERRUPT))
    offer(mem, 1, 1, 2)
    assert q.pop() is not None and q.add_used(1, 0)
    assert not q.needs_notification()


def test_notification_with_event_idx(mem: Recording) -> None:
    q, _ = make_queue(mem, event_idx=True)
    mem.write(AVAIL + used_event_offset(SIZE), U16.pack(1))  # interrupt after used idx passes 1
    for n in range(3):
        offer(mem, n, n, n + 1)
    heads = []
    for _ in range(3):
        chain = q.pop()
        assert chain is not None
        heads.append(chain.head)
    # pop keeps avail_event at next_avail, so the driver kicks for the next buffer.
    assert U16.unpack(mem.read(USED + avail_event_offset(SIZE), 2))[0] == 3
    assert q.add_used(heads[0], 0) and not q.needs_notification()  # used idx 1: not past 1
    assert q.add_used(heads[1], 0) and q.needs_notification()  # used idx 2 passes 1
    assert q.add_used(heads[2], 0) and not q.needs_notification()


def test_used_len_never_exceeds_the_writable_bytes(mem: Recording) -> None:
    q, _ = make_queue(mem)
    mem.write(DESC_GPA, DESC.pack(0x8000, 8, 2, 0))  # 8 writable bytes
    mem.write(AVAIL + 4, U16.pack(0))
    mem.write(AVAIL + 2, U16.pack(1))
    chain = q.pop()
    assert chain is not None and q.complete(chain, 1 << 40)
    assert USED_ELEM.unpack(mem.read(USED + 4, 8)) == (0, 8)


def test_queue_config_is_frozen_once_enabled() -> None:
    config = QueueConfig(16)
    assert config.size == 16 and config.msix_vector == VIRTIO_MSI_NO_VECTOR
    config.set_size(8)
    config.set_address(QueueArea.DESC, 0x1234, shift=0, width=32)
    config.set_address(QueueArea.DESC, 0x1, shift=32, width=32)
    assert config.enable()
    config.set_size(4)
    config.set_address(QueueArea.DESC, 0, shift=0, width=32)
    assert (config.size, config.desc) == (8, 0x1_0000_1234)
    config.reset()
    assert (config.size, config.desc, config.enabled) == (16, 0, False)


@pytest.mark.parametrize("size", [0, 3, 32, 0xFFFF])
def test_an_invalid_size_cannot_be_enabled(size: int) -> None:
    config = QueueConfig(16)
    config.set_size(size)
    assert not config.enable() and not config.enabled
