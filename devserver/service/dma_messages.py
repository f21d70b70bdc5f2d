"""Guest memory over the Attach stream (MEMORY_MODE_DMA_MESSAGES): the server on
another host reaches guest RAM only by asking the frontend.

Every transfer is a DmaRequest event; the frontend answers with a DmaReply,
matched by request_id, in any order. Two kinds of callers share one id space
and one bound (protocol.MAX_DMA_OUTSTANDING owed at once, `DmaChannel`):

- the test device's DMA engine (a `DmaRequested` effect, `PendingDma`): it never
  waits, the reply completes it later (emit.py: _dma / dma_reply);
- virtio devices, whose queue code reads and writes guest memory synchronously
  (devserver.virtio: `RingMemory`). They run in a worker thread
  (virtio_runner.py: serve_virtio, _run_pending), so `MessageGuestMemory` blocks that
  thread on a concurrent.futures.Future while the event loop sends the request
  and, when the reply arrives, resolves the future. The same device code runs
  in both memory modes; only the RingMemory it is given differs.

A reply the worker waits for sits in the stream behind whatever the frontend
sent after it, and requests are served in order, one device access at a time:
a BAR read of the device that is waiting would wait for its own reply. So
`ReadAhead` reads the stream ahead of the serve loop (a bounded number of
bytes: back-pressure stays) and answers workers' replies at once. The serve
loop itself still waits for the kick, as in SHARED mode: requests after it, to
any device, are served once its bounded step is done.

Nothing waits forever: a transfer the frontend leaves unanswered for
`DmaChannel.timeout` seconds fails (the worker's read or write raises
GuestMemoryError, which the queue code turns into DEVICE_NEEDS_RESET; the test
device's transfer completes with an error status), its id is remembered for a
while so a late reply is dropped rather than taken for a protocol error, and
the stream and the other devices go on. A stream that ends fails every waiting
transfer at once.

Bounds (reliability.md C3, C4): every range is checked as devserver.memory
checks it (64-bit, no wrap, at most MAX_ACCESS bytes a call, so a guest's
length never becomes an allocation; a reply must carry exactly the length
asked); if the frontend announced its RAM (Hello.memory.regions,
MemoryMapUpdate) ranges outside it fail here without a round trip, otherwise
the frontend is the judge of what is RAM and says so in its reply.

Cost: one round trip per access, so the queue code makes as few as it can
when its memory is a `DeviceDma` (a BatchedRingMemory, devserver.virtio.chain):
avail.idx once per batch of chains, the descriptor table and available ring
in one request, writes posted (several in flight, fenced where the spec orders
them), used_event and a fresh avail.idx in one request, and an "empty"
verdict kept until the frontend sends anything (the `epoch`, moved by
ReadAhead); requests queued back to back go out as one stream message. A QD1
4 KiB virtio-blk read went from 14 requests one after another to 9, six of
them waited for in turn (6.6 ms to 3.4 ms against 0.7 ms in SHARED), 8 reads
a kick from 12.2 to 6.4 requests each (bench/results/messages.md:
`python -m bench.messages`). A server on the same host should still use SHARED.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from devmodel.v1 import devmodel_pb2 as pb

from ..effects import DmaRequested
from ..errors import GuestMemoryError
from ..memory import ADDRESS_SPACE, MemoryRegion, check_range
from .convert import event_to_pb
from .protocol import MAX_DMA_BYTES
from .stats import ServerCounters

log = logging.getLogger(__name__)

# Seconds a frontend has to answer one DmaRequest. Well above a loaded gRPC
# round trip (milliseconds), well below anything a person would call a hang.
DMA_TIMEOUT: Final = 10.0
# Requests read ahead of the serve loop, in bytes (see ReadAhead).
READ_AHEAD_BYTES: Final = 8 * 1024 * 1024
_REQUEST_COST: Final = 200
# Timed-out request ids remembered, so their late replies are dropped quietly.
_EXPIRED_KEPT: Final = 1024
# Writes one device may have posted and not yet fenced (DeviceDma): well under
# the MAX_DMA_OUTSTANDING the session's devices share, and bytes held for them.
MAX_POSTED: Final = 16
MAX_POSTED_BYTES: Final = 4 * 1024 * 1024

Sender = Callable[[list[pb.ServerItem]], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class PendingDma:
    """A DmaRequest event for a device's asynchronous DMA engine, not answered yet."""

    device_id: int
    token: int
    length: int
    write: bool


