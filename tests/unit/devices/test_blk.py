"""virtio-blk driven like a guest (virtio 1.2 §5.2; reliability.md C9: every popped
head comes back, with IOERR/UNSUPP in its status byte when it has one)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devserver.devices.blk import (
    CONFIG,
    DISCARD_SECTOR_ALIGNMENT,
    HEADER,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_QUEUES,
    MAX_WRITE_ZEROES_SEG,
    SEG_MAX,
    SEGMENT,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    VirtioBlk,
)
from devserver.effects import MsiRaised
from devserver.errors import ConfigError
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.virtio.device import QUEUE_WEIGHT
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET, VirtioPciFunction
from devserver.virtio.spec import DeviceStatus, feature_bit
from tests.unit.virtio.driver import RAM_SIZE, FakeVirtioDriver

DISK = 64 * 1024  # 128 sectors


class FakeDisk:
    """A BlockBackend in a bytearray, with failure injection and a call log."""

    def __init__(self, size: int = DISK, *, read_only: bool = False, block: int = 512) -> None:
        self.data = bytearray(size)
        self._read_only = read_only
        self._block = block
        self.fail = False
        self.calls: list[tuple[str, int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def block_size(self) -> int:
        return self._block

    def _check(self) -> None:
        if self.fail:
            raise OSError(5, "injected I/O error")

    def read(self, offset: int, length: int) -> bytes:
        self._check()
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self._check()
        assert offset + len(data) <= len(self.data)
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        self._check()
        self.calls.append(("flush", 0, 0))

    def discard(self, offset: int, length: int) -> None:
        self._check()
        self.calls.append(("discard", offset, length))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        self._check()
        self.calls.append(("write_zeroes_unmap" if unmap else "write_zeroes", offset, length))
        self.data[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self.calls.append(("close", 0, 0))


class Blk:
    """A started virtio-blk function and helpers to send requests."""

    def __init__(
        self,
        disk: FakeDisk,
        serial: str = "disk-1",
        *,
        discard: bool = True,
        num_queues: int = 1,
        write_cache: bool = True,
    ) -> None:
        self.disk = disk
        self.dev = VirtioBlk(
            disk, serial=serial, discard=discard, num_queues=num_queues, write_cache=write_cache
        )
        self.mem = BytearrayMemory(RAM_SIZE)
        self.fn = VirtioPciFunction(self.dev, presentation=Presentation(), memory=self.mem)
        self.fn.device_id = 4
        self.drv = FakeVirtioDriver(self.fn, self.mem)
        self.drv.start(num_queues)

    def buffer(self, data: bytes | int) -> tuple[int, int]:
        size = data if isinstance(data, int) else len(data)
        gpa = self.drv.alloc(max(size, 1))
        if isinstance(data, bytes):
            self.drv.put(gpa, data)
        return gpa, size

    def submit(self, buffers: list[tuple[int, int, bool]], queue: int = 0) -> int:
        head = self.drv.add_chain(queue, buffers)
        self.drv.publish(queue, head)
        return head

    def request(
        self,
        type_: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        *,
        status: bool = True,
        queue: int = 0,
    ) -> tuple[int, int, int, int]:
        """Send one request; returns (status, used len, in-buffer gpa, status gpa)."""
        hdr, hlen = self.buffer(HEADER.pack(type_, 0, sector))
        buffers = [(hdr, hlen, False)]
        if out:
            gpa, n = self.buffer(out)
            buffers.append((gpa, n, False))
        in_gpa = 0
        if in_len:
            in_gpa, _ = self.buffer(in_len)
            buffers.append((in_gpa, in_len, True))
        st_gpa, _ = self.buffer(b"\xee")
        if status:
            buffers.append((st_gpa, 1, True))
        head = self.submit(buffers, queue)
        self.drv.kick(queue)
        used = self.drv.used(queue)
        assert used and used[-1][0] == head, "every popped head is returned (C9)"
        return self.drv.get(st_gpa, 1)[0], used[-1][1], in_gpa, st_gpa


@pytest.fixture
def blk() -> Blk:
    return Blk(FakeDisk())


def test_config_structure_and_features(blk: Blk) -> None:
    raw = bytes(blk.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(CONFIG.size))
    fields = CONFIG.unpack(raw)
    assert fields[0] == DISK // 512  # capacity
    assert fields[2] == SEG_MAX
    assert fields[6] == 512  # blk_size
    assert fields[7:11] == (3, 0, 8, 2048)  # 4 KiB physical blocks, min 4 KiB, opt 1 MiB
    assert blk.drv.device_features() & feature_bit(VIRTIO_BLK_F_TOPOLOGY)
    assert fields[13] == 1  # num_queues
    assert fields[14] == MAX_DISCARD_SECTORS
    assert fields[15] == MAX_DISCARD_SEG
    assert fields[16] == DISCARD_SECTOR_ALIGNMENT
    assert fields[18] == MAX_WRITE_ZEROES_SEG
    assert fields[19] == 1  # write_zeroes_may_unmap
    assert blk.drv.device_features() & feature_bit(VIRTIO_BLK_F_DISCARD)
    assert not blk.drv.device_features() & feature_bit(VIRTIO_BLK_F_MQ)
    assert not blk.drv.device_features() & feature_bit(VIRTIO_BLK_F_RO)
    ro = Blk(FakeDisk(read_only=True))
    assert ro.drv.device_features() & feature_bit(VIRTIO_BLK_F_RO)


def config_fields(blk: Blk) -> tuple[int, ...]:
    raw = bytes(blk.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(CONFIG.size))
    return CONFIG.unpack(raw)


def test_blk_size_and_topology_follow_the_backends_direct_block() -> None:
    # A backend whose O_DIRECT needs 4 KiB (a 4Kn host disk with cache=none):
    # the guest gets 4 KiB logical blocks, topology counted in them, capacity
    # still in 512-byte sectors (§5.2.4).
    blk = Blk(FakeDisk(block=4096))
    fields = config_fields(blk)
    assert fields[0] == DISK // 512
    assert fields[6] == 4096  # blk_size
    assert fields[7:11] == (0, 0, 1, 256)  # physical = logical, min 4 KiB, opt 1 MiB
    # A sector-sized request still works (the backend's bounce path takes it).
    status, _, _, _ = blk.request(VIRTIO_BLK_T_OUT, 1, out=b"q" * 512)
    assert status == VIRTIO_BLK_S_OK
    assert blk.disk.data[512:1024] == b"q" * 512


@pytest.mark.parametrize(("size", "block"), [(DISK, 3000), (DISK + 512, 4096), (DISK, 8192)])
def test_a_block_size_the_image_cannot_have_is_refused(size: int, block: int) -> None:
    with pytest.raises(ConfigError, match="blocks"):
        VirtioBlk(FakeDisk(size, block=block))


def test_write_cache_off_offers_no_flush_but_still_flushes() -> None:
    # cache=directsync: every write is durable when done, so the guest is told
    # the disk is write-through (no FLUSH, no CONFIG_WCE) and need not flush.
    assert Blk(FakeDisk()).drv.device_features() & feature_bit(VIRTIO_BLK_F_FLUSH)
    blk = Blk(FakeDisk(), write_cache=False)
    assert not blk.drv.device_features() & feature_bit(VIRTIO_BLK_F_FLUSH)
    status, _, _, _ = blk.request(VIRTIO_BLK_T_FLUSH)
    assert status == VIRTIO_BLK_S_OK
    assert ("flush", 0, 0) in blk.disk.calls


def test_write_then_read_back(blk: Blk) -> None:
    pattern = bytes(range(256)) * 4  # two sectors
    status, used, _, _ = blk.request(VIRTIO_BLK_T_OUT, 3, out=pattern)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert blk.disk.data[3 * 512 : 5 * 512] == pattern
    status, used, in_gpa, _ = blk.request(VIRTIO_BLK_T_IN, 3, in_len=1024)
    assert (status, used) == (VIRTIO_BLK_S_OK, 1025)
    assert blk.drv.get(in_gpa, 1024) == pattern


def test_data_split_over_descriptors_and_header_split(blk: Blk) -> None:
    header = HEADER.pack(VIRTIO_BLK_T_OUT, 0, 1)
    h1, _ = blk.buffer(header[:5])
    h2, _ = blk.buffer(header[5:])
    d1, _ = blk.buffer(b"a" * 100)
    d2, _ = blk.buffer(b"b" * 412)
    st, _ = blk.buffer(1)
    blk.submit([(h1, 5, False), (h2, 11, False), (d1, 100, False), (d2, 412, False), (st, 1, True)])
    blk.drv.kick(0)
    assert blk.drv.used(0)[0][1] == 1
    assert blk.drv.get(st, 1) == bytes([VIRTIO_BLK_S_OK])
    assert blk.disk.data[512:1024] == b"a" * 100 + b"b" * 412


def test_interrupt_on_completion(blk: Blk) -> None:
    blk.request(VIRTIO_BLK_T_FLUSH)
    assert any(isinstance(e, MsiRaised) for e in blk.drv.take()) or blk.drv.isr()


def test_flush_and_get_id(blk: Blk) -> None:
    assert blk.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert ("flush", 0, 0) in blk.disk.calls
    status, used, in_gpa, _ = blk.request(VIRTIO_BLK_T_GET_ID, in_len=20)
    assert (status, used) == (VIRTIO_BLK_S_OK, 21)
    assert blk.drv.get(in_gpa, 20) == b"disk-1".ljust(20, b"\0")


def test_discard_and_write_zeroes(blk: Blk) -> None:
    blk.disk.data[:] = b"\xff" * DISK
    seg = SEGMENT.pack(2, 4, 0)
    assert blk.request(VIRTIO_BLK_T_DISCARD, out=seg)[0] == VIRTIO_BLK_S_OK
    assert ("discard", 1024, 2048) in blk.disk.calls
    seg = SEGMENT.pack(8, 2, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
    assert blk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == VIRTIO_BLK_S_OK
    assert blk.disk.data[8 * 512 : 10 * 512] == bytes(1024)
    assert blk.disk.data[10 * 512] == 0xFF
    assert ("write_zeroes_unmap", 8 * 512, 1024) in blk.disk.calls
    seg = SEGMENT.pack(12, 1, 0)  # no UNMAP flag: the blocks must stay allocated
    assert blk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == VIRTIO_BLK_S_OK
    assert ("write_zeroes", 12 * 512, 512) in blk.disk.calls


def test_several_segments_in_one_request(blk: Blk) -> None:
    segs = b"".join(SEGMENT.pack(4 * i, 2, 0) for i in range(MAX_DISCARD_SEG))
    assert blk.request(VIRTIO_BLK_T_DISCARD, out=segs)[0] == VIRTIO_BLK_S_OK
    discards = [c for c in blk.disk.calls if c[0] == "discard"]
    assert discards == [("discard", 4 * i * 512, 1024) for i in range(MAX_DISCARD_SEG)]
    # One segment past the disk fails the whole request before any is done.
    blk.disk.calls.clear()
    segs = SEGMENT.pack(0, 1, 0) + SEGMENT.pack(DISK // 512, 1, 0)
    assert blk.request(VIRTIO_BLK_T_DISCARD, out=segs)[0] == VIRTIO_BLK_S_IOERR
    assert blk.disk.calls == []


def test_discard_off_offers_no_discard_and_never_unmaps() -> None:
    blk = Blk(FakeDisk(), discard=False)
    assert not blk.drv.device_features() & feature_bit(VIRTIO_BLK_F_DISCARD)
    raw = bytes(blk.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(CONFIG.size))
    fields = CONFIG.unpack(raw)
    assert fields[14:17] == (0, 0, 0)  # max_discard_sectors, _seg, alignment
    assert fields[19] == 0  # write_zeroes_may_unmap
    seg = SEGMENT.pack(2, 4, 0)
    assert blk.request(VIRTIO_BLK_T_DISCARD, out=seg)[0] == VIRTIO_BLK_S_UNSUPP
    seg = SEGMENT.pack(2, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
    assert blk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=seg)[0] == VIRTIO_BLK_S_OK
    assert ("write_zeroes", 1024, 2048) in blk.disk.calls
    assert not any(c[0] in ("discard", "write_zeroes_unmap") for c in blk.disk.calls)


def test_several_queues_each_serve_requests() -> None:
    blk = Blk(FakeDisk(), num_queues=4)
    assert blk.drv.device_features() & feature_bit(VIRTIO_BLK_F_MQ)
    assert blk.drv.read(0x12, 2) == 4  # common config num_queues
    raw = bytes(blk.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(CONFIG.size))
    assert CONFIG.unpack(raw)[13] == 4
    for q in range(4):
        data = bytes([q + 1]) * 512
        assert blk.request(VIRTIO_BLK_T_OUT, sector=q, out=data, queue=q)[0] == VIRTIO_BLK_S_OK
    for q in reversed(range(4)):
        status, used, in_gpa, _ = blk.request(VIRTIO_BLK_T_IN, sector=q, in_len=512, queue=q)
        assert (status, used) == (VIRTIO_BLK_S_OK, 513)
        assert blk.drv.get(in_gpa, 512) == bytes([q + 1]) * 512
    # Each queue interrupts on its own vector (the driver gave queue q vector q + 1).
    vectors = {e.vector for e in blk.drv.take() if isinstance(e, MsiRaised)}
    assert vectors == {1, 2, 3, 4}


@pytest.mark.parametrize("count", [0, MAX_QUEUES + 1])
def test_queue_count_is_bounded(count: int) -> None:
    with pytest.raises(ConfigError, match="num-queues"):
        VirtioBlk(FakeDisk(), num_queues=count)


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        (VIRTIO_BLK_T_DISCARD, SEGMENT.pack(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)),
        (VIRTIO_BLK_T_DISCARD, SEGMENT.pack(0, 1, 0) * (MAX_DISCARD_SEG + 1)),  # too many
        (VIRTIO_BLK_T_DISCARD, b"\0" * 15),  # not whole segments
        (VIRTIO_BLK_T_WRITE_ZEROES, SEGMENT.pack(0, 1, 0x80)),  # reserved flag
        (VIRTIO_BLK_T_DISCARD, SEGMENT.pack(0, MAX_DISCARD_SECTORS + 1, 0)),
        (99, b""),  # unknown type
    ],
)
def test_unsupported_requests(blk: Blk, type_: int, payload: bytes) -> None:
    assert blk.request(type_, out=payload)[0] == VIRTIO_BLK_S_UNSUPP
    assert blk.dev.errors == 1


@pytest.mark.parametrize(
    ("type_", "sector", "out", "in_len"),
    [
        (VIRTIO_BLK_T_IN, DISK // 512, b"", 512),  # just past the end
        (VIRTIO_BLK_T_IN, DISK // 512 - 1, b"", 1024),  # straddles the end
        (VIRTIO_BLK_T_OUT, (1 << 64) - 1, b"x" * 512, 0),  # sector + len wraps u64
        (VIRTIO_BLK_T_IN, 0, b"", 100),  # not whole sectors
        (VIRTIO_BLK_T_OUT, 0, b"x" * 513, 0),
        (VIRTIO_BLK_T_DISCARD, 0, SEGMENT.pack(DISK // 512, 1, 0), 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0, SEGMENT.pack((1 << 64) - 1, 2, 0), 0),
    ],
)
def test_out_of_range_or_misshapen_is_ioerr(
    blk: Blk, type_: int, sector: int, out: bytes, in_len: int
) -> None:
    before = bytes(blk.disk.data)
    status, used, _, _ = blk.request(type_, sector, out=out, in_len=in_len)
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    assert bytes(blk.disk.data) == before


@pytest.mark.parametrize(
    ("type_", "out"),
    [
        (VIRTIO_BLK_T_OUT, b"x" * 512),
        (VIRTIO_BLK_T_DISCARD, SEGMENT.pack(0, 1, 0)),
        (VIRTIO_BLK_T_WRITE_ZEROES, SEGMENT.pack(0, 1, 0)),
    ],
)
def test_writes_to_a_read_only_disk_fail(type_: int, out: bytes) -> None:
    ro = Blk(FakeDisk(read_only=True))
    ro.disk.data[:512] = b"k" * 512
    assert ro.request(type_, 0, out=out)[0] == VIRTIO_BLK_S_IOERR
    assert ro.disk.data[:512] == b"k" * 512
    assert not ro.disk.calls
    assert ro.request(VIRTIO_BLK_T_IN, 0, in_len=512)[0] == VIRTIO_BLK_S_OK


def test_backend_failure_is_ioerr(blk: Blk) -> None:
    blk.disk.fail = True
    for type_, out, in_len in (
        (VIRTIO_BLK_T_IN, b"", 512),
        (VIRTIO_BLK_T_OUT, b"y" * 512, 0),
        (VIRTIO_BLK_T_FLUSH, b"", 0),
    ):
        status, used, _, _ = blk.request(type_, 0, out=out, in_len=in_len)
        assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)
    blk.disk.fail = False
    assert blk.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK


def test_short_header_gets_ioerr(blk: Blk) -> None:
    short, _ = blk.buffer(struct.pack("<II", VIRTIO_BLK_T_IN, 0))
    st, _ = blk.buffer(1)
    head = blk.submit([(short, 8, False), (st, 1, True)])
    blk.drv.kick(0)
    assert blk.drv.used(0) == [(head, 1)]
    assert blk.drv.get(st, 1) == bytes([VIRTIO_BLK_S_IOERR])


def test_chain_without_status_byte_is_still_returned(blk: Blk) -> None:
    """cloud-hypervisor#8401: a head-only chain must come back, or the queue stalls."""
    status_before = blk.request(VIRTIO_BLK_T_OUT, 0, out=b"z" * 512, status=False)
    assert status_before[1] == 0  # used len 0: nothing written
    assert blk.disk.data[:512] == bytes(512)  # not executed without a status
    hdr, _ = blk.buffer(HEADER.pack(VIRTIO_BLK_T_IN, 0, 0))
    head = blk.submit([(hdr, 16, False)])
    blk.drv.kick(0)
    assert blk.drv.used(0) == [(head, 0)]
    # The queue still works afterwards.
    assert blk.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK


