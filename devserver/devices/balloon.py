"""virtio-balloon (virtio 1.2 §5.5 Traditional Memory Balloon Device).

The host sets a target (`num_pages`, 4 KiB pages the guest should give back);
the driver inflates (hands pages to the device on inflateq) or deflates (takes
them back on deflateq) towards it and writes how many it holds in `actual`.
A target change is a configuration change: the shell calls `set_target` and
then the transport's `config_changed`, which interrupts the driver.

Queues (§5.5.2): inflateq 0, deflateq 1, statsq 2 (VIRTIO_BALLOON_F_STATS_VQ).

Features: STATS_VQ and DEFLATE_ON_OOM (the guest may take pages back when it
runs out of memory, so a target never OOM-kills it). Not MUST_TELL_HOST:
deflated pages need nothing from the device (a freed page faults back in).

inflateq/deflateq: a chain's readable bytes are an array of le32 page frame
numbers (PFN << 12 is the guest-physical address). At most MAX_PFNS of them
are read per chain (Linux sends at most 256); the rest, a trailing partial
entry and PFNs outside guest RAM are ignored and counted. An inflated PFN is
handed to the memory's `discard` when it has one (shared RAM: the host really
frees it); with DMA messages there is nothing to free here.

statsq (§5.5.6.3): the driver posts one buffer of (le16 tag, le64 value)
entries; the device keeps the latest values and holds the chain. To ask for
fresh values it returns the chain (`request_stats`); the driver refills and
posts it again. At most MAX_STATS entries are read of a buffer.

Pure: no I/O; guest memory and discards go through the memory port.
"""

from __future__ import annotations

import struct
from typing import Final, Protocol, runtime_checkable

from ..errors import GuestMemoryError
from ..virtio.chain import DescriptorChain, Reader, RingMemory
from ..virtio.device import QUEUE_WEIGHT, VirtioDevice
from ..virtio.queue import SplitQueue
from ..virtio.spec import VirtioDeviceId, feature_bit

QUEUE_SIZE: Final = 128
INFLATEQ: Final = 0
DEFLATEQ: Final = 1
STATSQ: Final = 2

# §5.5.3 feature bits
VIRTIO_BALLOON_F_MUST_TELL_HOST: Final = 0
VIRTIO_BALLOON_F_STATS_VQ: Final = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM: Final = 2

PAGE_SHIFT: Final = 12  # VIRTIO_BALLOON_PFN_SHIFT: PFNs are 4 KiB pages whatever the guest's
PAGE_SIZE: Final = 1 << PAGE_SHIFT
# PFNs read of one chain: Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX (256), so a
# chain costs at most 1 KiB of reading whatever its descriptors claim.
MAX_PFNS: Final = 256
# The target fits the le32 num_pages field.
MAX_TARGET_PAGES: Final = 0xFFFF_FFFF

# struct virtio_balloon_config up to actual: le32 num_pages, le32 actual
CONFIG: Final = struct.Struct("<II")
ACTUAL_OFFSET: Final = 4
PFN: Final = struct.Struct("<I")
# struct virtio_balloon_stat: le16 tag, le64 val (packed, 10 bytes)
STAT: Final = struct.Struct("<HQ")
# Entries read of one stats buffer (§5.5.6.3 defines 0..10; Linux sends up to 16).
MAX_STATS: Final = 32

# §5.5.6.3 tags, by the names Linux's virtio_balloon uses.
STAT_NAMES: Final = {
    0: "swap-in",
    1: "swap-out",
    2: "major-faults",
    3: "minor-faults",
    4: "free-memory",
    5: "total-memory",
    6: "available-memory",
    7: "disk-caches",
    8: "hugetlb-allocations",
    9: "hugetlb-failures",
    10: "oom-kills",
    11: "alloc-stalls",
    12: "async-scans",
    13: "direct-scans",
    14: "async-reclaims",
    15: "direct-reclaims",
}


@runtime_checkable
class DiscardableMemory(Protocol):
    """Guest memory whose pages the host can free (shared RAM); what the device
    does with an inflated page when its memory has it."""

    def discard(self, gpa: int, length: int) -> bool:
        """Free [gpa, gpa + length) (page-aligned, in RAM); False: nothing was freed."""


def stat_name(tag: int) -> str:
    return STAT_NAMES.get(tag, f"tag-{tag}")


