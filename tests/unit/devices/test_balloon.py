"""virtio-balloon driven like a guest (virtio 1.2 §5.5; reliability.md: PFN
arrays bounded per chain, PFNs outside RAM ignored and counted, nothing sized
by a guest-chosen length, every head returned)."""

from __future__ import annotations

import struct

import pytest

from devserver.devices.balloon import (
    CONFIG,
    DEFLATEQ,
    INFLATEQ,
    MAX_PFNS,
    MAX_STATS,
    PAGE_SIZE,
    STAT,
    STATSQ,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_STATS_VQ,
    DiscardableMemory,
    VirtioBalloon,
    runs,
)
from devserver.effects import MsiRaised
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET, VirtioPciFunction
from devserver.virtio.spec import DeviceStatus, VirtioDeviceId, feature_bit
from tests.unit.virtio.driver import RAM_SIZE, FakeVirtioDriver


class DiscardingMemory(BytearrayMemory):
    """Guest RAM that records discards (shared RAM's MADV_REMOVE) and read sizes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.discards: list[tuple[int, int]] = []
        self.reads: list[int] = []

    def read(self, gpa: int, length: int) -> bytes:
        self.reads.append(length)
        return super().read(gpa, length)

    def discard(self, gpa: int, length: int) -> bool:
        self.check_ram(gpa, length)
        self.discards.append((gpa, length))
        return True


class Balloon:
    def __init__(self, memory: BytearrayMemory | None = None) -> None:
        self.dev = VirtioBalloon()
        self.mem = memory if memory is not None else DiscardingMemory(RAM_SIZE)
        self.fn = VirtioPciFunction(self.dev, presentation=Presentation(), memory=self.mem)
        self.fn.device_id = 5
        self.drv = FakeVirtioDriver(self.fn, self.mem)
        self.drv.start(3)

    def pfns(self, q: int, pfns: list[int], *, extra: bytes = b"") -> int:
        data = b"".join(struct.pack("<I", p) for p in pfns) + extra
        gpa = self.drv.alloc(max(len(data), 1))
        self.drv.put(gpa, data)
        head = self.drv.add_chain(q, [(gpa, len(data), False)])
        self.drv.publish(q, head)
        self.drv.kick(q)
        return head

    def post_stats(self, stats: list[tuple[int, int]], *, length: int | None = None) -> int:
        data = b"".join(STAT.pack(tag, value) for tag, value in stats)
        size = len(data) if length is None else length
        gpa = self.drv.alloc(max(size, 1))
        self.drv.put(gpa, data)
        head = self.drv.add_chain(STATSQ, [(gpa, size, False)])
        self.drv.publish(STATSQ, head)
        self.drv.kick(STATSQ)
        return head

    def config(self) -> tuple[int, int]:
        raw = bytes(self.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(CONFIG.size))
        num_pages, actual = CONFIG.unpack(raw)
        return int(num_pages), int(actual)


def test_identity_features_and_queues() -> None:
    b = Balloon()
    assert b.dev.device_type == VirtioDeviceId.BALLOON and int(b.dev.device_type) == 5
    assert b.dev.avail_features & feature_bit(VIRTIO_BALLOON_F_STATS_VQ)
    assert b.dev.avail_features & feature_bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    assert not b.dev.avail_features & feature_bit(VIRTIO_BALLOON_F_MUST_TELL_HOST)
    assert len(b.dev.queue_max_sizes) == 3
    assert b.drv.status & DeviceStatus.DRIVER_OK
    assert b.config() == (0, 0)


def test_target_is_a_config_change_with_an_interrupt() -> None:
    b = Balloon()
    b.dev.set_target(16384)
    b.fn.config_changed()
    effects = b.drv.take()
    assert any(isinstance(e, MsiRaised) and e.vector == 0 for e in effects)  # config vector
    assert b.config() == (16384, 0)
    with pytest.raises(ValueError, match="not 0"):
        b.dev.set_target(1 << 32)
    with pytest.raises(ValueError, match="not 0"):
        b.dev.set_target(-1)


def test_actual_is_the_drivers_and_only_actual_is_writable() -> None:
    b = Balloon()
    b.drv.write(DEVICE_CFG_OFFSET + 4, 4, 1234)
    assert b.config() == (0, 1234)
    b.drv.write(DEVICE_CFG_OFFSET, 4, 0xFFFF)  # num_pages is the host's
    assert b.config() == (0, 1234)
    b.drv.write(DEVICE_CFG_OFFSET + 6, 2, 1)  # the high half of actual alone
    assert b.config() == (0, 0x1_04D2)
    b.drv.write(DEVICE_CFG_OFFSET + 2, 4, 0xAABBCCDD)  # straddles num_pages and actual
    assert b.config() == (0, 0x1_AABB)
    b.drv.write(DEVICE_CFG_OFFSET + 64, 4, 7)  # past the structure: ignored
    assert b.config() == (0, 0x1_AABB)


def test_inflate_discards_the_pages_in_runs_and_returns_the_head() -> None:
    mem = DiscardingMemory(RAM_SIZE)
    b = Balloon(mem)
    head = b.pfns(INFLATEQ, [0x80, 0x81, 0x82, 0x90])
    assert b.drv.used(INFLATEQ) == [(head, 0)]
    assert mem.discards == [(0x80 * PAGE_SIZE, 3 * PAGE_SIZE), (0x90 * PAGE_SIZE, PAGE_SIZE)]
    assert (b.dev.inflated, b.dev.discarded, b.dev.pfns_outside_ram) == (4, 4, 0)
    assert any(isinstance(e, MsiRaised) for e in b.drv.take())


def test_deflate_frees_nothing() -> None:
    mem = DiscardingMemory(RAM_SIZE)
    b = Balloon(mem)
    head = b.pfns(DEFLATEQ, [0x80, 0x81])
    assert b.drv.used(DEFLATEQ) == [(head, 0)]
    assert mem.discards == []
    assert b.dev.deflated == 2


def test_memory_without_discard_only_counts() -> None:
    mem = BytearrayMemory(RAM_SIZE)
    assert not isinstance(mem, DiscardableMemory)
    b = Balloon(mem)
    head = b.pfns(INFLATEQ, [0x80])
    assert b.drv.used(INFLATEQ) == [(head, 0)]
    assert (b.dev.inflated, b.dev.discarded) == (1, 0)


@pytest.mark.parametrize(
    "pfn",
    [
        RAM_SIZE // PAGE_SIZE,  # the first page past RAM
        0xFFFF_FFFF,  # the top PFN a le32 holds
        (RAM_SIZE // PAGE_SIZE) + 0x1000,
    ],
)
def test_pfns_outside_ram_are_ignored_and_counted(pfn: int) -> None:
    mem = DiscardingMemory(RAM_SIZE)
    b = Balloon(mem)
    head = b.pfns(INFLATEQ, [pfn, 0x80])
    assert b.drv.used(INFLATEQ) == [(head, 0)]
    assert mem.discards == [(0x80 * PAGE_SIZE, PAGE_SIZE)]
    assert b.dev.pfns_outside_ram == 1
    assert not b.drv.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_a_chain_longer_than_max_pfns_reads_only_max_pfns() -> None:
    mem = DiscardingMemory(RAM_SIZE)
    b = Balloon(mem)
    count = MAX_PFNS + 100
    head = b.pfns(INFLATEQ, [0x10 + i % 200 for i in range(count)])  # all in RAM
    assert b.drv.used(INFLATEQ) == [(head, 0)]
    assert b.dev.inflated == MAX_PFNS
    assert b.dev.pfns_ignored == 100
    assert max(mem.reads) <= max(MAX_PFNS * 4, 16)  # never the guest's length


def test_a_huge_claimed_length_allocates_nothing_of_it() -> None:
    """A descriptor claiming ~1 MiB (all of RAM) of PFNs: one bounded read."""
    mem = DiscardingMemory(RAM_SIZE)
    b = Balloon(mem)
    head = b.drv.add_chain(INFLATEQ, [(0, RAM_SIZE, False)])
    b.drv.publish(INFLATEQ, head)
    b.drv.kick(INFLATEQ)
    assert b.drv.used(INFLATEQ) == [(head, 0)]
    assert max(mem.reads) <= max(MAX_PFNS * 4, 16)
    assert b.dev.pfns_ignored == RAM_SIZE // 4 - MAX_PFNS


@pytest.mark.parametrize("tail", [b"\x01", b"\x01\x02\x03"])
def test_a_partial_pfn_is_ignored(tail: bytes) -> None:
    b = Balloon()
    head = b.pfns(INFLATEQ, [0x80], extra=tail)
    assert b.drv.used(INFLATEQ) == [(head, 0)]
    assert (b.dev.inflated, b.dev.pfns_ignored) == (1, 1)


def test_an_empty_or_write_only_chain_is_returned() -> None:
    b = Balloon()
    gpa = b.drv.alloc(64)
    head = b.drv.add_chain(INFLATEQ, [(gpa, 64, True)])
    b.drv.publish(INFLATEQ, head)
    b.drv.kick(INFLATEQ)
    head2 = b.pfns(INFLATEQ, [])
    assert b.drv.used(INFLATEQ) == [(head, 0), (head2, 0)]
    assert b.dev.inflated == 0


def test_a_chain_out_of_ram_latches_needs_reset_not_a_crash() -> None:
    b = Balloon()
    head = b.drv.add_chain(INFLATEQ, [(RAM_SIZE - 8, 64, False)])  # runs off RAM
    b.drv.publish(INFLATEQ, head)
    b.drv.kick(INFLATEQ)
    assert b.drv.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert b.dev.inflated == 0


def test_many_chains_are_bounded_per_kick() -> None:
    b = Balloon()
    heads = []
    for i in range(100):
        data = struct.pack("<I", 0x80 + i)
        gpa = b.drv.alloc(4)
        b.drv.put(gpa, data)
        head = b.drv.add_chain(INFLATEQ, [(gpa, 4, False)])
        b.drv.publish(INFLATEQ, head)
        heads.append(head)
    b.drv.kick(INFLATEQ)
    first = b.drv.used(INFLATEQ)
    assert 0 < len(first) < 100 and INFLATEQ in b.fn.pending_work
    b.fn.run_pending()
    assert len(first) + len(b.drv.used(INFLATEQ)) == 100
    assert b.dev.inflated == 100


def test_stats_are_kept_and_the_buffer_held_until_asked_for() -> None:
    b = Balloon()
    head = b.post_stats([(4, 1 << 20), (5, 1 << 30), (99, 7)])
    assert b.drv.used(STATSQ) == []  # held (§5.5.6.3)
    assert b.dev.named_stats() == {
        "free-memory": 1 << 20,
        "total-memory": 1 << 30,
        "tag-99": 7,
    }
    b.drv.take()
    assert b.dev.request_stats()
    assert b.drv.used(STATSQ) == [(head, 0)]
    assert any(isinstance(e, MsiRaised) for e in b.drv.take())
    assert not b.dev.request_stats()  # nothing held until the driver posts again
    b.post_stats([(4, 5)])
    assert b.dev.stats[4] == 5


def test_a_second_stats_buffer_returns_the_first() -> None:
    b = Balloon()
    first = b.post_stats([(4, 1)])
    b.post_stats([(4, 2)])
    assert b.drv.used(STATSQ) == [(first, 0)]
    assert b.dev.stats[4] == 2


def test_a_huge_stats_buffer_reads_at_most_max_stats() -> None:
    mem = DiscardingMemory(RAM_SIZE)
    b = Balloon(mem)
    b.post_stats([(4, 1)], length=RAM_SIZE // 2)
    assert max(mem.reads) <= max(MAX_STATS * STAT.size, 16)
    assert b.dev.stats[4] == 1


def test_reset_forgets_actual_and_the_held_stats_buffer() -> None:
    b = Balloon()
    b.post_stats([(4, 1)])
    b.drv.write(DEVICE_CFG_OFFSET + 4, 4, 99)
    b.drv.set_status(0)
    assert b.dev.actual_pages == 0
    assert not b.dev.request_stats()


def test_runs() -> None:
    assert runs([]) == []
    assert runs([5, 6, 7, 9, 8]) == [(5, 3), (9, 1), (8, 1)]


def test_a_stats_buffer_posted_before_driver_ok_is_found_on_request() -> None:
    """Linux primes statsq in probe, before DRIVER_OK (that kick is dropped)."""
    b = Balloon()
    data = STAT.pack(5, 1 << 29)
    gpa = b.drv.alloc(len(data))
    b.drv.put(gpa, data)
    head = b.drv.add_chain(STATSQ, [(gpa, len(data), False)])
    b.drv.publish(STATSQ, head)  # no kick
    assert b.dev.stats == {}
    assert b.dev.request_stats()
    assert b.dev.named_stats() == {"total-memory": 1 << 29}
    assert b.drv.used(STATSQ) == [(head, 0)]


def test_distinct_stats_tags_are_bounded() -> None:
    b = Balloon()
    for round_ in range(4):
        b.post_stats([(round_ * 16 + i + 100, i) for i in range(16)])
    assert len(b.dev.stats) == MAX_STATS
