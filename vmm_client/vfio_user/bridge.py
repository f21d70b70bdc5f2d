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

Shared-memory BARs (a vesa-fb's VRAM): when the server is on this host
(`map_shared_bars`), the bridge opens the file the topology names for the BAR
(BarInfo.backing, /proc/<server pid>/fd/<n>), offers the region with
VFIO_REGION_INFO_FLAG_MMAP, and passes the fd with the GET_REGION_INFO reply
(SCM_RIGHTS). QEMU maps it into the guest's BAR, so pixel stores land in the
server's memory with no message at all; QEMU's own region accesses still come
as REGION_READ/WRITE and are forwarded like any BAR's.

What it forwards: region 7 (config space) as ConfigRead/ConfigWrite at the
device's bus/device/function, regions 0..6 as BarRead/BarWrite, split into
naturally aligned pieces the server accepts; posted REGION_WRITEs (NO_REPLY)
become posted BarWrites; DEVICE_RESET becomes ResetDevice.

MSI-X: QEMU emulates the MSI-X table itself and never forwards table
accesses (qemu-vfio-user-msix.md, Q1), while the device server only raises
MsiRaised for vectors unmasked in *its* table. So when QEMU hands us an
eventfd for vector v (it does so when the guest unmasks v), the bridge
unmasks v in the server's table with a posted BarWrite, and masks it again
when the eventfd is taken away. MsiRaised(v) then writes v's eventfd.

I/O design: one asyncio loop, non-blocking sockets. Each connection has a
reader task (recvmsg with SCM_RIGHTS via loop.add_reader; asyncio has no
sock_recvmsg) that frames messages and routes replies to our own DMA
requests at once, and a worker task that handles requests strictly in order
(the spec requires in-order processing, and QEMU relies on it for posted
writes). A reader thread would cost a cross-thread hop on every access and
still need the loop for gRPC; grpc.aio must live on one loop anyway.

Guest memory for device DMA, two modes (`memory_mode`):
  * "shared" (the default when the device server is on this host): guest RAM
    QEMU sends as fds with DMA_MAP (memory-backend-memfd,share=on) is
    announced to the server with MemoryMapUpdate(add) as /proc/<our
    pid>/fd/<n>, which the server opens and maps itself, and withdrawn with
    MemoryMapUpdate(remove) on DMA_UNMAP before the fd is closed. Maps without
    an fd (ROM, MMIO, the VGA window) are not RAM and are not announced. Every
    device connection gets the same DMA_MAPs while the server keeps one map
    per session, so MemoryMirror announces each window once and withdraws it
    when its last connection unmaps it. The server then reads and writes guest
    RAM directly: no message per transfer.
  * "messages": Hello says MEMORY_MODE_DMA_MESSAGES and the server sends a
    DmaRequest event per transfer; the bridge serves it through its own mmap
    of QEMU's memfd when it has one, else with vfio-user DMA_READ/DMA_WRITE to
    QEMU (data at payload offset 16, as the spec and QEMU 11.1 on the wire
    have it; `dma_layout="u32-count"` for a QEMU whose VFIOUserDMARW still has
    a u32 count, see protocol.DMA_DATA_OFFSET_SPEC), and answers with a
    DmaReply. Replies may come in any order; nothing waits for one on the
    access path.

If the device server goes away, reads return all-ones (a master abort),
writes are dropped, and that is logged once; no access waits longer than
`access_timeout` (below QEMU's 5 s x-msg-timeout), so no vCPU hangs.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final, Literal

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
from .dma import MemoryMirror
from .handler import SAFE_NAME, Device, DeviceHandler, device_layout, socket_name
from .irqs import close_fds
from .link import ACCESS_TIMEOUT, DmaError, MemoryMode, ServerLink, SessionLike, resolve_memory_mode
from .protocol import (
    DMA_DATA_OFFSET_SPEC,
    DMA_DATA_OFFSET_U32_COUNT,
    Framer,
    FramingError,
    Message,
    encode_error,
)

log = logging.getLogger(__name__)

RECV_SIZE: Final = 64 * 1024  # reused for every receive; a 1 MiB write takes 16
# Room for more descriptors than we allow, so a peer that sends too many is
# caught and refused rather than silently truncated by the kernel.
_ANCILLARY_SIZE: Final = socket.CMSG_SPACE(64 * array.array("i").itemsize)
QUEUE_DEPTH: Final = 256  # requests read ahead of the worker; back-pressure beyond
_UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes with the NUL

# PCI config registers the bridge reads itself (to find the MSI-X table).
DmaLayout = Literal["spec", "u32-count"]
DMA_LAYOUTS: Final[dict[str, int]] = {
    "spec": DMA_DATA_OFFSET_SPEC,
    "u32-count": DMA_DATA_OFFSET_U32_COUNT,
}


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Closed:
    """Queue sentinel: the peer is gone or the stream broke."""


class Connection:
    """One QEMU connection to one device socket."""

    def __init__(self, sock: socket.socket, device: Device, bridge: VfioUserBridge) -> None:
        self.sock = sock
        self.device = device
        self.framer = Framer()
        self.handler = DeviceHandler(
            device,
            bridge.link,
            self._send,
            mirror_msix_mask=bridge.mirror_msix_mask,
            memory=bridge.memory,
            dma_data_offset=DMA_LAYOUTS[bridge.dma_layout],
            send_fds=self._send_fds,
        )
        self._queue: asyncio.Queue[Message | FramingError | _Closed] = asyncio.Queue(QUEUE_DEPTH)
        self._send_lock = asyncio.Lock()
        self._buffer = memoryview(bytearray(RECV_SIZE))
        self._closed = False

    async def run(self) -> None:
        reader = asyncio.create_task(self._read_loop(), name=f"vfio-user {self.device.name} reader")
        worker = asyncio.create_task(self._work(), name=f"vfio-user {self.device.name} worker")
        try:
            done, _ = await asyncio.wait({reader, worker}, return_when=asyncio.FIRST_COMPLETED)
            if worker not in done and reader.exception() is None:
                # The reader queued its end marker: answer what came before it.
                await worker
            # A worker that stopped first (the client stopped reading) leaves the
            # reader possibly blocked on a full queue: it is cancelled below.
        finally:
            for task in (reader, worker):
                task.cancel()
            try:
                for result in await asyncio.gather(reader, worker, return_exceptions=True):
                    if isinstance(result, Exception):
                        log.error("%s: connection task failed", self.device.name, exc_info=result)
            finally:
                # Even when the bridge stops (cancelling us) while the client's
                # hang-up is still being wound down: stop() no longer sees us.
                self.close()

    async def _recvmsg(self) -> tuple[bytes, list[int], bool]:
        """One non-blocking recvmsg: (bytes, received fds, control data truncated)."""
        loop = asyncio.get_running_loop()
        fileno = self.sock.fileno()
        while True:
            try:
                size, ancillary, flags, _ = self.sock.recvmsg_into(
                    [self._buffer], _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fileno, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(fileno)
                continue
            except (ConnectionResetError, BrokenPipeError):
                return b"", [], False
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    fds.extend(received)
            return bytes(self._buffer[:size]), fds, bool(flags & socket.MSG_CTRUNC)

    async def _read_loop(self) -> None:
        try:
            while True:
                data, fds, truncated = await self._recvmsg()
                if truncated:
                    close_fds(fds)
                    log.warning(
                        "%s: too many descriptors in one message; closing the connection",
                        self.device.name,
                    )
                    await self._queue.put(_Closed())
                    return
                if not data:
                    close_fds(fds)
                    await self._queue.put(_Closed())
                    return
                close_fds(self.framer.feed(data, fds))
                try:
                    for message in self.framer.messages():
                        if message.header.is_reply:
                            self.handler.handle_reply(message)
                        else:
                            await self._queue.put(message)
                except FramingError as e:
                    log.warning("%s: %s; closing the connection", self.device.name, e)
                    await self._queue.put(e)
                    return
        except OSError as e:
            log.warning("%s: receive failed: %s", self.device.name, e)
            await self._queue.put(_Closed())

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, _Closed):
                return
            if isinstance(item, FramingError):
                header = item.header
                if header is not None and header.is_command and not header.no_reply:
                    with contextlib.suppress(OSError):
                        await self._send(encode_error(header, item.errno))
                return
            reply = await self.handler.handle(item)
            if reply is not None:
                try:
                    await self._send(reply)
                except OSError as e:
                    log.info("%s: client went away (%s)", self.device.name, e)
                    return

    async def _send(self, data: bytes) -> None:
        if self._closed:
            raise BrokenPipeError("connection closed")
        async with self._send_lock:  # replies and DMA requests must not interleave
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _send_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Send `data` with `fds` attached to its first byte (SCM_RIGHTS)."""
        if self._closed:
            raise BrokenPipeError("connection closed")
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        loop = asyncio.get_running_loop()
        async with self._send_lock:
            while True:
                try:
                    sent = self.sock.sendmsg([data], ancillary)
                    break
                except BlockingIOError:
                    writable = loop.create_future()
                    loop.add_writer(self.sock.fileno(), _wake, writable)
                    try:
                        await writable
                    finally:
                        loop.remove_writer(self.sock.fileno())
            if sent < len(data):
                await loop.sock_sendall(self.sock, data[sent:])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.handler.close()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Message):
                close_fds(item.fds)
        close_fds(self.framer.take_fds())
        self.sock.close()


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
                mmap_fds = self._open_shared_bars(info) if self.map_shared_bars else {}
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

    @staticmethod
    def _open_shared_bars(info: pb.DeviceInfo) -> dict[int, int]:
        """An fd per BAR of `info` backed by shared memory we can open and that
        is large enough; a BAR we cannot map is served by messages (logged)."""
        fds: dict[int, int] = {}
        for bar in info.bars:
            if not bar.HasField("backing") or not 0 <= bar.index < 6:
                continue
            backing = bar.backing
            try:
                fd = os.open(backing.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                log.warning(
                    "%s BAR%d: cannot open %s (%s); not mmappable",
                    info.name,
                    bar.index,
                    backing.path,
                    e,
                )
                continue
            try:
                size = os.fstat(fd).st_size
            except OSError:
                size = -1
            if (
                backing.size != bar.size
                or bar.size % 4096
                or backing.file_offset != 0  # the region's mmap offset is 0
                or (size < backing.file_offset + backing.size)
            ):
                log.warning(
                    "%s BAR%d: %s does not hold [%#x +%#x); not mmappable",
                    info.name,
                    bar.index,
                    backing.path,
                    backing.file_offset,
                    backing.size,
                )
                os.close(fd)
                continue
            fds[bar.index] = fd
        return fds

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
        args: list[str] = []
        for number, device in enumerate(self.devices.values(), start=1):
            port = f"devmodel-rp{number}"
            if root_ports:
                args += [
                    "-device",
                    f"pcie-root-port,id={port},bus=pcie.0,chassis={number},slot={number}",
                ]
            spec: dict[str, object] = {
                "driver": "vfio-user-pci",
                "id": f"vfu-{device.name}" if SAFE_NAME.fullmatch(device.name) else None,
                "socket": {"type": "unix", "path": os.fspath(device.socket_path)},
            }
            if root_ports:
                spec["bus"] = port
            if spec["id"] is None:
                del spec["id"]
            if msg_timeout_ms is not None:
                spec["x-msg-timeout"] = msg_timeout_ms
            args += ["-device", json.dumps(spec, separators=(",", ":"))]
        return args

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