@dataclass(frozen=True, slots=True)
class Sent:
    """A worker's request on its way: wait for `future` (MessageGuestMemory.wait)."""

    request_id: int
    future: concurrent.futures.Future[bytes]


@dataclass(eq=False, slots=True)
class Waiter:
    """A worker thread's transfer, blocked until the reply resolves `future`."""

    device_id: int
    length: int
    write: bool
    future: concurrent.futures.Future[bytes]


def reply_outcome(reply: pb.DmaReply, length: int, write: bool) -> tuple[bytes | None, str | None]:
    """(data read, None) or (None, error) for a reply to a `length`-byte transfer."""
    if reply.ok and write:
        return None, None
    if reply.ok and len(reply.data) == length:
        return bytes(reply.data), None
    if reply.ok:
        return None, f"the frontend returned {len(reply.data)} bytes for a {length}-byte read"
    return None, reply.error or "the frontend refused the transfer"


class DmaChannel:
    """One session's DMA request ids and what the frontend owes; thread-safe
    (worker threads start transfers, the event loop answers them)."""

    def __init__(self, limit: int, timeout: float = DMA_TIMEOUT) -> None:
        self.limit = limit
        self.timeout = timeout
        self.closed: str | None = None  # why no more transfers start
        self._lock = threading.Lock()
        self._next_id = 1
        self._owed: dict[int, PendingDma | Waiter] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._expired: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owed)

    def refusal(self) -> str:
        return self.closed or f"the frontend already owes {self.limit} DMA replies"

    def allocate(self, entry: PendingDma | Waiter) -> int | None:
        """A request id now owed for `entry`; None if closed or at the limit."""
        with self._lock:
            if self.closed is not None or len(self._owed) >= self.limit:
                return None
            request_id = self._next_id
            self._next_id += 1
            self._owed[request_id] = entry
            return request_id

    def set_timer(self, request_id: int, handle: asyncio.TimerHandle) -> None:
        with self._lock:
            if request_id in self._owed:
                self._timers[request_id] = handle
                return
        handle.cancel()  # answered (or failed) already

    def owes(self, request_id: int) -> bool:
        return request_id in self._owed

    def take(self, request_id: int) -> PendingDma | Waiter | None:
        """The owed entry a reply answers (no longer owed), or None."""
        with self._lock:
            entry = self._owed.pop(request_id, None)
            timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        return entry

    def take_waiter(self, request_id: int) -> Waiter | None:
        """Like take(), but only a worker's transfer."""
        with self._lock:
            entry = self._owed.get(request_id)
            if not isinstance(entry, Waiter):
                return None
            del self._owed[request_id]
            return entry

    def expire(self, request_id: int) -> PendingDma | Waiter | None:
        """Give up on `request_id` (timed out); its late reply will be dropped."""
        with self._lock:
            entry = self._owed.pop(request_id, None)
            self._timers.pop(request_id, None)
            if entry is not None:
                self._expired[request_id] = None
                while len(self._expired) > _EXPIRED_KEPT:
                    self._expired.popitem(last=False)
            return entry

    def late(self, request_id: int) -> bool:
        """True (once) for the reply to a request that timed out."""
        with self._lock:
            if request_id in self._expired:
                del self._expired[request_id]
                return True
            return False

    def fail_waiters(self, reason: str) -> None:
        """Start no more transfers, and wake every worker waiting for a reply."""
        with self._lock:
            if self.closed is None:
                self.closed = reason
            waiters = [(i, e) for i, e in self._owed.items() if isinstance(e, Waiter)]
            for request_id, _ in waiters:
                del self._owed[request_id]
        for _, waiter in waiters:
            _fail(waiter, reason)

    def drain(self, reason: str) -> list[PendingDma]:
        """Close: fail every waiter and return the engines' transfers still owed."""
        self.fail_waiters(reason)
        with self._lock:
            owed, self._owed = self._owed, {}
            timers, self._timers = self._timers, {}
        for timer in timers.values():
            timer.cancel()
        return [entry for entry in owed.values() if isinstance(entry, PendingDma)]


