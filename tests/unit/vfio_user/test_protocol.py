"""The vfio-user codec: round trips, framing, and hostile input."""

from __future__ import annotations

import errno
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm_client.vfio_user.protocol import (
    DMA_DATA_OFFSET_U32_COUNT,
    FLAG_ERROR,
    FLAG_NO_REPLY,
    HEADER_SIZE,
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    MAX_MESSAGE_SIZE,
    REGION_CONFIG,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    REGION_ROM,
    REGION_VGA,
    TYPE_REPLY,
    BarLayout,
    Capabilities,
    Command,
    DeviceInfo,
    DeviceLayout,
    DmaAccess,
    DmaMap,
    DmaUnmap,
    Framer,
    FramingError,
    Header,
    IrqIndex,
    IrqInfo,
    IrqSet,
    Message,
    ProtocolError,
    RegionAccess,
    RegionInfo,
    Version,
    WriteMulti,
    all_ones,
    encode_error,
    encode_message,
    encode_reply,
    split_access,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)

TESTDEV_BARS = (
    BarLayout(0, 0x100),
    BarLayout(2, 0x10000, is_64bit=True),
    BarLayout(4, 0x1000),
    BarLayout(6, 0x800),
)


def make_testdev_layout() -> DeviceLayout:
    return DeviceLayout.build(TESTDEV_BARS, interrupt_pin=1, msix_vectors=4)


# ---------------------------------------------------------------- header and framing


@given(u16, u16, st.integers(HEADER_SIZE, 0xFFFF_FFFF), u32, u32)
def test_header_round_trip(msg_id: int, command: int, size: int, flags: int, error: int) -> None:
    header = Header(msg_id, command, size, flags, error)
    assert Header.decode(header.encode()) == header
    assert header.encode() == struct.pack("<HHIII", msg_id, command, size, flags, error)


def test_header_flags() -> None:
    assert Header(1, 9, 16, TYPE_REPLY | FLAG_ERROR).is_reply
    assert Header(1, 9, 16, TYPE_REPLY | FLAG_ERROR).is_error
    assert Header(1, 10, 16, FLAG_NO_REPLY).no_reply
    assert Header(1, 10, 16, FLAG_NO_REPLY).is_command
    assert not Header(1, 10, 16, 0x2).is_command and not Header(1, 10, 16, 0x2).is_reply
    assert Header(1, 10, 16).command_name() == "REGION_WRITE"
    assert Header(1, 99, 16).command_name() == "command 99"


def test_short_header_is_a_framing_error() -> None:
    with pytest.raises(FramingError):
        Header.decode(b"\0" * 15)


def test_replies() -> None:
    request = Header(7, Command.REGION_READ, 32)
    assert encode_reply(request, b"xy") == struct.pack("<HHIII", 7, 9, 18, TYPE_REPLY, 0) + b"xy"
    error = encode_error(request, errno.EINVAL)
    assert error == struct.pack("<HHIII", 7, 9, 16, TYPE_REPLY | FLAG_ERROR, errno.EINVAL)
    assert encode_message(0x1_0005, 1)[:2] == b"\x05\x00"  # ids wrap at 16 bits


messages = st.lists(
    st.tuples(u16, st.integers(1, 18), st.binary(max_size=64)), min_size=1, max_size=6
)