def test_empty_chain_of_only_a_status_byte(blk: Blk) -> None:
    st, _ = blk.buffer(1)
    head = blk.submit([(st, 1, True)])
    blk.drv.kick(0)
    assert blk.drv.used(0) == [(head, 1)]
    assert blk.drv.get(st, 1) == bytes([VIRTIO_BLK_S_IOERR])


def test_work_per_kick_is_bounded(blk: Blk) -> None:
    n = QUEUE_WEIGHT + 10
    hdr, _ = blk.buffer(HEADER.pack(VIRTIO_BLK_T_FLUSH, 0, 0))
    for _ in range(n):
        st, _ = blk.buffer(1)
        blk.submit([(hdr, 16, False), (st, 1, True)])
    blk.drv.kick(0)
    assert len(blk.drv.used(0)) == QUEUE_WEIGHT
    assert blk.fn.pending_work == {0}
    blk.fn.run_pending()
    assert len(blk.drv.used(0)) == 10
    assert not blk.fn.pending_work


def test_reset_and_restart(blk: Blk) -> None:
    blk.drv.set_status(0)
    assert blk.drv.status == 0
    blk.drv.queues.clear()
    blk.drv.start(1)
    assert blk.drv.status & DeviceStatus.DRIVER_OK
    assert blk.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK


def test_bad_images_and_serials_are_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of 512"):
        VirtioBlk(FakeDisk(1000))
    with pytest.raises(ConfigError, match="longer than 20"):
        VirtioBlk(FakeDisk(), serial="x" * 21)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    type_=st.sampled_from([0, 1, 4, 8, 11, 13, 2, 0xFFFF_FFFF]),
    sector=st.one_of(st.integers(0, DISK // 512 + 2), st.integers(0, (1 << 64) - 1)),
    readable=st.lists(st.integers(0, 1100), max_size=3),
    writable=st.lists(st.integers(0, 1100), max_size=3),
    header_len=st.integers(0, 24),
)
def test_any_request_shape_returns_its_head(
    type_: int,
    sector: int,
    readable: list[int],
    writable: list[int],
    header_len: int,
) -> None:
    """C9: whatever the guest sends, the head comes back (no exception, no stall),
    the used length is at most what the chain can take, and the status byte, when
    there is one, holds a defined status."""
    blk = Blk(FakeDisk())
    header = HEADER.pack(type_, 0, sector)[:header_len].ljust(header_len, b"\0")
    buffers = []
    if header_len:
        gpa, n = blk.buffer(header)
        buffers.append((gpa, n, False))
    for length in readable:
        gpa, _ = blk.buffer(bytes(length))
        buffers.append((gpa, length, False))
    for length in writable:
        gpa, _ = blk.buffer(length)
        buffers.append((gpa, length, True))
    if not buffers:
        return  # an empty chain is not something a driver can publish
    head = blk.submit(buffers)
    blk.drv.kick(0)
    used = blk.drv.used(0)
    assert [h for h, _ in used] == [head]
    assert used[0][1] <= sum(writable)
    nonempty = [(g, n) for g, n, w in buffers if w and n]
    if nonempty:
        gpa, n = nonempty[-1]
        assert blk.drv.get(gpa + n - 1, 1)[0] in (
            VIRTIO_BLK_S_OK,
            VIRTIO_BLK_S_IOERR,
            VIRTIO_BLK_S_UNSUPP,
        )
    assert blk.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK  # the queue still works
