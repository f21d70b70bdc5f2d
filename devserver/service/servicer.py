"""DeviceModel servicer: decode a request, call the core, stream its effects.

One frontend is attached at a time; it owns the devices until its stream
ends. Each FrontendMessage is handled to the end before the next is read, and
everything it produced (events first, then the replies they precede) goes out
as one ServerMessage. A request no PCI bus could carry ends the stream with
INVALID_ARGUMENT naming the request; the server and its other streams go on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc

from ..config import DeviceSpec, build_bus
from ..effects import BarDecodeChanged, Effect, IntxChanged, MsiRaised
from ..errors import AccessError, ConfigError
from ..pci.bus import PciBus
from ..pci.function import Presentation
from .convert import event_to_pb, topology_to_pb
from .protocol import FEATURES, PROTOCOL_MAJOR, PROTOCOL_MINOR
from .stats import ServerCounters

log = logging.getLogger(__name__)

_U64 = 1 << 64
_MAX_REGIONS = 64


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
    memory: pb.GuestMemoryAccess


def validate_memory(memory: pb.GuestMemoryAccess) -> None:
    """The frontend's memory table is input like any other (reliability.md C12)."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if memory.mode == pb.MEMORY_MODE_UNSPECIFIED:
        raise RequestError(bad, "Hello.memory.mode is unset: choose SHARED, DMA_MESSAGES or NONE")
    if len(memory.regions) > _MAX_REGIONS:
        raise RequestError(
            bad, f"Hello.memory has {len(memory.regions)} regions; at most {_MAX_REGIONS}"
        )
    spans = []
    for i, region in enumerate(memory.regions):
        where = f"Hello.memory.regions[{i}]"
        if region.size == 0:
            raise RequestError(bad, f"{where} has size 0")
        if region.guest_address + region.size > _U64:
            raise RequestError(bad, f"{where} wraps past the top of the 64-bit address space")
        if memory.mode == pb.MEMORY_MODE_SHARED:
            if not region.path:
                raise RequestError(bad, f"{where}: shared memory needs a path the server can map")
            try:
                file_size = os.stat(region.path).st_size
            except OSError as e:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{where}: cannot open {region.path!r} ({e.strerror}); "
                    "is the server on this host and allowed to read it?",
                ) from None
            if region.file_offset + region.size > file_size:
                raise RequestError(
                    bad,
                    f"{where}: offset {region.file_offset:#x} + size {region.size:#x} is past "
                    f"the end of {region.path!r} ({file_size:#x} bytes)",
                )
        spans.append((region.guest_address, region.guest_address + region.size, i))
    spans.sort()
    for (_, end, i), (start, _, j) in itertools.pairwise(spans):
        if start < end:
            raise RequestError(bad, f"Hello.memory.regions[{i}] and [{j}] overlap")


class DeviceModelServicer(devmodel_pb2_grpc.DeviceModelServicer):
    def __init__(self, specs: Sequence[DeviceSpec], server_name: str = "devserver") -> None:
        self._specs = list(specs)
        self.server_name = server_name
        self.counters = ServerCounters()
        self._default_bus = build_bus(self._specs)  # what Topology shows before any attach
        self._session: Session | None = None
        self._next_session = 1

    # -- control RPCs

    async def GetTopology(
        self,
        request: pb.TopologyRequest,
        context: grpc.aio.ServicerContext[pb.TopologyRequest, pb.Topology],
    ) -> pb.Topology:
        bus = self._session.bus if self._session is not None else self._default_bus
        return topology_to_pb(bus)

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
        try:
            first = await context.read()
            if first is grpc.aio.EOF:
                return
            assert isinstance(first, pb.FrontendMessage)
            session, welcome_seq = self._open(first)
            await context.write(
                pb.ServerMessage(items=[pb.ServerItem(reply=self._welcome(session, welcome_seq))])
            )
            self.counters.server_messages += 1
            # Requests after Hello in the same message are handled like any other.
            await self._serve_message(session, first.requests[1:], context)
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                assert isinstance(message, pb.FrontendMessage)
                self.counters.frontend_messages += 1
                await self._serve_message(session, message.requests, context)
        except RequestError as e:
            self.counters.rejected_requests += 1
            log.warning("frontend stream ended: %s", e.message)
            await context.abort(e.code, e.message)
        finally:
            if session is not None and self._session is session:
                log.info("session %d (%s) detached", session.session_id, session.frontend_name)
                self._session = None

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
        validate_memory(hello.memory)
        caps = hello.capabilities
        try:
            bus = build_bus(self._specs, Presentation(msix=caps.msi, bar64=caps.bar64))
        except ConfigError as e:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f"cannot present the devices: {e}"
            ) from None
        session = Session(self._next_session, hello.frontend_name or "unnamed", bus, hello.memory)
        self._next_session += 1
        self._session = session
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
                self._serve_request(session, request, items)
            except AccessError as e:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"request seq={request.seq}: {e}"
                ) from None
        if items:
            self.counters.server_messages += 1
            await context.write(pb.ServerMessage(items=items))
            # Let other streams (Topology, Stats, a refused second Attach) run
            # between messages of a busy frontend.
            await asyncio.sleep(0)

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
            self._emit(effects, items)
        elif kind == "bar_read":
            r = request.bar_read
            value = bus.bar_read(r.device_id, r.bar, r.offset, r.size)
            counters[r.device_id].bar_reads += 1
            items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, value=value)))
        elif kind == "config_read":
            c = request.config_read
            value = bus.config_read(c.bus, c.device, c.function, c.offset, c.size)
            if bus.at(c.bus, c.device, c.function) is not None:
                counters[c.device].config_reads += 1
            items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, value=value)))
        elif kind == "config_write":
            w = request.config_write
            effects = bus.config_write(w.bus, w.device, w.function, w.offset, w.size, w.value)
            if bus.at(w.bus, w.device, w.function) is not None:
                counters[w.device].config_writes += 1
            self._emit(
                effects, items
            )  # events before the reply: the frontend's routing is right on resume
            items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, done=True)))
        elif kind == "reset_device":
            device_id = request.reset_device.device_id
            effects = bus.reset(device_id)
            counters[device_id].resets += 1
            self._emit(effects, items)
            items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, done=True)))
        elif kind == "hello":
            raise AccessError("Hello may only be the first request of a stream")
        elif kind == "dma_reply":
            raise AccessError(
                f"DmaReply for request {request.dma_reply.request_id}, "
                "but no DMA request is outstanding"
            )
        else:
            raise AccessError("the request carries no access (empty or unknown oneof 'kind')")

    def _emit(self, effects: list[Effect], items: list[pb.ServerItem]) -> None:
        counters = self.counters.devices
        for effect in effects:
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