@given(messages, st.data())
def test_framer_reassembles_any_chunking(
    items: list[tuple[int, int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(encode_message(i, c, p) for i, c, p in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    framer = Framer()
    got: list[Message] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        assert framer.feed(stream[start:end]) == []
        got.extend(framer.messages())
    assert [(m.header.msg_id, m.header.command, m.payload) for m in got] == items
    assert framer.buffered == 0


def test_framer_gives_fds_to_the_message_holding_the_chunks_last_byte() -> None:
    a = encode_message(1, Command.DEVICE_GET_INFO, bytes(16))
    b = encode_message(2, Command.DMA_MAP, bytes(32))
    c = encode_message(3, Command.REGION_READ, bytes(16))
    framer = Framer()
    # Linux: a recvmsg ends right after the segment that carried descriptors,
    # so [a][b] with fds means the fds were sent with b.
    framer.feed(a + b, [10])
    framer.feed(c[:5])
    framer.feed(c[5:], [11, 12])  # a message split across receives: still c's
    got = list(framer.messages())
    assert [m.fds for m in got] == [(), (10,), (11, 12)]


def test_framer_hands_back_fds_without_bytes_and_on_teardown() -> None:
    framer = Framer()
    assert framer.feed(b"", [4, 5]) == [4, 5]
    framer.feed(encode_message(1, Command.DMA_MAP, bytes(32))[:20], [6])
    assert framer.next_message() is None
    assert framer.take_fds() == [6]
    assert framer.take_fds() == []


def test_framer_waits_for_a_whole_header() -> None:
    framer = Framer()
    framer.feed(b"\x01\x00\x09\x00")
    assert framer.next_message() is None


@pytest.mark.parametrize("size", [0, 8, HEADER_SIZE - 1])
def test_size_smaller_than_header_breaks_the_stream(size: int) -> None:
    framer = Framer()
    framer.feed(struct.pack("<HHIII", 7, 9, size, 0, 0) + bytes(64))
    with pytest.raises(FramingError) as caught:
        framer.next_message()
    assert caught.value.header is not None and caught.value.header.msg_id == 7
    with pytest.raises(FramingError):  # and stays broken
        framer.next_message()


def test_size_over_the_limit_breaks_the_stream() -> None:
    framer = Framer()
    framer.feed(struct.pack("<HHIII", 3, 10, MAX_MESSAGE_SIZE + 1, 0, 0))
    with pytest.raises(FramingError, match="exceeds"):
        framer.next_message()
    # Exactly the limit is a message (a REGION_WRITE of max_data_xfer_size).
    framer = Framer()
    framer.feed(encode_message(3, 10, bytes(MAX_MESSAGE_SIZE - HEADER_SIZE)))
    message = framer.next_message()
    assert message is not None and len(message.payload) == MAX_MESSAGE_SIZE - HEADER_SIZE


# ---------------------------------------------------------------- VERSION


QEMU_CAPS = {
    "capabilities": {
        "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
        "max_msg_fds": 16,
        "max_data_xfer_size": 1048576,
        "pgsizes": 4096,
        "max_dma_maps": 65535,
        "write_multiple": True,
    }
}


def version_payload(document: object, nul: bool = True) -> bytes:
    return struct.pack("<HH", 0, 0) + json.dumps(document).encode() + (b"\0" if nul else b"")


def test_version_from_qemu() -> None:
    version = Version.decode(version_payload(QEMU_CAPS))
    assert (version.major, version.minor) == (0, 0)
    assert version.capabilities == Capabilities(16, 1 << 20, 65535, 4096, True)
    assert version.extra == {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}}


def test_version_round_trip_and_nul() -> None:
    ours = Version(0, 0, Capabilities(max_msg_fds=8))
    encoded = ours.encode()
    assert encoded.endswith(b"}\0")
    assert json.loads(encoded[4:-1]) == {
        "capabilities": {
            "max_msg_fds": 8,
            "max_data_xfer_size": 1 << 20,
            "pgsizes": 4096,
            "max_dma_maps": 65535,
        }
    }
    assert Version.decode(encoded) == ours
    assert Version.decode(struct.pack("<HH", 0, 0)) == Version(0, 0)  # JSON is optional
    assert Version(0, 0).encode() == b"\0\0\0\0"


@pytest.mark.parametrize(
    "payload",
    [
        b"\0\0",  # short
        version_payload(QEMU_CAPS, nul=False),
        struct.pack("<HH", 0, 0) + b"{not json\0",
        struct.pack("<HH", 0, 0) + b"\xff\xfe\0",
        version_payload([1, 2]),
        version_payload({"capabilities": []}),
        version_payload({"capabilities": {"max_msg_fds": "8"}}),
        version_payload({"capabilities": {"max_msg_fds": True}}),
        version_payload({"capabilities": {"max_data_xfer_size": 0}}),
        version_payload({"capabilities": {"max_data_xfer_size": 1 << 40}}),
        version_payload({"capabilities": {"write_multiple": 1}}),
        struct.pack("<HH", 0, 0) + b" " * 5000 + b"{}\0",
    ],
)
def test_bad_version(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        Version.decode(payload)
    assert caught.value.errno == errno.EINVAL


# ---------------------------------------------------------------- fixed-layout messages


@given(
    u32,
    st.integers(0, 3),
    st.integers(0, 1 << 40),
    st.integers(0, 1 << 40),
    st.integers(1, 1 << 40),
)
def test_dma_map_round_trip(argsz: int, flags: int, offset: int, address: int, size: int) -> None:
    message = DmaMap(max(argsz, 32), flags, offset, address, size)
    assert DmaMap.decode(message.encode()) == message


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ((32, 0x4, 0, 0, 0x1000), "unknown bits"),
        ((32, 0x3, 0, 0x1000, 0), "0 bytes"),
        ((32, 0x3, 0, (1 << 64) - 0x1000, 0x2000), "wraps"),
        ((16, 0x3, 0, 0, 0x1000), "argsz"),
    ],
)
def test_bad_dma_map(fields: tuple[int, int, int, int, int], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        DmaMap.decode(struct.pack("<IIQQQ", *fields))
    with pytest.raises(ProtocolError):
        DmaMap.decode(struct.pack("<IIQQQ", *fields)[:31])


def test_dma_unmap() -> None:
    message = DmaUnmap(24, 0, 0xC0000, 0x20000)
    assert DmaUnmap.decode(message.encode()) == message
    with pytest.raises(ProtocolError):
        DmaUnmap.decode(DmaUnmap(24, 0x4, 0, 0x1000).encode())
    with pytest.raises(ProtocolError):
        DmaUnmap.decode(bytes(23))
    assert DmaUnmap.decode(DmaUnmap(24, 2, 0, 0).encode()).flags == 2  # unmap all


@given(u32, u32, u32)
def test_info_round_trips(flags: int, index: int, count: int) -> None:
    assert DeviceInfo.decode(DeviceInfo(16, flags, index, count).encode()) == DeviceInfo(
        16, flags, index, count
    )
    info = RegionInfo(32, flags, index, 0, count, 0)
    assert RegionInfo.decode(info.encode()) == info
    irq = IrqInfo(16, flags, index, count)
    assert IrqInfo.decode(irq.encode()) == irq


@pytest.mark.parametrize(
    ("decode", "payload"),
    [
        (DeviceInfo.decode, struct.pack("<IIII", 8, 0, 0, 0)),
        (DeviceInfo.decode, bytes(12)),
        (RegionInfo.decode, struct.pack("<IIIIQQ", 16, 0, 0, 0, 0, 0)),
        (IrqInfo.decode, struct.pack("<IIII", 4, 0, 0, 0)),
        (IrqSet.decode, bytes(19)),
        (RegionAccess.decode_read, bytes(15)),
        (RegionAccess.decode_write, bytes(15)),
        (DmaAccess.decode, bytes(11)),
        (WriteMulti.decode, bytes(7)),
    ],
)
def test_short_or_small_argsz(decode: object, payload: bytes) -> None:
    assert callable(decode)
    with pytest.raises(ProtocolError):
        decode(payload)


def irq_set(flags: int, index: int = 2, start: int = 0, count: int = 1, data: bytes = b"") -> bytes:
    return struct.pack("<IIIII", 20 + len(data), flags, index, start, count) + data


def test_irq_set() -> None:
    message = IrqSet.decode(irq_set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 2, 1, 3))
    assert (message.index, message.start, message.count) == (2, 1, 3)
    assert message.data_type == IRQ_SET_DATA_EVENTFD
    assert message.action == IRQ_SET_ACTION_TRIGGER
    assert not message.disables_all
    assert list(message.selected()) == [1, 2, 3]
    assert IrqSet.decode(message.encode()) == message
    off = IrqSet.decode(irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, 0))
    assert off.disables_all
    chosen = IrqSet.decode(irq_set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK, 2, 4, 3, b"\1\0\1"))
    assert list(chosen.selected()) == [4, 6]