def _fail(waiter: Waiter, reason: str) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        waiter.future.set_exception(GuestMemoryError(reason))


class MessageGuestMemory:
    """Guest memory reached by DmaRequest events; one per session, made on the
    event loop. Devices get a view bound to their device id (`for_device`) and
    use it from worker threads only."""

    def __init__(
        self,
        channel: DmaChannel,
        loop: asyncio.AbstractEventLoop,
        send: Sender,
        counters: ServerCounters,
    ) -> None:
        self.channel = channel
        self.loop = loop
        self._send = send
        self._counters = counters
        self._loop_thread = threading.get_ident()
        # The frontend's RAM as (starts, (start, end, read_only) entries): replaced
        # whole on the loop, so a worker mid-lookup sees the old map or the new.
        self._map: tuple[tuple[int, ...], tuple[tuple[int, int, bool], ...]] = ((), ())
        self._tasks: set[asyncio.Task[None]] = set()
        self._outbox: list[tuple[int, pb.ServerItem]] = []  # requests for the next send
        # Writes posted by every device and not yet fenced: at most half of what
        # the frontend may owe, so posting never starves a synchronous read.
        self._posted = 0
        self._posted_lock = threading.Lock()
        self._epoch = 0  # moved on the loop by ReadAhead; read by workers
        self._epoch_wired = False
        self._ticks = itertools.count(1)

    def for_device(self, device_id: int) -> DeviceDma:
        return DeviceDma(self, device_id)

    def set_map(self, regions: Iterable[MemoryRegion]) -> None:
        entries = tuple(
            sorted((r.guest_address, r.end, r.read_only) for r in regions if r.size > 0)
        )
        self._map = (tuple(start for start, _, _ in entries), entries)

    # -- bounds

    def check_ram(self, gpa: int, length: int, *, write: bool = False) -> None:
        """GuestMemoryError unless [gpa, gpa + length) can be guest RAM: a 64-bit
        range, and inside the frontend's announced RAM if it announced any."""
        if not 0 <= gpa < ADDRESS_SPACE or not 0 <= length <= ADDRESS_SPACE - gpa:
            raise GuestMemoryError(f"[{gpa:#x} +{length:#x}) is not a 64-bit guest range")
        starts, entries = self._map
        if not entries or not length:
            return
        at, end = gpa, gpa + length
        i = bisect.bisect_right(starts, at) - 1
        while at < end:  # one step per region: bounded by the map's size
            if i < 0 or i >= len(entries) or not entries[i][0] <= at < entries[i][1]:
                raise GuestMemoryError(
                    f"[{gpa:#x} +{length:#x}) reaches {at:#x}, outside guest RAM"
                )
            if write and entries[i][2]:
                raise GuestMemoryError(f"guest RAM at {at:#x} is read-only")
            at = entries[i][1]
            i += 1

    # -- transfers (worker threads)

    def transfer(self, device_id: int, gpa: int, length: int, data: bytes | None) -> bytes:
        """Read `length` bytes (data None) or write `data` at `gpa`, waiting for the
        frontend; GuestMemoryError if it cannot be done."""
        end = self.check_transfer(gpa, length, write=data is not None)
        pieces = []
        for at in range(gpa, end, MAX_DMA_BYTES):
            n = min(MAX_DMA_BYTES, end - at)
            chunk = None if data is None else data[at - gpa : at - gpa + n]
            sent = self.start(device_id, at, n, chunk)
            if sent is None:
                raise GuestMemoryError(self.channel.refusal())
            pieces.append(self.wait(device_id, sent))
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def check_transfer(self, gpa: int, length: int, *, write: bool) -> int:
        """The end of a transfer the checks allow (GuestMemoryError otherwise)."""
        end = check_range(gpa, length)  # at most MAX_ACCESS: no guest-sized allocation
        self.check_ram(gpa, length, write=write)
        if length and threading.get_ident() == self._loop_thread:
            # The reply could never be read: the loop would wait for itself.
            raise GuestMemoryError("DMA by message from the event loop (a server bug)")
        return end

    def start(self, device_id: int, gpa: int, length: int, data: bytes | None) -> Sent | None:
        """Send one DmaRequest of at most MAX_DMA_BYTES, checked by the caller
        (check_transfer); None if the frontend already owes its limit."""
        write = data is not None
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        request_id = self.channel.allocate(Waiter(device_id, length, write, future))
        if request_id is None:
            return None
        effect = DmaRequested(device_id, request_id, gpa, length, write, data or b"")
        item = pb.ServerItem(event=event_to_pb(effect, request_id))
        try:
            self.loop.call_soon_threadsafe(self._post, request_id, device_id, item)
        except RuntimeError:  # the loop is gone: the server is stopping
            self.channel.expire(request_id)
            raise GuestMemoryError("the server is stopping") from None
        return Sent(request_id, future)

    def wait(self, device_id: int, sent: Sent, deadline: float | None = None) -> bytes:
        """The reply to a started request: the bytes read (b"" for a write);
        GuestMemoryError if it failed or did not come within the timeout (or
        by `deadline`, a time.monotonic() value: one for a whole fence)."""
        timeout = self.channel.timeout
        wait = timeout if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return sent.future.result(wait)
        except TimeoutError:
            if self.channel.expire(sent.request_id) is None and sent.future.done():
                return sent.future.result()  # answered just as we gave up
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._count, device_id, True)
            raise GuestMemoryError(
                f"the frontend did not answer DMA request {sent.request_id} within {timeout:g} s"
            ) from None

    # -- posted writes (DeviceDma)

    def may_post(self) -> bool:
        return self._posted < self.channel.limit // 2

    def count_posted(self, delta: int) -> None:
        with self._posted_lock:
            self._posted += delta

    # -- the epoch (BatchedRingMemory.epoch)

    def wire_epoch(self) -> None:
        """The session's ReadAhead will call saw_requests for what it reads."""
        self._epoch_wired = True

    def saw_requests(self) -> None:
        """Requests other than DMA replies arrived (a kick among them, maybe)."""
        self._epoch += 1

    def epoch(self) -> int:
        if not self._epoch_wired:
            # Nobody tells us what arrives: a number never seen twice, so no
            # queue keeps an "empty" verdict.
            return -next(self._ticks)
        return self._epoch

    # -- the loop's side

    def _count(self, device_id: int, error: bool) -> None:
        counters = self._counters.devices[device_id]
        if error:
            counters.dma_errors += 1
        else:
            counters.dma_requests += 1

    def _post(self, request_id: int, device_id: int, item: pb.ServerItem) -> None:
        if not self.channel.owes(request_id):
            return  # failed or timed out before the loop got to it
        self._count(device_id, False)
        self._counters.events += 1
        self._outbox.append((request_id, item))
        if len(self._outbox) == 1:
            # One task sends what gathers before it runs: a worker's posted
            # writes, queued back to back, go out as one stream message.
            task = self.loop.create_task(self._deliver(), name="DmaRequest")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self) -> None:
        batch, self._outbox = self._outbox, []
        try:
            await self._send([item for _, item in batch])
        except Exception as e:  # the stream broke: no reply can come
            for request_id, _ in batch:
                waiter = self.channel.take_waiter(request_id)
                if waiter is not None:
                    self._count(waiter.device_id, True)
                    _fail(waiter, f"sending DMA request {request_id} failed: {e}")

    def resolve(self, reply: pb.DmaReply) -> bool:
        """Hand a reply to the worker waiting for it; True if it was one (or the
        late reply to a timed-out request), False if it is someone else's."""
        waiter = self.channel.take_waiter(reply.request_id)
        if waiter is None:
            if self.channel.late(reply.request_id):
                log.debug("dropped the late reply to DMA request %d", reply.request_id)
                return True
            return False
        data, error = reply_outcome(reply, waiter.length, waiter.write)
        if error is not None:
            self._count(waiter.device_id, True)
            log.debug("device %d: DMA %d failed: %s", waiter.device_id, reply.request_id, error)
            _fail(waiter, error)
        else:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                waiter.future.set_result(data or b"")
        return True

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class DeviceDma:
    """MessageGuestMemory as one device's RingMemory (requests carry its id), and
    a BatchedRingMemory (devserver.virtio.chain): its queues read rings whole
    and its writes are posted.

    A write returns once its DmaRequest is on its way; `fence` waits for every
    write posted so far and raises the first failure. Between fences the
    frontend may carry the writes out in any order, so the queue fences where
    the spec orders them (a used element, and the buffers it returns, before
    used.idx; used.idx and avail_event before it reads the driver's fields
    again). A read waits for posted writes first when it overlaps one, and a
    write overlapping one waits too: the same bytes stay in program order. At
    most MAX_POSTED writes (MAX_POSTED_BYTES) are in flight per device; a
    write past that fences first, and all devices together post at most half
    of what the frontend may owe (the rest of a device's writes wait as
    before). Used by one worker at a time (the device's lock), so its list of
    posted writes needs no lock of its own.
    """

    __slots__ = ("_posted", "_posted_bytes", "device_id", "memory")

    def __init__(self, memory: MessageGuestMemory, device_id: int) -> None:
        self.memory = memory
        self.device_id = device_id
        self._posted: list[tuple[int, int, Sent]] = []  # (gpa, length, request)
        self._posted_bytes = 0

    def read(self, gpa: int, length: int) -> bytes:
        if self._posted and self._overlaps(gpa, length):
            self.fence()
        return self.memory.transfer(self.device_id, gpa, length, None)

    def read_many(self, pieces: Sequence[tuple[int, int]]) -> list[bytes]:
        """Each piece's bytes, up to MAX_POSTED requests in flight at once."""
        if self._posted and any(self._overlaps(gpa, length) for gpa, length in pieces):
            self.fence()
        memory = self.memory
        for gpa, length in pieces:  # every piece refused before any goes out
            memory.check_transfer(gpa, length, write=False)
        out = [b""] * len(pieces)
        flight: list[tuple[int, Sent]] = []
        for i, (gpa, length) in enumerate(pieces):
            if length > MAX_DMA_BYTES:  # not from a Reader (MAX_COPY); one at a time
                out[i] = memory.transfer(self.device_id, gpa, length, None)
                continue
            if not length:
                continue
            sent = memory.start(self.device_id, gpa, length, None)
            if sent is None:  # the channel is full: take in what is in flight first
                self._collect(flight, out)
                sent = memory.start(self.device_id, gpa, length, None)
                if sent is None:
                    raise GuestMemoryError(memory.channel.refusal())
            flight.append((i, sent))
            if len(flight) >= MAX_POSTED:
                self._collect(flight, out)
        self._collect(flight, out)
        return out

    def _collect(self, flight: list[tuple[int, Sent]], out: list[bytes]) -> None:
        """Wait for the reads in flight (one timeout for all), into `out`; empties
        `flight`; the first failure is raised once all are in."""
        taken = list(flight)
        flight.clear()
        error: GuestMemoryError | None = None
        deadline = time.monotonic() + self.memory.channel.timeout
        for i, sent in taken:
            try:
                out[i] = self.memory.wait(self.device_id, sent, deadline)
            except GuestMemoryError as e:
                error = error or e
        if error is not None:
            raise error

    def write(self, gpa: int, data: bytes) -> None:
        data = bytes(data)
        length = len(data)
        end = self.memory.check_transfer(gpa, length, write=True)  # refused now, not later
        if not length:
            return
        memory = self.memory
        if (
            len(self._posted) >= MAX_POSTED
            or self._posted_bytes + length > MAX_POSTED_BYTES
            or self._overlaps(gpa, length)
            or (self._posted and not memory.may_post())
        ):
            self.fence()
        for at in range(gpa, end, MAX_DMA_BYTES):
            n = min(MAX_DMA_BYTES, end - at)
            chunk = data[at - gpa : at - gpa + n]
            sent = memory.start(self.device_id, at, n, chunk)
            if sent is None:  # the channel is full, perhaps of our own writes
                self.fence()
                sent = memory.start(self.device_id, at, n, chunk)
                if sent is None:
                    raise GuestMemoryError(memory.channel.refusal())
            if memory.may_post():
                memory.count_posted(1)
                self._posted.append((at, n, sent))
                self._posted_bytes += n
            else:  # other devices hold the session's share: wait, as before posting
                memory.wait(self.device_id, sent)

    def fence(self) -> None:
        posted, self._posted, self._posted_bytes = self._posted, [], 0
        if not posted:
            return
        self.memory.count_posted(-len(posted))
        error: GuestMemoryError | None = None
        deadline = time.monotonic() + self.memory.channel.timeout  # one timeout in all
        for gpa, length, sent in posted:  # wait for all, even after a failure
            try:
                self.memory.wait(self.device_id, sent, deadline)
            except GuestMemoryError as e:
                if error is None:
                    error = GuestMemoryError(f"writing {length} bytes at {gpa:#x}: {e}")
        if error is not None:
            raise error

    def epoch(self) -> int:
        return self.memory.epoch()

    def check_ram(self, gpa: int, length: int) -> None:
        self.memory.check_ram(gpa, length)

    def _overlaps(self, gpa: int, length: int) -> bool:
        end = gpa + length
        return any(at < end and gpa < at + n for at, n, _ in self._posted)


