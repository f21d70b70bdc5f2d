"""DeviceModel servicer: decode a request, call the core, stream its effects.

One frontend is attached at a time; it owns the devices until its stream
ends. Each FrontendMessage is handled to the end before the next is read, and
everything it produced (events first, then the replies they precede) goes out
as one ServerMessage. A request no PCI bus could carry ends the stream with
INVALID_ARGUMENT naming the request; the server and its other streams go on.

DMA: a device's DmaRequested effect is carried out here, by memory mode
(Hello.memory.mode):
  SHARED        at once, against the frontend's RAM files mapped by
                SharedGuestMemory, and completed before anything else the
                same request caused goes out;
  DMA_MESSAGES  as a DmaRequest event; the frontend's DmaReply (any time
                later, matched by request_id) completes it. Nothing waits for
                the reply: the vCPU may be blocked on a read that must be
                answered meanwhile (qemu-vfio-user.md §4, caveat 3). At most
                MAX_DMA_OUTSTANDING are owed (dma_messages.DmaChannel); one
                unanswered for the DMA timeout fails; a session's end fails them;
  NONE          completed at once with an error.
An address outside guest RAM completes the transfer with an error, which the
device turns into its error status; it never ends the stream. The frontend's
map may change after Hello (MemoryMapUpdate), validated like Hello's.

Virtio functions (virtio 1.2 §4.1) run their rings in the session's guest
memory: shared RAM, or in DMA_MESSAGES a MessageGuestMemory whose reads and
writes block the worker thread on a DmaRequest round trip (dma_messages.py;
the stream is read ahead so those replies are never stuck behind the requests
that wait for them). It is attached to each one at Hello and again after
every MemoryMapUpdate. With NONE a driver's DRIVER_OK latches
DEVICE_NEEDS_RESET (logged at attach). A BAR or config write to a virtio
function can run the device (a kick: disk I/O, DMA by message), so it runs in
a worker thread, never on the event
loop; one asyncio.Lock per device keeps its accesses and its continuations
from ever interleaving on its state (reliability.md C7). A kick does bounded
work (QUEUE_WEIGHT chains, C8); what remains runs as continuation tasks on the
loop, each turn one more bounded step, its interrupts sent as their own
message (writes to the stream are serialised by a lock).

virtio-console's host ends (sockets, ptys, stdio) are served on this loop from
server start by console_pump.py; what they wake a device to do comes back here
as effects to send (_deliver_console).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc

from ..backends.file_block import FileBlockBackend, open_block_backends
from ..backends.framebuffer_memfd import MemfdFramebuffer, open_framebuffers
from ..config import DeviceSpec, build_bus
from ..devices.framebuffer import BochsDisplay
from ..effects import AddressRange, BarDecodeChanged, DmaRequested, Effect, IntxChanged, MsiRaised
from ..errors import AccessError, ConfigError, MemoryMapError
from ..memory import MAX_REGIONS, MemoryTable, perform_dma
from ..pci.bus import PciBus
from ..pci.function import PciFunction, Presentation
from ..virtio.pci_transport import VirtioPciFunction
from . import dma_messages
from .console_pump import ConsolePump
from .convert import (
    display_mode_to_pb,
    event_to_pb,
    region_from_pb,
    split_items,
    topology_to_pb,
)
from .dma_messages import DmaChannel, MessageGuestMemory, PendingDma, ReadAhead, reply_outcome
from .guest_memory import SharedGuestMemory
from .protocol import (
    FEATURES,
    MAX_DMA_BYTES,
    MAX_DMA_OUTSTANDING,
    MAX_SCREENDUMP_BYTES,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
)
from .stats import ServerCounters

log = logging.getLogger(__name__)

# DMA a single request may set off in SHARED mode, where each completion runs
# at once and may start another transfer: a device model that chains forever
# is cut off here (and logged) instead of spinning the event loop.
_MAX_DMA_PER_REQUEST = 256
_MODES = (pb.MEMORY_MODE_SHARED, pb.MEMORY_MODE_DMA_MESSAGES, pb.MEMORY_MODE_NONE)


class RequestError(Exception):
    """A request that ends the stream: (gRPC status, message for a person)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Session:
    session_id: int
    frontend_name: str
    bus: PciBus
    mode: int  # pb.MemoryMode
    memory: SharedGuestMemory | MemoryTable
    # DMA_MESSAGES: what the frontend owes (read at session start: tests shrink it)
    dma: DmaChannel = field(
        default_factory=lambda: DmaChannel(MAX_DMA_OUTSTANDING, dma_messages.DMA_TIMEOUT)
    )
    messages: MessageGuestMemory | None = None  # DMA_MESSAGES, once the stream is up
    send: dma_messages.Sender | None = None  # a message of items, on the stream
    background: set[asyncio.Task[None]] = field(default_factory=set)
    # Per-device serialisation of virtio work (C7), the stream's write lock and
    # the continuation tasks of devices that ran out of budget (C8).
    device_locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    continuations: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    # Console receive wakes (host bytes arrived): a task per device, and the
    # devices woken again while theirs ran.
    rx_wakes: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    rx_again: set[int] = field(default_factory=set)
    closed: bool = False

    def virtio_functions(self) -> list[VirtioPciFunction]:
        return [f for _, f in self.bus if isinstance(f, VirtioPciFunction)]

    def attach_memory(self) -> None:
        """(Re-)attach guest memory to every virtio function: shared RAM, DMA by
        message (each function's requests carry its id), or None (NONE)."""
        memory = self.memory if isinstance(self.memory, SharedGuestMemory) else None
        messages = self.messages
        if messages is not None and isinstance(self.memory, MemoryTable):
            messages.set_map(entry.value for entry in self.memory.regions)
        for function in self.virtio_functions():
            if messages is not None:
                function.attach_memory(messages.for_device(function.device_id))
            else:
                function.attach_memory(memory)