@pytest.mark.parametrize(
    "payload",
    [
        irq_set(IRQ_SET_ACTION_TRIGGER),  # no data type
        irq_set(IRQ_SET_DATA_NONE | IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER),
        irq_set(IRQ_SET_DATA_NONE),  # no action
        irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK),
        irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER | 0x40),  # unknown bit
        irq_set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, count=4, data=b"\1\1"),
        irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, start=0xFFFF_FFFF, count=2),
        struct.pack("<IIIII", 8, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 0, 1),  # argsz
    ],
)
def test_bad_irq_set(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        IrqSet.decode(payload)


@given(u64, st.integers(0, 8), st.binary(max_size=64))
def test_region_access_round_trip(offset: int, region: int, data: bytes) -> None:
    write = RegionAccess(offset, region, len(data), data)
    assert RegionAccess.decode_write(write.encode()) == write
    assert RegionAccess.decode_reply(write.encode()) == write
    read = RegionAccess(offset, region, len(data))
    assert RegionAccess.decode_read(read.encode()) == read


def test_region_write_count_must_match_data() -> None:
    with pytest.raises(ProtocolError, match="count 4"):
        RegionAccess.decode_write(struct.pack("<QII", 0, 0, 4) + b"abc")
    with pytest.raises(ProtocolError):
        RegionAccess.decode_write(struct.pack("<QII", 0, 0, 2) + b"abc")
    with pytest.raises(ProtocolError):
        RegionAccess.decode_reply(struct.pack("<QII", 0, 0, 2) + b"abc")


def test_dma_access_in_the_spec_layout() -> None:
    """The spec, libvfio-user and QEMU 11.1 on the wire: u64 address, u64 count, data at 16."""
    write = DmaAccess(0x2981000, 5, b"hello")
    encoded = write.encode()
    assert encoded == struct.pack("<QQ", 0x2981000, 5) + b"hello"
    assert 16 + len(encoded) == 32 + 5  # QEMU refuses count > size - 32
    assert DmaAccess.decode(encoded) == write
    # QEMU 11.1's reply to a 4-byte DMA_READ, as seen on the wire (36 bytes).
    reply = bytes.fromhex("00f000000000000004000000000000000df0feca")
    assert DmaAccess.decode(reply) == DmaAccess(0xF000, 4, bytes.fromhex("0df0feca"))
    assert DmaAccess(0x1000, 8).encode() == struct.pack("<QQ", 0x1000, 8)
    assert DmaAccess.decode(struct.pack("<QQ", 0x1000, 0)) == DmaAccess(0x1000, 0)


def test_dma_access_with_a_u32_count() -> None:
    """QEMU's first-merged VFIOUserDMARW: u32 count, data at offsetof(data) - 16 = 12,
    messages sizeof(VFIOUserDMARW) + count = 32 + count bytes long."""
    write = DmaAccess(0x2981000, 5, b"hello")
    encoded = write.encode(DMA_DATA_OFFSET_U32_COUNT)
    assert encoded == struct.pack("<QI", 0x2981000, 5) + b"hello" + bytes(4)
    assert 16 + len(encoded) == 32 + 5
    assert DmaAccess.decode(encoded, DMA_DATA_OFFSET_U32_COUNT) == write
    # A read request carries no data and is the same 16 bytes in both layouts.
    assert DmaAccess(0x1000, 8).encode(DMA_DATA_OFFSET_U32_COUNT) == struct.pack("<QQ", 0x1000, 8)
    with pytest.raises(ValueError, match="u32"):
        DmaAccess(0, 1 << 32).encode(DMA_DATA_OFFSET_U32_COUNT)
    with pytest.raises(ValueError):
        DmaAccess.decode(encoded, 8)


def test_write_multi() -> None:
    writes = (RegionAccess(0x3000, 0, 2, b"\1\0"), RegionAccess(8, 2, 8, bytes(range(8))))
    message = WriteMulti(writes)
    assert WriteMulti.decode(message.encode()) == message
    for count in (0, 201):
        with pytest.raises(ProtocolError):
            WriteMulti.decode(struct.pack("<Q", count) + bytes(24 * max(count, 1)))
    with pytest.raises(ProtocolError):  # promises two, carries one
        WriteMulti.decode(struct.pack("<Q", 2) + struct.pack("<QII8s", 0, 0, 4, b""))
    with pytest.raises(ProtocolError, match="count 9"):
        WriteMulti.decode(struct.pack("<Q", 1) + struct.pack("<QII8s", 0, 0, 9, b""))


# ---------------------------------------------------------------- splitting


@given(st.integers(0, 1 << 20), st.integers(0, 64), st.sampled_from([1, 2, 4, 8]))
def test_split_access_tiles_with_aligned_pieces(offset: int, count: int, max_size: int) -> None:
    pieces = split_access(offset, count, max_size)
    at = offset
    for piece_offset, size in pieces:
        assert piece_offset == at
        assert size in (1, 2, 4, 8) and size <= max_size
        assert piece_offset % size == 0
        at += size
    assert at == offset + count


def test_split_access_examples() -> None:
    assert split_access(0, 16, 4) == [(0, 4), (4, 4), (8, 4), (12, 4)]
    assert split_access(0, 16, 8) == [(0, 8), (8, 8)]
    assert split_access(1, 3, 8) == [(1, 1), (2, 2)]
    assert split_access(0, 3, 8) == [(0, 2), (2, 1)]
    assert split_access(6, 4, 8) == [(6, 2), (8, 2)]
    assert split_access(0, 4096, 4)[-1] == (4092, 4)
    assert split_access(0, 0, 4) == []
    with pytest.raises(ValueError):
        split_access(0, 4, 3)
    assert all_ones(3) == b"\xff\xff\xff"


# ---------------------------------------------------------------- device layout


def test_layout_of_the_test_device() -> None:
    layout = make_testdev_layout()
    sizes = [(r.index, r.size) for r in layout.regions]
    assert sizes == [(0, 0x100), (1, 0), (2, 0x10000), (3, 0), (4, 0x1000), (5, 0),
                     (6, 0x800), (7, 4096), (8, 0)]  # fmt: skip
    rw = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
    assert [r.flags for r in layout.regions] == [rw, 0, rw, 0, rw, 0, REGION_INFO_FLAG_READ, rw, 0]
    assert all(r.argsz == 32 for r in layout.regions)
    assert layout.device_info() == DeviceInfo(16, 0x3, 9, 5)
    intx = layout.irqs[IrqIndex.INTX]
    assert intx.flags == IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
    assert [i.count for i in layout.irqs] == [1, 0, 4, 1, 1]
    assert [i.index for i in layout.irqs] == list(IrqIndex)
    no_pin = DeviceLayout.build([], interrupt_pin=0, msix_vectors=0)
    assert no_pin.irq(IrqIndex.INTX).count == 0
    assert no_pin.region(REGION_CONFIG).size == 4096


def test_layout_rejects_bad_bars() -> None:
    with pytest.raises(ValueError):
        DeviceLayout.build([BarLayout(7, 0x100)], interrupt_pin=1, msix_vectors=0)
    with pytest.raises(ValueError):
        DeviceLayout.build([BarLayout(0, 0x300)], interrupt_pin=1, msix_vectors=0)


@pytest.mark.parametrize(
    ("region", "offset", "count", "write"),
    [
        (9, 0, 4, False),  # no such region
        (0xFFFF_FFFF, 0, 4, False),
        (REGION_VGA, 0, 4, False),  # size 0
        (1, 0, 4, False),  # unimplemented BAR
        (3, 0, 4, True),  # the upper half of a 64-bit BAR
        (REGION_ROM, 0, 4, True),  # read-only
        (REGION_CONFIG, 4096, 1, False),  # offset past the region
        (REGION_CONFIG, 4094, 4, False),  # runs past the end
        (REGION_CONFIG, (1 << 64) - 1, 2, False),  # would wrap
        (REGION_CONFIG, 0, 0, False),  # count 0
        (0, 0, 0x101, True),
    ],
)
def test_bad_accesses(region: int, offset: int, count: int, write: bool) -> None:
    with pytest.raises(ProtocolError) as caught:
        make_testdev_layout().check_access(region, offset, count, write=write)
    assert caught.value.errno == errno.EINVAL


def test_good_accesses() -> None:
    layout = make_testdev_layout()
    layout.check_access(REGION_CONFIG, 0, 4096, write=False)
    layout.check_access(REGION_CONFIG, 4095, 1, write=True)
    layout.check_access(REGION_ROM, 0x7F8, 8, write=False)
    layout.check_access(2, 0xFFF8, 8, write=True)
    with pytest.raises(ProtocolError):
        layout.irq(5)
    assert IrqSet.decode(irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0)).index == 0
