"""DeviceModel servicer: the server's devices, its one attached frontend, and
its RPCs.

The servicer owns what lives as long as the server: the disk images, the
vesa-fb VRAM memfds, the console host ends (console_pump.py) and the
virtio-net taps (net_pump.py), all opened at start, and the counters. A
frontend's Attach stream (attach.py) gets a Session (session.py) built from
the device specs as presented to it (no MSI-X without MSI, 32-bit BARs
without 64-bit routing); one frontend at a time. Requests are served by
requests.py, effects go out by emit.py (DMA is carried out there), and
virtio functions are run by virtio_runner.py.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import grpc

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc

from ..backends.file_block import FileBlockBackend, open_block_backends
from ..backends.framebuffer_memfd import MemfdFramebuffer, open_framebuffers
from ..backends.p9_fs import DirectoryExport, open_p9_exports
from ..backends.scsi_disks import close_scsi_disks, open_scsi_disks
from ..config import DeviceSpec, build_bus
from ..devices.framebuffer import BochsDisplay
from ..errors import AccessError, ConfigError
from ..pci.function import Presentation
from . import dma_messages
from .attach import Context, serve_attach
from .balloon_control import BalloonControl
from .console_pump import ConsolePump
from .convert import display_mode_to_pb, topology_to_pb
from .dma_messages import DmaChannel
from .needs_reset_log import NeedsResetLog
from .net_pump import NetPump
from .protocol import (
    FEATURES,
    MAX_DMA_OUTSTANDING,
    MAX_SCREENDUMP_BYTES,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
)
from .session import RequestError, Session, open_memory
from .stats import ServerCounters
from .virtio_runner import deliver

log = logging.getLogger(__name__)


class DeviceModelServicer(devmodel_pb2_grpc.DeviceModelServicer):
    def __init__(self, specs: Sequence[DeviceSpec], server_name: str = "devserver") -> None:
        self._specs = list(specs)
        self.server_name = server_name
        self.counters = ServerCounters()
        self.needs_reset_log = NeedsResetLog()
        self._balloons = BalloonControl()  # balloon targets outlive sessions
        # Disk images open once, at start (a bad one is a ConfigError now, not at
        # attach); every session's devices share them. close() lets them go.
        self._block_backends: dict[int, FileBlockBackend] = open_block_backends(self._specs)
        self._consoles = ConsolePump([], self.counters)
        self._nets = NetPump([])
        self._framebuffers: dict[int, MemfdFramebuffer] = {}
        self._scsi_disks: dict[int, list[FileBlockBackend]] = {}
        self._p9_exports: dict[int, DirectoryExport] = {}
        try:
            # virtio-9p exported directories: opened once, shared by sessions.
            self._p9_exports = open_p9_exports(self._specs)
            # virtio-scsi disk images, like virtio-blk's: opened once, shared.
            self._scsi_disks = open_scsi_disks(self._specs)
            # A vesa-fb's VRAM memfd lives as long as the server (every session maps it).
            self._framebuffers = open_framebuffers(self._specs)
            # Console host ends open from the start too (served once start() runs).
            self._consoles = ConsolePump(self._specs, self.counters)
            # virtio-net taps too (read once start() runs).
            self._nets = NetPump(self._specs)
            # what Topology shows before any attach
            self._default_bus = build_bus(
                self._specs,
                block_backends=self._block_backends,
                streams=self._consoles.streams,
                framebuffers=self._framebuffers,
                console_ports=self._consoles.ports,
                packet_ports=self._nets.ports,
                scsi_disks=self._scsi_disks,
                p9_exports=self._p9_exports,
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
        await self._nets.start()

    async def aclose(self) -> None:
        """close(), after the console host ends are let go on the loop."""
        await self._consoles.aclose()
        await self._nets.aclose()
        self.close()

    def close(self) -> None:
        """Release host resources (disk images, sockets); the server has stopped."""
        backends, self._block_backends = self._block_backends, {}
        for backend in backends.values():
            backend.close()
        scsi_disks, self._scsi_disks = self._scsi_disks, {}
        close_scsi_disks(scsi_disks)
        exports, self._p9_exports = self._p9_exports, {}
        for export in exports.values():
            export.close()
        self._consoles.close()
        self._nets.close()
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

    async def Balloon(
        self,
        request: pb.BalloonRequest,
        context: grpc.aio.ServicerContext[pb.BalloonRequest, pb.BalloonReply],
    ) -> pb.BalloonReply:
        """A virtio-balloon's target (optional) and what the guest holds
        (balloon_control.py); a new target interrupts the attached guest."""
        return await self._balloons.serve(self._session, self._default_bus, request, context)

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

    # -- the data path (attach.py serves the stream; this is its Seat)

    async def Attach(self, request_iterator: object, context: Context) -> None:
        await serve_attach(self, context)

    def open_session(self, first: pb.FrontendMessage) -> tuple[Session, int]:
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
                packet_ports=self._nets.ports,
                scsi_disks=self._scsi_disks,
                p9_exports=self._p9_exports,
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
            # read now, not at import: tests shrink them
            DmaChannel(MAX_DMA_OUTSTANDING, dma_messages.DMA_TIMEOUT),
            self.counters,
            self.needs_reset_log,
        )
        self._next_session += 1
        self._balloons.apply(bus)
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

    def welcome(self, session: Session, seq: int) -> pb.Reply:
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

    def wire_consoles(self, session: Session) -> None:
        """Host ends wake the session's console and net devices (console_pump.py,
        net_pump.py)."""
        self._consoles.wire(session, functools.partial(deliver, session))
        self._nets.wire(session, functools.partial(deliver, session))

    def unwire_consoles(self, session: Session) -> None:
        self._consoles.unwire(session)
        self._nets.unwire(session)

    def holds(self, session: Session) -> bool:
        return self._session is session

    def end_session(self, session: Session) -> None:
        self._session = None
        self._consoles.unwire(session)
        self._nets.unwire(session)
        session.end()