def _map_error(error: MemoryMapError, prefix: str = "") -> RequestError:
    code = (
        grpc.StatusCode.FAILED_PRECONDITION
        if error.unreachable
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    return RequestError(code, f"{prefix}{error}")


def open_memory(memory: pb.GuestMemoryAccess) -> SharedGuestMemory | MemoryTable:
    """The session's guest memory from Hello.memory, validated like any input
    (reliability.md C12); in SHARED mode every region is mapped."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if memory.mode == pb.MEMORY_MODE_UNSPECIFIED:
        raise RequestError(bad, "Hello.memory.mode is unset: choose SHARED, DMA_MESSAGES or NONE")
    if memory.mode not in _MODES:
        raise RequestError(bad, f"Hello.memory.mode {memory.mode} is not a MemoryMode")
    if len(memory.regions) > MAX_REGIONS:
        raise RequestError(
            bad, f"Hello.memory has {len(memory.regions)} regions; at most {MAX_REGIONS}"
        )
    table = SharedGuestMemory() if memory.mode == pb.MEMORY_MODE_SHARED else MemoryTable()
    try:
        table.update([region_from_pb(r) for r in memory.regions], add_name="Hello.memory.regions")
    except MemoryMapError as e:
        table.close()
        raise _map_error(e) from None
    return table


class DeviceModelServicer(devmodel_pb2_grpc.DeviceModelServicer):
    def __init__(self, specs: Sequence[DeviceSpec], server_name: str = "devserver") -> None:
        self._specs = list(specs)
        self.server_name = server_name
        self.counters = ServerCounters()
        # Disk images open once, at start (a bad one is a ConfigError now, not at
        # attach); every session's devices share them. close() lets them go.
        self._block_backends: dict[int, FileBlockBackend] = open_block_backends(self._specs)
        self._consoles = ConsolePump([], self.counters)
        self._framebuffers: dict[int, MemfdFramebuffer] = {}
        try:
            # A vesa-fb's VRAM memfd lives as long as the server (every session maps it).
            self._framebuffers = open_framebuffers(self._specs)
            # Console host ends open from the start too (served once start() runs).
            self._consoles = ConsolePump(self._specs, self.counters)
            # what Topology shows before any attach
            self._default_bus = build_bus(
                self._specs,
                block_backends=self._block_backends,
                streams=self._consoles.streams,
                framebuffers=self._framebuffers,
                console_ports=self._consoles.ports,
            )
            self._consoles.count_drops(self._default_bus)
        except BaseException:
            self.close()
            raise
        self._session: Session | None = None
        self._next_session = 1

    async def start(self) -> None:
        """Serve the console host ends on the running loop."""
        await self._consoles.start()

    async def aclose(self) -> None:
        """close(), after the console host ends are let go on the loop."""
        await self._consoles.aclose()
        self.close()

    def close(self) -> None:
        """Release host resources (disk images, sockets); the server has stopped."""
        backends, self._block_backends = self._block_backends, {}
        for backend in backends.values():
            backend.close()
        self._consoles.close()
        framebuffers, self._framebuffers = self._framebuffers, {}
        for framebuffer in framebuffers.values():
            framebuffer.close()

    @property
    def attached(self) -> bool:
        return self._session is not None

    def device_names(self) -> dict[int, str]:
        bus = self._session.bus if self._session is not None else self._default_bus
        return {function.device_id: function.name for _, function in bus}

    # -- control RPCs

    async def GetTopology(
        self,
        request: pb.TopologyRequest,
        context: grpc.aio.ServicerContext[pb.TopologyRequest, pb.Topology],
    ) -> pb.Topology:
        bus = self._session.bus if self._session is not None else self._default_bus
        return topology_to_pb(bus)

    async def Screendump(
        self,
        request: pb.ScreendumpRequest,
        context: grpc.aio.ServicerContext[pb.ScreendumpRequest, pb.ScreendumpReply],
    ) -> pb.ScreendumpReply:
        """Rows of what a display shows, as RGB; no mode when it shows nothing.
        Read from the shared VRAM as it is now (the guest may be drawing)."""
        bus = self._session.bus if self._session is not None else self._default_bus
        try:
            function = bus.function(request.device_id)
        except AccessError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise  # not reached: abort raises
        if not isinstance(function, BochsDisplay):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"device {request.device_id} ({function.name}, {function.type_name}) "
                "is not a display; Screendump needs a vesa-fb",
            )
            raise AssertionError("abort raises")
        mode = function.mode()
        if mode is None:
            return pb.ScreendumpReply()
        fit = max(1, MAX_SCREENDUMP_BYTES // (mode.width * 3))
        max_rows = fit if request.max_rows == 0 else min(request.max_rows, fit)
        shown, rows, rgb = function.screendump(request.first_row, max_rows)
        if shown is None:
            return pb.ScreendumpReply()
        return pb.ScreendumpReply(
            mode=display_mode_to_pb(shown),
            first_row=min(request.first_row, shown.height),
            rows=rows,
            rgb=rgb,
        )

    async def GetStats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext[pb.StatsRequest, pb.Stats]
    ) -> pb.Stats:
        c = self.counters
        return pb.Stats(
            sessions_total=c.sessions_total,
            attached=self._session is not None,
            frontend_messages=c.frontend_messages,
            requests=c.requests,
            server_messages=c.server_messages,
            events=c.events,
            rejected_requests=c.rejected_requests,
            memory_map_updates=c.memory_map_updates,
            devices=[
                pb.DeviceStats(
                    device_id=device_id,
                    config_reads=d.config_reads,
                    config_writes=d.config_writes,
                    bar_reads=d.bar_reads,
                    bar_writes=d.bar_writes,
                    bar_decode_changes=d.bar_decode_changes,
                    msis=d.msis,
                    intx_changes=d.intx_changes,
                    resets=d.resets,
                    dma_requests=d.dma_requests,
                    dma_errors=d.dma_errors,
                    console_bytes_dropped=d.console_bytes_dropped,
                )
                for device_id, d in sorted(c.devices.items())
            ],
        )

    # -- the data path

    async def Attach(
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage],
    ) -> None:
        session: Session | None = None
        reader: ReadAhead | None = None
        try:
            first = await context.read()
            if first is grpc.aio.EOF:
                return
            assert isinstance(first, pb.FrontendMessage)
            session, welcome_seq = self._open(first)
            self._consoles.wire(session, functools.partial(self._deliver_console, session, context))
            self._wire_messages(session, context)
            await context.write(
                pb.ServerMessage(items=[pb.ServerItem(reply=self._welcome(session, welcome_seq))])
            )
            self.counters.server_messages += 1
            # Read ahead from here: a worker blocked on a DMA reply holds its
            # device, so the reply must not wait behind the requests it delays.
            messages = session.messages
            reader = ReadAhead(
                context.read,
                messages.resolve if messages is not None else lambda _: False,
                session.dma.fail_waiters,
                self.counters,
            )
            # Requests after Hello in the same message are handled like any other.
            await self._serve_message(session, first.requests[1:], context)
            while True:
                requests = await reader.next()
                if requests is None:
                    return
                await self._serve_message(session, requests, context)
        except RequestError as e:
            self.counters.rejected_requests += 1
            log.warning("frontend stream ended: %s", e.message)
            if reader is not None:
                await reader.aclose()  # no read may be pending when the status goes out
            await context.abort(e.code, e.message)
        finally:
            if session is not None and self._session is session:
                log.info("session %d (%s) detached", session.session_id, session.frontend_name)
                # Continuations stop after the bounded step they are in (a worker
                # thread cannot be cancelled), before the memory goes away.
                session.closed = True
                # Workers waiting for a DMA reply wake now: none can come.
                session.dma.fail_waiters("the frontend's session ended")
                self._consoles.unwire(session)
                tasks = [*session.continuations.values(), *session.rx_wakes.values()]
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                if reader is not None:
                    await reader.aclose()
                for task in list(session.background):
                    task.cancel()
                if session.messages is not None:
                    await session.messages.aclose()
                self._session = None
                self._end(session)
            elif reader is not None:
                await reader.aclose()

    def _end(self, session: Session) -> None:
        """Fail the DMA the frontend still owes, and let go of its memory."""
        session.closed = True
        self._consoles.unwire(session)
        session.continuations.clear()
        session.rx_wakes.clear()
        # No ring may be touched once the memory is unmapped.
        for function in session.virtio_functions():
            function.attach_memory(None)
        for dma in session.dma.drain("the frontend's session ended"):
            self.counters.devices[dma.device_id].dma_errors += 1
            session.bus.function(dma.device_id).dma_completed(
                dma.token, None, "the frontend's session ended"
            )
        session.memory.close()

    def _open(self, first: pb.FrontendMessage) -> tuple[Session, int]:
        self.counters.frontend_messages += 1
        if not first.requests or first.requests[0].WhichOneof("kind") != "hello":
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the first request on an Attach stream must be a Hello",
            )
        request = first.requests[0]
        hello = request.hello
        if hello.protocol_major != PROTOCOL_MAJOR:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"frontend speaks protocol {hello.protocol_major}.{hello.protocol_minor}, this "
                f"server speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}; use matching devmodel releases",
            )
        if self._session is not None:
            current = self._session
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the server is busy: session {current.session_id} ({current.frontend_name!r}) "
                "is attached; only one frontend at a time owns the devices",
            )
        memory = open_memory(hello.memory)
        caps = hello.capabilities
        try:
            bus = build_bus(
                self._specs,
                Presentation(msix=caps.msi, bar64=caps.bar64),
                block_backends=self._block_backends,
                streams=self._consoles.streams,
                framebuffers=self._framebuffers,
                console_ports=self._consoles.ports,
            )
        except ConfigError as e:
            memory.close()
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f"cannot present the devices: {e}"
            ) from None
        session = Session(
            self._next_session,
            hello.frontend_name or "unnamed",
            bus,
            hello.memory.mode,
            memory,
        )
        self._next_session += 1
        self._session = session
        session.attach_memory()
        if hello.memory.mode == pb.MEMORY_MODE_NONE:
            for function in session.virtio_functions():
                log.warning(
                    "virtio device %s cannot run its queues with memory mode %s (it needs "
                    "guest memory); a driver that starts it gets DEVICE_NEEDS_RESET",
                    function.name,
                    pb.MemoryMode.Name(hello.memory.mode),
                )
        self.counters.sessions_total += 1
        self.counters.requests += 1
        log.info(
            "session %d attached: %s (msi=%s bar64=%s memory=%s)",
            session.session_id,
            session.frontend_name,
            caps.msi,
            caps.bar64,
            pb.MemoryMode.Name(hello.memory.mode),
        )
        return session, request.seq

    def _welcome(self, session: Session, seq: int) -> pb.Reply:
        return pb.Reply(
            seq=seq,
            welcome=pb.Welcome(
                protocol_major=PROTOCOL_MAJOR,
                protocol_minor=PROTOCOL_MINOR,
                features=sorted(FEATURES),
                session_id=session.session_id,
                server_name=self.server_name,
                topology=topology_to_pb(session.bus),
            ),
        )

    async def _serve_message(
        self,
        session: Session,
        requests: Sequence[pb.Request],
        context: grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage],
    ) -> None:
        items: list[pb.ServerItem] = []
        for request in requests:
            self.counters.requests += 1
            try:
                virtio = self._virtio_target(session, request)
                if virtio is None:
                    self._serve_request(session, request, items)
                else:
                    await self._serve_virtio(session, virtio, request, items)
            except MemoryMapError as e:
                raise _map_error(e, f"request seq={request.seq}: ") from None
            except AccessError as e:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"request seq={request.seq}: {e}"
                ) from None
        if items:
            await self._write(session, context, items)
        for function in session.virtio_functions():
            if function.pending_work:
                self._continue(session, function, context)
        if items:
            # Let other streams (Topology, Stats, a refused second Attach) run
            # between messages of a busy frontend.
            await asyncio.sleep(0)

    # -- console host ends (console_pump.py)

    async def _deliver_console(
        self,
        session: Session,
        context: grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage],
        function: VirtioPciFunction,
        effects: list[Effect],
    ) -> None:
        """Send what a console's host ends woke it to do; continue its work."""
        items: list[pb.ServerItem] = []
        self._emit(session, effects, items)
        if items and not session.closed:
            await self._write(session, context, items)
        if function.pending_work and not session.closed:
            self._continue(session, function, context)

    # -- DMA by message: the stream's side

    def _wire_messages(
        self,
        session: Session,
        context: grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage],
    ) -> None:
        """Give the session a way to send messages of its own (DMA requests, DMA
        timeouts) and, in DMA_MESSAGES, the guest memory virtio devices use."""
        session.send = functools.partial(self._send_items, session, context)
        if session.mode == pb.MEMORY_MODE_DMA_MESSAGES:
            session.messages = MessageGuestMemory(
                session.dma, asyncio.get_running_loop(), session.send, self.counters
            )
            session.attach_memory()

    async def _write(
        self,
        session: Session,
        context: grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage],
        items: list[pb.ServerItem],
    ) -> None:
        """Send items in order, in as many messages as the size limit needs: a
        batch of reads under the limit can have replies over it."""
        async with session.write_lock:
            for chunk in split_items(items):
                self.counters.server_messages += 1
                await context.write(pb.ServerMessage(items=chunk))

    async def _send_items(
        self,
        session: Session,
        context: grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage],
        items: list[pb.ServerItem],
    ) -> None:
        if session.closed:
            raise ConnectionError("the session has ended")
        await self._write(session, context, items)

    # -- virtio functions

    @staticmethod
    def _virtio_target(session: Session, request: pb.Request) -> VirtioPciFunction | None:
        """The virtio function an access goes to, if it goes to one."""
        kind = request.WhichOneof("kind")
        function: PciFunction | None = None
        if kind in ("bar_write", "bar_read", "reset_device"):
            access = getattr(request, kind)
            function = next((f for _, f in session.bus if f.device_id == access.device_id), None)
        elif kind in ("config_read", "config_write"):
            c = getattr(request, kind)
            function = session.bus.at(c.bus, c.device, c.function)
        return function if isinstance(function, VirtioPciFunction) else None

    async def _serve_virtio(
        self,
        session: Session,
        function: VirtioPciFunction,
        request: pb.Request,
        items: list[pb.ServerItem],
    ) -> None:
        """One access to a virtio function, under its lock; a write (which may run
        the device: disk I/O) in a worker thread."""
        lock = session.device_locks.setdefault(function.device_id, asyncio.Lock())
        async with lock:
            if request.WhichOneof("kind") in ("bar_write", "config_write", "reset_device"):
                await asyncio.to_thread(self._serve_request, session, request, items)
            else:
                self._serve_request(session, request, items)

    def _continue(
        self,
        session: Session,
        function: VirtioPciFunction,
        context: grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage],
    ) -> None:
        """Schedule (once) the rest of a device's work as bounded steps on the loop."""
        task = session.continuations.get(function.device_id)
        if task is not None and not task.done():
            return
        session.continuations[function.device_id] = asyncio.get_running_loop().create_task(
            self._run_pending(session, function, context)
        )

    async def _run_pending(
        self,
        session: Session,
        function: VirtioPciFunction,
        context: grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage],
    ) -> None:
        lock = session.device_locks.setdefault(function.device_id, asyncio.Lock())
        try:
            while function.pending_work and not session.closed:
                async with lock:
                    if session.closed:
                        return
                    effects = await asyncio.to_thread(function.run_pending)
                    items: list[pb.ServerItem] = []
                    self._emit(session, effects, items)
                if items and not session.closed:
                    await self._write(session, context, items)
                await asyncio.sleep(0)  # one bounded step a turn: other streams run between
        except Exception:
            # The stream is gone (or broke); the session's end cleans up.
            log.exception("device %s: continuing its queue work failed", function.name)

    def _serve_request(
        self, session: Session, request: pb.Request, items: list[pb.ServerItem]
    ) -> None:
        bus = session.bus
        kind = request.WhichOneof("kind")
        counters = self.counters.devices
        if kind == "bar_write":
            b = request.bar_write
            effects = bus.bar_write(b.device_id, b.bar, b.offset, b.size, b.value)
            counters[b.device_id].bar_writes += 1
            self._emit(session, effects, items)
        elif kind == "bar_read":
            r = request.bar_read
            value = bus.bar_read(r.device_id, r.bar, r.offset, r.size)
            counters[r.device_id].bar_reads += 1
            # A read can have effects (virtio's ISR read-to-clear lowers INTx).
            self._emit(session, bus.take_effects(r.device_id), items)
            items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, value=value)))
        elif kind == "config_read":
            c = request.config_read
            value = bus.config_read(c.bus, c.device, c.function, c.offset, c.size)
            if bus.at(c.bus, c.device, c.function) is not None:
                counters[c.device].config_reads += 1
                self._emit(session, bus.take_effects(c.device), items)
            items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, value=value)))
        elif kind == "config_write":
            w = request.config_write
            effects = bus.config_write(w.bus, w.device, w.function, w.offset, w.size, w.value)
            if bus.at(w.bus, w.device, w.function) is not None:
                counters[w.device].config_writes += 1
            # Events before the reply: the frontend's routing is right on resume.
            self._emit(session, effects, items)
            items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, done=True)))
        elif kind == "reset_device":
            device_id = request.reset_device.device_id
            effects = bus.reset(device_id)
            counters[device_id].resets += 1
            self._emit(session, effects, items)
            items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, done=True)))
        elif kind == "hello":
            raise AccessError("Hello may only be the first request of a stream")
        elif kind == "dma_reply":
            self._dma_reply(session, request.dma_reply, items)
        elif kind == "memory_map_update":
            self._memory_map_update(session, request.memory_map_update)
            session.attach_memory()
            items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, done=True)))
        else:
            raise AccessError("the request carries no access (empty or unknown oneof 'kind')")

    def _memory_map_update(self, session: Session, update: pb.MemoryMapUpdate) -> None:
        if len(update.add) > MAX_REGIONS or len(update.remove) > MAX_REGIONS:
            raise AccessError(
                f"MemoryMapUpdate adds {len(update.add)} and removes {len(update.remove)} "
                f"regions; at most {MAX_REGIONS} of each"
            )
        session.memory.update(
            [region_from_pb(r) for r in update.add],
            [AddressRange(r.base, r.size) for r in update.remove],
            add_name="MemoryMapUpdate.add",
            remove_name="MemoryMapUpdate.remove",
        )
        self.counters.memory_map_updates += 1

    # -- DMA

    def _dma(self, session: Session, dma: DmaRequested, items: list[pb.ServerItem]) -> list[Effect]:
        """Carry out (or send out) one DmaRequested; returns what an immediate completion caused."""
        self.counters.devices[dma.device_id].dma_requests += 1
        if dma.length > MAX_DMA_BYTES:
            return self._complete(
                session,
                dma.device_id,
                dma.token,
                None,
                f"a transfer of {dma.length} bytes is over the {MAX_DMA_BYTES}-byte limit",
            )
        if session.mode == pb.MEMORY_MODE_SHARED:
            assert isinstance(session.memory, SharedGuestMemory)
            data, error = perform_dma(session.memory, dma)
            return self._complete(session, dma.device_id, dma.token, data, error)
        if session.mode == pb.MEMORY_MODE_DMA_MESSAGES:
            request_id = session.dma.allocate(
                PendingDma(dma.device_id, dma.token, dma.length, dma.write)
            )
            if request_id is None:
                return self._complete(
                    session, dma.device_id, dma.token, None, session.dma.refusal()
                )
            if session.messages is not None:  # the loop's clock; None only before the stream
                timer = session.messages.loop.call_later(
                    session.dma.timeout, self._dma_timed_out, session, request_id
                )
                session.dma.set_timer(request_id, timer)
            self.counters.events += 1
            items.append(pb.ServerItem(event=event_to_pb(dma, request_id)))
            return []
        return self._complete(
            session,
            dma.device_id,
            dma.token,
            None,
            "the frontend gave the server no access to guest memory (MEMORY_MODE_NONE)",
        )

    def _dma_reply(self, session: Session, reply: pb.DmaReply, items: list[pb.ServerItem]) -> None:
        if session.messages is not None and session.messages.resolve(reply):
            return  # a worker's (read ahead normally takes those) or a late one
        pending = session.dma.take(reply.request_id)
        if not isinstance(pending, PendingDma):
            raise AccessError(
                f"DmaReply for request {reply.request_id}, "
                "but no DMA request with that id is outstanding"
            )
        data, error = reply_outcome(reply, pending.length, pending.write)
        effects = self._complete(session, pending.device_id, pending.token, data, error)
        self._emit(session, effects, items)

    def _dma_timed_out(self, session: Session, request_id: int) -> None:
        """The frontend left an engine's transfer unanswered: it fails, and what
        that causes (the error status, an interrupt) goes out on its own."""
        pending = session.dma.expire(request_id)
        if not isinstance(pending, PendingDma) or session.closed:
            return
        effects = self._complete(
            session,
            pending.device_id,
            pending.token,
            None,
            f"the frontend did not answer DMA request {request_id} "
            f"within {session.dma.timeout:g} s",
        )
        items: list[pb.ServerItem] = []
        self._emit(session, effects, items)
        if items and session.send is not None:
            task = asyncio.get_running_loop().create_task(session.send(items))
            session.background.add(task)
            task.add_done_callback(session.background.discard)

    def _complete(
        self, session: Session, device_id: int, token: int, data: bytes | None, error: str | None
    ) -> list[Effect]:
        function = session.bus.function(device_id)
        if error is not None:
            self.counters.devices[device_id].dma_errors += 1
            log.debug("device %d: DMA %d failed: %s", device_id, token, error)
        return function.dma_completed(token, data, error)

    # -- events

    def _emit(self, session: Session, effects: list[Effect], items: list[pb.ServerItem]) -> None:
        """Stream `effects` as events, in order; DMA requests are carried out on the way."""
        counters = self.counters.devices
        queue = deque(effects)
        budget = _MAX_DMA_PER_REQUEST
        while queue:
            effect = queue.popleft()
            if isinstance(effect, DmaRequested):
                budget -= 1
                if budget < 0:
                    log.error(
                        "device %d keeps starting DMA from its DMA completions; dropped "
                        "request %d (the device stays busy until reset)",
                        effect.device_id,
                        effect.token,
                    )
                    continue
                # What finishing it caused comes next, before anything later.
                queue.extendleft(reversed(self._dma(session, effect, items)))
                continue
            match effect:
                case BarDecodeChanged():
                    counters[effect.device_id].bar_decode_changes += 1
                case MsiRaised():
                    counters[effect.device_id].msis += 1
                case IntxChanged():
                    counters[effect.device_id].intx_changes += 1
                case _:
                    pass
            self.counters.events += 1
            items.append(pb.ServerItem(event=event_to_pb(effect)))
