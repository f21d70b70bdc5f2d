"""devserver.service.dma_messages on its own: guest memory by DmaRequest with
no gRPC stream (the send function records what would go out), and the
stream's read-ahead with a fake reader."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.errors import GuestMemoryError
from devserver.memory import MAX_ACCESS, MemoryRegion
from devserver.service import dma_messages
from devserver.service.dma_messages import DmaChannel, MessageGuestMemory, ReadAhead
from devserver.service.stats import ServerCounters

DEVICE = 7


class Wire:
    """What the memory sends, and a frontend answering from a bytearray."""

    def __init__(self, answer: bool = True) -> None:
        self.sent: list[pb.DmaRequest] = []
        self.ram = bytearray(0x10000)
        self.answer = answer
        self.memory: MessageGuestMemory | None = None
        self.arrived = asyncio.Event()

    async def send(self, items: list[pb.ServerItem]) -> None:
        for item in items:
            request = item.event.dma_request
            self.sent.append(request)
            self.arrived.set()
            if not self.answer:
                continue
            assert self.memory is not None
            if request.write:
                self.ram[request.address : request.address + request.length] = request.data
                reply = pb.DmaReply(request_id=request.request_id, ok=True)
            else:
                data = bytes(self.ram[request.address : request.address + request.length])
                reply = pb.DmaReply(request_id=request.request_id, ok=True, data=data)
            assert self.memory.resolve(reply)


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Callable[..., tuple[MessageGuestMemory, Wire]]]:
    made: list[MessageGuestMemory] = []

    def build(
        *, answer: bool = True, timeout: float = 5.0, limit: int = 64
    ) -> tuple[MessageGuestMemory, Wire]:
        wire = Wire(answer)
        memory = MessageGuestMemory(
            DmaChannel(limit, timeout), asyncio.get_running_loop(), wire.send, ServerCounters()
        )
        wire.memory = memory
        made.append(memory)
        return memory, wire

    yield build
    for memory in made:
        memory.channel.fail_waiters("test over")
        await memory.aclose()


async def test_reads_and_writes_are_requests_carrying_the_device(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make()
    view = memory.for_device(DEVICE)
    await asyncio.to_thread(view.write, 0x100, b"hello")
    assert await asyncio.to_thread(view.read, 0x100, 5) == b"hello"
    assert [(r.device_id, r.address, r.length, r.write) for r in wire.sent] == [
        (DEVICE, 0x100, 5, True),
        (DEVICE, 0x100, 5, False),
    ]
    assert wire.sent[0].request_id != wire.sent[1].request_id


@pytest.mark.parametrize(
    ("gpa", "length", "needle"),
    [
        (0x1_0000 - 2, 4, "outside guest RAM"),  # runs off the announced RAM
        (0x2_0000, 1, "outside guest RAM"),  # in the hole between regions
        (2**64 - 2, 4, "wraps"),
        (0, MAX_ACCESS + 1, "at most"),  # never a guest-sized allocation
    ],
)
async def test_bad_ranges_fail_without_a_round_trip(
    make: Callable[..., tuple[MessageGuestMemory, Wire]], gpa: int, length: int, needle: str
) -> None:
    memory, wire = make()
    memory.set_map([MemoryRegion(0, 0x1_0000), MemoryRegion(0x3_0000, 0x1000, read_only=True)])
    view = memory.for_device(DEVICE)
    with pytest.raises(GuestMemoryError, match=needle):
        await asyncio.to_thread(view.read, gpa, length)
    assert wire.sent == []


async def test_read_only_ram_and_the_loop_thread(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make()
    memory.set_map([MemoryRegion(0x3_0000, 0x1000, read_only=True)])
    view = memory.for_device(DEVICE)
    with pytest.raises(GuestMemoryError, match="read-only"):
        await asyncio.to_thread(view.write, 0x3_0000, b"x")
    view.check_ram(0x3_0000, 0x1000)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        view.check_ram(0x3_0000, 0x1001)
    # On the event loop a reply could never be read: refused at once, no hang.
    with pytest.raises(GuestMemoryError, match="event loop"):
        view.read(0x3_0000, 4)
    assert wire.sent == []


async def test_an_unanswered_request_times_out_and_its_late_reply_is_dropped(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False, timeout=0.2)
    view = memory.for_device(DEVICE)
    with pytest.raises(GuestMemoryError, match=r"did not answer DMA request 1 within 0\.2 s"):
        await asyncio.to_thread(view.read, 0, 2)
    assert len(wire.sent) == 1
    late = pb.DmaReply(request_id=1, ok=True, data=b"ab")
    assert memory.resolve(late)  # taken (and dropped) ...
    assert not memory.resolve(late)  # ... once: a second one is nobody's
    assert memory._counters.devices[DEVICE].dma_errors == 1


async def test_failing_the_waiters_wakes_a_worker_at_once(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False, timeout=60)
    view = memory.for_device(DEVICE)
    worker = asyncio.ensure_future(asyncio.to_thread(view.read, 0, 2))
    await asyncio.wait_for(wire.arrived.wait(), 10)
    memory.channel.fail_waiters("the frontend's stream ended")
    with pytest.raises(GuestMemoryError, match="stream ended"):
        await asyncio.wait_for(worker, 10)
    with pytest.raises(GuestMemoryError, match="stream ended"):  # and none start after
        await asyncio.to_thread(view.read, 0, 2)


async def test_what_is_owed_is_bounded(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False, timeout=60, limit=1)
    view = memory.for_device(DEVICE)
    first = asyncio.ensure_future(asyncio.to_thread(view.read, 0, 2))
    await asyncio.wait_for(wire.arrived.wait(), 10)
    with pytest.raises(GuestMemoryError, match="already owes 1"):
        await asyncio.to_thread(view.read, 2, 2)
    assert memory.resolve(pb.DmaReply(request_id=wire.sent[0].request_id, ok=True, data=b"ok"))
    assert await first == b"ok"


# ---------------------------------------------------------------- read-ahead


def _write(seq: int, size: int = 8) -> pb.Request:
    return pb.Request(seq=seq, bar_write=pb.BarWrite(device_id=1, bar=0, size=size))


async def test_read_ahead_hands_replies_over_while_the_serve_loop_is_stuck() -> None:
    incoming: asyncio.Queue[object] = asyncio.Queue()
    consumed: list[int] = []
    ended: list[str] = []
    counters = ServerCounters()

    def consume(reply: pb.DmaReply) -> bool:
        consumed.append(reply.request_id)
        return reply.request_id < 100  # ours; the rest are someone else's

    reader = ReadAhead(incoming.get, consume, ended.append, counters, limit=2000)
    try:
        for seq in range(20):  # requests nobody serves yet: about 220 bytes each
            incoming.put_nowait(pb.FrontendMessage(requests=[_write(seq)]))
        incoming.put_nowait(
            pb.FrontendMessage(
                requests=[pb.Request(dma_reply=pb.DmaReply(request_id=5)), _write(99)]
            )
        )
        await asyncio.sleep(0.05)
        assert consumed == []  # the bound stopped reading: back-pressure
        assert reader.queued <= 2000 + 300
        got = [await reader.next() for _ in range(20)]
        assert [r[0].seq for r in got if r] == list(range(20))
        assert await reader.next() == [_write(99)]  # the reply left the message
        assert consumed == [5]
        incoming.put_nowait(
            pb.FrontendMessage(requests=[pb.Request(dma_reply=pb.DmaReply(request_id=200))])
        )
        [other] = await reader.next() or []
        assert other.dma_reply.request_id == 200  # not ours: served in order
        incoming.put_nowait(object())  # the stream's end (grpc.aio.EOF)
        assert await reader.next() is None
        assert ended == ["the frontend's stream ended"]
        assert (counters.frontend_messages, counters.requests) == (22, 1)
    finally:
        await reader.aclose()


async def test_read_ahead_passes_a_stream_error_on() -> None:
    ended: list[str] = []

    async def broken() -> object:
        raise ConnectionResetError("gone")

    reader = ReadAhead(broken, lambda _: False, ended.append, ServerCounters())
    with pytest.raises(ConnectionResetError):
        await reader.next()
    assert ended == ["the frontend's stream failed"]
    await reader.aclose()


def test_channel_ids_are_unique_across_threads() -> None:
    channel = DmaChannel(limit=10_000)
    ids: list[int] = []

    def take() -> None:
        for _ in range(1000):
            request_id = channel.allocate(object())  # type: ignore[arg-type]
            assert request_id is not None
            ids.append(request_id)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == list(range(1, 4001))


# ---------------------------------------------------------------- posted writes (DeviceDma)


def _answer(
    memory: MessageGuestMemory, wire: Wire, request: pb.DmaRequest, ok: bool = True
) -> None:
    """Answer one request the wire held back (Wire(answer=False))."""
    if not ok:
        reply = pb.DmaReply(request_id=request.request_id, ok=False, error="no RAM there")
    elif request.write:
        wire.ram[request.address : request.address + request.length] = request.data
        reply = pb.DmaReply(request_id=request.request_id, ok=True)
    else:
        data = bytes(wire.ram[request.address : request.address + request.length])
        reply = pb.DmaReply(request_id=request.request_id, ok=True, data=data)
    assert memory.resolve(reply)


async def _sent(wire: Wire, count: int) -> None:
    for _ in range(1000):
        if len(wire.sent) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(wire.sent)} of {count} requests went out")


async def test_writes_are_posted_and_a_fence_waits_for_them(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False)
    view = memory.for_device(DEVICE)
    await asyncio.to_thread(view.write, 0x100, b"aa")  # returns unanswered
    await asyncio.to_thread(view.write, 0x200, b"bb")
    await _sent(wire, 2)
    fence = asyncio.ensure_future(asyncio.to_thread(view.fence))
    # A read of other bytes goes out while the writes are still owed.
    read = asyncio.ensure_future(asyncio.to_thread(view.read, 0x300, 2))
    await _sent(wire, 3)
    assert not fence.done()
    _answer(memory, wire, wire.sent[2])
    assert await read == b"\0\0"
    for request in wire.sent[:2]:
        _answer(memory, wire, request)
    await asyncio.wait_for(fence, 10)
    assert wire.ram[0x100:0x102] == b"aa" and wire.ram[0x200:0x202] == b"bb"


async def test_the_same_bytes_stay_in_program_order(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False)
    view = memory.for_device(DEVICE)
    await asyncio.to_thread(view.write, 0x100, b"old!")
    # A read and a write touching those bytes wait for the posted write first.
    read = asyncio.ensure_future(asyncio.to_thread(view.read, 0x102, 4))
    await asyncio.sleep(0.05)
    assert len(wire.sent) == 1
    _answer(memory, wire, wire.sent[0])
    await _sent(wire, 2)
    _answer(memory, wire, wire.sent[1])
    assert await read == b"d!\0\0"
    await asyncio.to_thread(view.write, 0x100, b"new!")
    write = asyncio.ensure_future(asyncio.to_thread(view.write, 0x103, b"?"))
    await asyncio.sleep(0.05)
    assert len(wire.sent) == 3 and not write.done()
    _answer(memory, wire, wire.sent[2])
    await asyncio.wait_for(write, 10)
    _answer(memory, wire, wire.sent[3])
    await asyncio.to_thread(view.fence)
    assert wire.ram[0x100:0x104] == b"new?"


async def test_a_failed_posted_write_surfaces_at_the_fence(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False)
    view = memory.for_device(DEVICE)
    await asyncio.to_thread(view.write, 0x100, b"a")
    await asyncio.to_thread(view.write, 0x200, b"b")
    await _sent(wire, 2)
    _answer(memory, wire, wire.sent[0], ok=False)
    _answer(memory, wire, wire.sent[1])
    with pytest.raises(GuestMemoryError, match=r"writing 1 bytes at 0x100: no RAM there"):
        await asyncio.to_thread(view.fence)
    assert wire.ram[0x200] == ord("b")  # the other write was waited for too
    await asyncio.to_thread(view.fence)  # reported once


async def test_posted_writes_are_bounded(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False)
    view = memory.for_device(DEVICE)

    def post(count: int) -> None:
        for i in range(count):
            view.write(0x10 * i, b"x")

    await asyncio.to_thread(post, dma_messages.MAX_POSTED)
    more = asyncio.ensure_future(asyncio.to_thread(post, 1))
    await asyncio.sleep(0.05)
    assert not more.done() and len(wire.sent) == dma_messages.MAX_POSTED
    for request in list(wire.sent):
        _answer(memory, wire, request)
    await asyncio.wait_for(more, 10)


async def test_bad_writes_are_refused_at_once_not_at_the_fence(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False)
    memory.set_map([MemoryRegion(0, 0x1_0000)])
    view = memory.for_device(DEVICE)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        await asyncio.to_thread(view.write, 0xFFFF, b"ab")
    with pytest.raises(GuestMemoryError, match="event loop"):
        view.write(0, b"a")
    assert wire.sent == []


# ---------------------------------------------------------------- the epoch


async def test_the_epoch_moves_only_when_it_is_wired_and_requests_arrive(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False)
    view = memory.for_device(DEVICE)
    assert view.epoch() != view.epoch()  # nobody reports arrivals: never the same twice
    incoming: asyncio.Queue[object] = asyncio.Queue()
    reader = ReadAhead(incoming.get, memory.resolve, lambda _: None, ServerCounters())
    try:
        before = view.epoch()
        assert view.epoch() == before
        read = asyncio.ensure_future(asyncio.to_thread(view.read, 0, 2))
        await _sent(wire, 1)
        reply = pb.DmaReply(request_id=wire.sent[0].request_id, ok=True, data=b"ok")
        incoming.put_nowait(pb.FrontendMessage(requests=[pb.Request(dma_reply=reply)]))
        assert await asyncio.wait_for(read, 10) == b"ok"
        assert view.epoch() == before  # a reply a worker took is not news
        incoming.put_nowait(pb.FrontendMessage(requests=[_write(1)]))
        assert await reader.next() == [_write(1)]
        assert view.epoch() != before  # a kick may be among them
    finally:
        await reader.aclose()


async def test_devices_together_post_at_most_half_of_what_may_be_owed(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False, limit=4)
    first, second = memory.for_device(DEVICE), memory.for_device(DEVICE + 1)
    await asyncio.to_thread(first.write, 0x100, b"a")
    await asyncio.to_thread(first.write, 0x200, b"b")  # the session's share: 2 of 4
    blocked = asyncio.ensure_future(asyncio.to_thread(second.write, 0x300, b"c"))
    await _sent(wire, 3)
    await asyncio.sleep(0.05)
    assert not blocked.done()  # sent, but waited for as before posting
    _answer(memory, wire, wire.sent[2])
    await asyncio.wait_for(blocked, 10)
    for request in wire.sent[:2]:
        _answer(memory, wire, request)
    await asyncio.to_thread(first.fence)
    assert bytes([wire.ram[0x100], wire.ram[0x200], wire.ram[0x300]]) == b"abc"


async def test_a_fence_gives_up_after_one_timeout_and_drops_the_late_replies(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False, timeout=0.2)
    view = memory.for_device(DEVICE)
    for i in range(3):
        await asyncio.to_thread(view.write, 0x100 * i, b"x")
    with pytest.raises(GuestMemoryError, match="did not answer DMA request 1"):
        await asyncio.to_thread(view.fence)
    for request in wire.sent:  # each was given up: its late reply is dropped quietly
        assert memory.resolve(pb.DmaReply(request_id=request.request_id, ok=True))
    assert memory._counters.devices[DEVICE].dma_errors == 3


async def test_a_scattered_read_has_its_pieces_in_flight_together(
    make: Callable[..., tuple[MessageGuestMemory, Wire]],
) -> None:
    memory, wire = make(answer=False)
    wire.ram[0x100:0x103] = b"abc"
    wire.ram[0x200:0x202] = b"de"
    view = memory.for_device(DEVICE)
    pieces = [(0x100, 3), (0x200, 2), (0x300, 0), (0x400, 1)]
    many = asyncio.ensure_future(asyncio.to_thread(view.read_many, pieces))
    await _sent(wire, 3)  # all three non-empty pieces before any answer
    for request in reversed(wire.sent):  # answered in any order
        _answer(memory, wire, request)
    assert await asyncio.wait_for(many, 10) == [b"abc", b"de", b"", b"\0"]
    memory.set_map([MemoryRegion(0, 0x1000)])
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):  # none goes out
        await asyncio.to_thread(view.read_many, [(0x100, 1), (0x2000, 1)])
    assert len(wire.sent) == 3