class VirtioBalloon(VirtioDevice):
    """The balloon; the host drives it by `set_target` and reads `actual_pages`."""

    device_type = VirtioDeviceId.BALLOON
    type_name = "virtio-balloon"
    pci_class_code = 0x00FF00  # unclassified, other (QEMU's virtio-balloon-pci)

    def __init__(self) -> None:
        features = feature_bit(VIRTIO_BALLOON_F_STATS_VQ) | feature_bit(
            VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        )
        super().__init__((QUEUE_SIZE,) * 3, features)
        self.target_pages = 0  # num_pages: the host's
        self.actual_pages = 0  # actual: the driver's (what it says it holds)
        self.stats: dict[int, int] = {}  # tag → the latest value the driver sent
        self._stats_chain: DescriptorChain | None = None
        self.inflated = 0  # PFNs taken on inflateq (in RAM)
        self.deflated = 0  # PFNs taken on deflateq (in RAM)
        self.discarded = 0  # inflated PFNs the memory freed
        self.pfns_outside_ram = 0  # PFNs naming no guest RAM: ignored
        self.pfns_ignored = 0  # past MAX_PFNS in a chain, or a partial entry's bytes

    # -- configuration (§5.5.4)

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.target_pages, self.actual_pages)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Only `actual` is the driver's; the bytes of it a write covers are
        merged in, anything else written is ignored."""
        raw = bytearray(CONFIG.pack(self.target_pages, self.actual_pages))
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little") if size > 0 else b""
        for i, byte in enumerate(data):
            at = offset + i
            if ACTUAL_OFFSET <= at < CONFIG.size:
                raw[at] = byte
        self.actual_pages = CONFIG.unpack(raw)[1]

    def set_target(self, pages: int) -> None:
        """The host's new target; the shell then signals the configuration change."""
        if not 0 <= pages <= MAX_TARGET_PAGES:
            raise ValueError(f"balloon target of {pages} pages is not 0..{MAX_TARGET_PAGES}")
        self.target_pages = pages

    # -- lifecycle

    def reset(self) -> None:
        super().reset()
        # §5.5.6: actual is the driver's, and a reset driver holds no pages.
        self.actual_pages = 0
        self._stats_chain = None

    # -- queues

    def notify(self, queue_index: int) -> bool:
        queue = self.queues.get(queue_index)
        memory = self.memory
        if queue is None or memory is None:
            return False
        if queue_index == STATSQ:
            self._take_stats(queue, memory)
            return False
        inflate = queue_index == INFLATEQ
        for _ in range(QUEUE_WEIGHT):
            chain = queue.pop()
            if chain is None:
                return False
            self._pages(memory, chain, inflate=inflate)
            self.complete(queue, chain, 0)
        return queue.available() > 0

    def _pages(self, memory: RingMemory, chain: DescriptorChain, *, inflate: bool) -> None:
        length = chain.readable_len
        entries = min(length // PFN.size, MAX_PFNS)
        self.pfns_ignored += length // PFN.size - entries + (1 if length % PFN.size else 0)
        if entries == 0:
            return
        raw = Reader(memory, chain.readable).read(entries * PFN.size)
        pfns = [pfn for (pfn,) in PFN.iter_unpack(raw)]
        in_ram: list[int] = []
        for pfn in pfns:
            try:
                memory.check_ram(pfn << PAGE_SHIFT, PAGE_SIZE)
            except GuestMemoryError:
                self.pfns_outside_ram += 1
                continue
            in_ram.append(pfn)
        if not inflate:
            self.deflated += len(in_ram)  # a deflated page faults back in: nothing to do
            return
        self.inflated += len(in_ram)
        if isinstance(memory, DiscardableMemory):
            for first, count in runs(in_ram):
                if memory.discard(first << PAGE_SHIFT, count << PAGE_SHIFT):
                    self.discarded += count

    def _take_stats(self, queue: SplitQueue, memory: RingMemory) -> None:
        """The driver posted its stats buffer: keep its values and the chain."""
        chain = queue.pop()
        if chain is None:
            return
        if self._stats_chain is not None:
            # A second buffer while one is held: §5.5.6.3 has one in flight.
            # Return the older one so no head is kept forever.
            self.complete(queue, self._stats_chain, 0)
        self._stats_chain = chain
        length = min(chain.readable_len, MAX_STATS * STAT.size)
        entries = length // STAT.size
        if entries:
            raw = Reader(memory, chain.readable).read(entries * STAT.size)
            for tag, value in STAT.iter_unpack(raw):
                # Tags are a guest's u16: keep at most MAX_STATS different ones,
                # so the reply (a map of them) stays small whatever it sends.
                if tag in self.stats or len(self.stats) < MAX_STATS:
                    self.stats[tag] = value

    def request_stats(self) -> bool:
        """Give the held stats buffer back, so the driver refills it (§5.5.6.3).
        False: none is held (no driver, or no STATS_VQ).

        A buffer still in the ring is taken first: Linux primes statsq in its
        probe, before DRIVER_OK, so the transport drops that kick and only this
        finds the buffer. May raise ChainError (the shell latches NEEDS_RESET)."""
        queue = self.queues.get(STATSQ)
        memory = self.memory
        if queue is None or memory is None:
            return False
        self._take_stats(queue, memory)
        chain = self._stats_chain
        if chain is None:
            return False
        self._stats_chain = None
        self.complete(queue, chain, 0)
        return True

    def named_stats(self) -> dict[str, int]:
        return {stat_name(tag): value for tag, value in sorted(self.stats.items())}


def runs(pfns: list[int]) -> list[tuple[int, int]]:
    """Consecutive PFNs as (first, count) runs, in the order given."""
    out: list[tuple[int, int]] = []
    for pfn in pfns:
        if out and out[-1][0] + out[-1][1] == pfn:
            first, count = out[-1]
            out[-1] = (first, count + 1)
        else:
            out.append((pfn, 1))
    return out
