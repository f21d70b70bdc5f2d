"""The vfio-user bridge: stock QEMU as a frontend of the device server.

QEMU 10.1+ drives a PCI function it does not emulate through `-device
vfio-user-pci,socket=PATH`: it speaks the client side of the vfio-user
protocol (QEMU docs/interop/vfio-user.rst) over a UNIX socket. This module
is the server side of that protocol for every device the device server
presents, and forwards each config-space and BAR access onto one gRPC
Attach stream (vmm_client.client.AsyncSession) shared by all the devices of
the VM, so accesses of different devices stay in one order, as on a bus.

    guest --MMIO/config--> QEMU --vfio-user--> Connection --gRPC--> devserver
    guest <----IRQ------- QEMU <--eventfd---- IrqTable <--events--

What the bridge answers itself (qemu-vfio-user.md §3 lists the wire facts):
  * VERSION 0.0 with a NUL-terminated JSON capabilities object;
  * DEVICE_GET_INFO / GET_REGION_INFO / GET_IRQ_INFO from the topology
    (protocol.DeviceLayout);
  * DMA_MAP / DMA_UNMAP: a table of guest-memory windows, with the fd QEMU
    sends for each map (a fresh dup every time: we close it on unmap and on
    disconnect), mapped lazily by the DMA helpers;
  * DEVICE_SET_IRQS: eventfds per (IRQ index, vector), with INTx's level and
    auto-mask semantics, and per-vector mask/pending for the others.

Shared-memory BARs (a vesa-fb's VRAM) are handed to QEMU to map when the
server is on this host (`map_shared_bars`, shared_bars.py).

What it forwards: region 7 (config space) as ConfigRead/ConfigWrite at the
device's bus/device/function, regions 0..6 as BarRead/BarWrite, split into
naturally aligned pieces the server accepts; posted REGION_WRITEs (NO_REPLY)
become posted BarWrites; DEVICE_RESET becomes ResetDevice.

MSI-X: QEMU emulates the MSI-X table itself, so the bridge mirrors QEMU's
per-vector masks into the server's table (msix_mirror.py); MsiRaised(v)
then writes v's eventfd.

I/O design: one asyncio loop, non-blocking sockets; a reader and a worker
task per connection (connection.py), requests handled strictly in order.

Guest memory for device DMA (`memory_mode`): "shared" hands QEMU's memfds
on to the server (dma.py), "messages" serves the server's DmaRequests from
our own map or with vfio-user DMA_READ/DMA_WRITE (client_dma.py).

If the device server goes away, reads return all-ones (a master abort),
writes are dropped, and that is logged once; no access waits longer than
`access_timeout` (below QEMU's 5 s x-msg-timeout), so no vCPU hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from devmodel.v1 import devmodel_pb2 as pb
from devserver.effects import DeviceNeedsReset, Effect, IntxChanged, MsiRaised
from devserver.service.server import prepare_socket_dir

from ..client import (
    AsyncSession,
    ClientError,
    FrontendOptions,
    TlsClientFiles,
    open_channel,
)
from .client_dma import DMA_LAYOUTS, DmaLayout
from .connection import Connection
from .device import Device, device_layout, socket_name
from .fd_passing import close_fds
from .link import ACCESS_TIMEOUT, DmaError, MemoryMode, ServerLink, SessionLike, resolve_memory_mode
from .memory_mirror import MemoryMirror
from .qemu_args import qemu_device_args
from .shared_bars import open_shared_bars

log = logging.getLogger(__name__)

_UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes with the NUL

__all__ = ["DMA_LAYOUTS", "DmaLayout", "VfioUserBridge", "open_bridge", "run_bridge"]


# ---------------------------------------------------------------- the bridge


class VfioUserBridge:
    """A vfio-user socket per device of one device server, all on one session.

        bridge = VfioUserBridge(socket_dir, memory_mode="shared")
        session = await AsyncSession.attach(channel, bridge.frontend_options(),
                                            on_event=bridge.on_event, on_dma=bridge.on_dma)
        await bridge.start(session)        # sockets listening: start QEMU now
        qemu_cmd += bridge.qemu_args()
        ...
        await bridge.stop()

    `open_bridge()` and `run_bridge()` do the channel and session as well.
    """

    def __init__(
        self,
        socket_dir: Path,
        *,
        access_timeout: float = ACCESS_TIMEOUT,
        mirror_msix_mask: bool = True,
        memory_mode: MemoryMode = "shared",
        dma_layout: DmaLayout = "spec",
        map_shared_bars: bool = True,
    ) -> None:
        if memory_mode not in ("shared", "messages"):
            raise ValueError(f"memory mode {memory_mode!r} is not 'shared' or 'messages'")
        if dma_layout not in DMA_LAYOUTS:
            raise ValueError(f"DMA layout {dma_layout!r} is not one of {', '.join(DMA_LAYOUTS)}")
        self.dma_layout: DmaLayout = dma_layout
        self.socket_dir = Path(socket_dir)
        self.access_timeout = access_timeout
        self.mirror_msix_mask = mirror_msix_mask
        self.memory_mode: MemoryMode = memory_mode
        self.memory: MemoryMirror | None = None  # shared mode, once started
        # Only for a server on this host: its /proc paths mean nothing elsewhere.
        self.map_shared_bars = map_shared_bars
        self.devices: dict[int, Device] = {}  # by device_id
        self._link: ServerLink | None = None
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[Connection] = set()

    def frontend_options(self, name: str = "") -> FrontendOptions:
        """The Hello for this bridge. Shared mode starts with an empty map: QEMU
        connects, and sends its DMA_MAPs, only after the session exists."""
        return FrontendOptions(
            name=name or f"vfio-user bridge (pid {os.getpid()})",
            msi=True,  # QEMU delivers MSI-X itself; the server must present the capability
            bar64=True,
            shared_memory_bars=self.map_shared_bars,
            memory_mode=pb.MEMORY_MODE_SHARED
            if self.memory_mode == "shared"
            else pb.MEMORY_MODE_DMA_MESSAGES,
        )

    @property
    def link(self) -> ServerLink:
        if self._link is None:
            raise RuntimeError("the bridge is not started")
        return self._link

    @property
    def sockets(self) -> dict[str, Path]:
        """Device name -> the socket QEMU's vfio-user-pci connects to."""
        return {d.name: d.socket_path for d in self.devices.values()}

    async def start(self, session: SessionLike) -> dict[str, Path]:
        """Listen on one socket per device; returns them by device name."""
        self._link = ServerLink(session, self.access_timeout)
        if self.memory_mode == "shared":
            self.memory = MemoryMirror(self._link)
        try:
            for info in session.topology.devices:
                path = self.socket_dir / socket_name(info)
                if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                    raise ValueError(
                        f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes; "
                        "choose a shorter socket directory"
                    )
                prepare_socket_dir(path)  # 0700 directory we own; stale socket removed
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listeners.append(listener)
                listener.setblocking(False)
                listener.bind(os.fspath(path))
                os.chmod(path, 0o600)
                listener.listen(1)
                mmap_fds = open_shared_bars(info) if self.map_shared_bars else {}
                try:
                    device = Device(info, device_layout(info, frozenset(mmap_fds)), path)
                except BaseException:
                    close_fds(mmap_fds.values())
                    raise
                device.mmap_fds = mmap_fds
                self.devices[info.device_id] = device
                self._spawn(self._accept_loop(listener, device), f"vfio-user {info.name} accept")
                log.info(
                    "%s (%04x:%04x at %02x:%02x.%x): listening on %s",
                    info.name,
                    info.vendor_id,
                    info.product_id,
                    info.bus,
                    info.device,
                    info.function,
                    path,
                )
        except BaseException:
            await self.stop()
            raise
        return self.sockets

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, listener: socket.socket, device: Device) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            if device.handler is not None:
                log.warning("%s: refusing a second client while one is connected", device.name)
                sock.close()
                continue
            sock.setblocking(False)
            connection = Connection(sock, device, self)
            device.handler = connection.handler
            self._connections.add(connection)
            log.info("%s: client connected", device.name)
            self._spawn(self._serve(connection), f"vfio-user {device.name} connection")

    async def _serve(self, connection: Connection) -> None:
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            if connection.device.handler is connection.handler:
                connection.device.handler = None
            log.info("%s: client disconnected", connection.device.name)

    # -- events from the device server (called on the session's reader task)

    def on_event(self, effect: Effect) -> None:
        device = self.devices.get(effect.device_id)
        if device is None:
            return
        match effect:
            case IntxChanged():
                device.intx_level = effect.asserted
                if device.handler is not None:
                    device.handler.on_intx(effect.asserted)
            case MsiRaised():
                if device.handler is not None:
                    device.handler.on_msi(effect.vector)
            case DeviceNeedsReset():
                log.warning("%s needs a reset: %s", device.name, effect.reason)
            case _:
                pass  # BAR decode changes: QEMU maps BARs itself and forwards by region

    def on_dma(self, request: pb.DmaRequest) -> None:
        """Serve the server's DMA requests through the client (MEMORY_MODE_DMA_MESSAGES)."""
        self._spawn(self._dma(request), f"vfio-user DMA {request.request_id}")

    async def _dma(self, request: pb.DmaRequest) -> None:
        session = self.link.session
        device = self.devices.get(request.device_id)
        handler = device.handler if device is not None else None
        try:
            if handler is None:
                raise DmaError(f"device {request.device_id} has no vfio-user client")
            if request.write:
                await handler.dma_write(request.address, bytes(request.data))
                data = b""
            else:
                data = await handler.dma_read(request.address, request.length)
        except DmaError as e:
            with contextlib.suppress(ClientError):
                session.dma_reply(request.request_id, error=str(e))
            return
        with contextlib.suppress(ClientError):
            session.dma_reply(request.request_id, data=data)

    # -- QEMU command line

    def qemu_args(self, *, msg_timeout_ms: int | None = None, root_ports: bool = True) -> list[str]:
        """`-device` arguments for QEMU, one vfio-user-pci per device.

        With `root_ports` each device sits behind its own pcie-root-port, so
        the guest sees it as the PCI Express endpoint the server presents (on
        pcie.0 QEMU would show it as a root-complex integrated endpoint).
        Guest RAM should be shareable (`-object memory-backend-memfd,id=mem,
        size=...,share=on -machine q35,memory-backend=mem`) so DMA_MAP brings
        fds; see qemu-vfio-user.md.
        """
        return qemu_device_args(
            self.devices.values(), msg_timeout_ms=msg_timeout_ms, root_ports=root_ports
        )

    async def stop(self) -> None:
        """Close every socket and connection (their eventfds and DMA fds with them)."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()
        if self.memory is not None:
            await self.memory.close()
        for device in self.devices.values():
            device.handler = None
            close_fds(device.mmap_fds.values())
            device.mmap_fds = {}
            with contextlib.suppress(FileNotFoundError):
                device.socket_path.unlink()


@contextlib.asynccontextmanager
async def open_bridge(
    devserver_target: str,
    socket_dir: Path,
    *,
    tls: TlsClientFiles | None = None,
    access_timeout: float = ACCESS_TIMEOUT,
    name: str = "",
    memory_mode: str = "auto",
    dma_layout: DmaLayout = "spec",
) -> AsyncIterator[VfioUserBridge]:
    """Attach to the device server and listen for QEMU; everything is closed on exit.

    `memory_mode`: "shared", "messages", or "auto" (shared when the server is
    reached over a UNIX socket, so it runs on this host).
    """
    bridge = VfioUserBridge(
        socket_dir,
        access_timeout=access_timeout,
        memory_mode=resolve_memory_mode(memory_mode, devserver_target),
        dma_layout=dma_layout,
        map_shared_bars=devserver_target.startswith("unix:"),
    )
    channel = open_channel(devserver_target, tls)
    try:
        session = await AsyncSession.attach(
            channel,
            bridge.frontend_options(name),
            on_event=bridge.on_event,
            on_dma=bridge.on_dma,
        )
        try:
            if bridge.memory_mode == "shared" and session.welcome.protocol_minor < 1:
                raise ClientError(
                    f"the device server speaks protocol {session.welcome.protocol_major}."
                    f"{session.welcome.protocol_minor}, which cannot follow QEMU's memory "
                    "map (MemoryMapUpdate, 1.1); use --memory-mode messages or a newer server"
                )
            await bridge.start(session)
            yield bridge
        finally:
            await bridge.stop()
            await session.close()
    finally:
        await channel.close(None)


async def run_bridge(
    devserver_target: str,
    socket_dir: Path,
    *,
    tls: TlsClientFiles | None = None,
    access_timeout: float = ACCESS_TIMEOUT,
    ready: Callable[[VfioUserBridge], None] | None = None,
    stop: asyncio.Event | None = None,
    memory_mode: str = "auto",
    dma_layout: DmaLayout = "spec",
) -> None:
    """Run a bridge for every device of the server at `devserver_target` until `stop`
    is set (or the task is cancelled). `ready` is called once the sockets listen:
    that is when QEMU may start."""
    async with open_bridge(
        devserver_target,
        socket_dir,
        tls=tls,
        access_timeout=access_timeout,
        memory_mode=memory_mode,
        dma_layout=dma_layout,
    ) as bridge:
        if ready is not None:
            ready(bridge)
        await (stop or asyncio.Event()).wait()