class ReadAhead:
    """Reads a session's stream ahead of its serve loop and hands workers' DMA
    replies over the moment they arrive (`consume`); the requests left wait, in
    order, for the serve loop (`next`).

    What waits is bounded (READ_AHEAD_BYTES, each request charged its wire size
    plus _REQUEST_COST for its Python objects): a frontend that floods while the
    serve loop is held up is not read from until it catches up, as before. A
    worker whose reply is then stuck behind the flood times out (its device
    latches NEEDS_RESET) rather than the server growing without bound.

    It also moves the session's MessageGuestMemory epoch for every request it
    passes on (a kick may be among them): `messages`, or else the owner of
    `consume` when that is MessageGuestMemory.resolve, as the shell passes it.
    """

    def __init__(
        self,
        read: Callable[[], Awaitable[object]],
        consume: Callable[[pb.DmaReply], bool],
        on_end: Callable[[str], None],
        counters: ServerCounters,
        limit: int = READ_AHEAD_BYTES,
        messages: MessageGuestMemory | None = None,
    ) -> None:
        self._read = read
        self._consume = consume
        if messages is None:
            owner = getattr(consume, "__self__", None)
            messages = owner if isinstance(owner, MessageGuestMemory) else None
        self._messages = messages
        if messages is not None:
            messages.wire_epoch()
        self._on_end = on_end
        self._counters = counters
        self.limit = limit
        self.queued = 0  # charged bytes waiting for the serve loop
        self._queue: asyncio.Queue[tuple[list[pb.Request], int] | BaseException | None] = (
            asyncio.Queue()
        )
        self._room = asyncio.Event()
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="read-ahead")

    async def _run(self) -> None:
        try:
            while True:
                message = await self._read()
                if not isinstance(message, pb.FrontendMessage):  # grpc.aio.EOF
                    break
                self._counters.frontend_messages += 1
                rest = [
                    r
                    for r in message.requests
                    if r.WhichOneof("kind") != "dma_reply" or not self._consume(r.dma_reply)
                ]
                self._counters.requests += len(message.requests) - len(rest)
                if not rest:
                    continue  # only replies: nothing for the serve loop
                if self._messages is not None:
                    # Before the serve loop can see them: a queue's "empty"
                    # verdict must not outlive a kick (SplitQueue._empty_seen).
                    self._messages.saw_requests()
                cost = sum(r.ByteSize() + _REQUEST_COST for r in rest)
                while self.queued and self.queued + cost > self.limit:
                    self._room.clear()
                    await self._room.wait()
                self.queued += cost
                self._queue.put_nowait((rest, cost))
        except asyncio.CancelledError as e:
            if self._closing:
                raise
            self._on_end("the frontend's stream was cancelled")
            self._queue.put_nowait(e)
            return
        except Exception as e:
            self._on_end("the frontend's stream failed")
            self._queue.put_nowait(e)
            return
        self._on_end("the frontend's stream ended")
        self._queue.put_nowait(None)

    async def next(self) -> list[pb.Request] | None:
        """The next message's requests still to serve; None at the stream's end."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            return None
        requests, cost = item
        self.queued -= cost
        self._room.set()
        return requests

    async def aclose(self) -> None:
        self._closing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
