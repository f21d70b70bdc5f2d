"""The vfio-user bridge end to end: a real device server, the bridge, and a
small vfio-user client standing in for QEMU.

The client is deliberately independent of vmm_client.vfio_user.protocol: it
packs the spec's layouts by hand with struct, sends eventfds and memfds with
SCM_RIGHTS as QEMU does, and runs in a worker thread (blocking sockets) while
the event loop serves the bridge and the device server. Like QEMU it serves
the bridge's DMA_READ/DMA_WRITE requests whenever they arrive, in the layout
QEMU 11.1 uses on the wire (u64 address, u64 count, data at payload offset
16; messages at least 32 + count bytes long), or with `dma_data_offset=12`
in that of QEMU's first-merged source (u32 count, data at 12).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import os
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from devserver.config import parse_device_spec
from devserver.devices.testdev import ID_VALUE, MEM_BAR, MSIX_BAR
from devserver.service.server import DevServer, Listen
from vmm_client.client import AsyncSession, open_channel
from vmm_client.vfio_user.bridge import DmaLayout, VfioUserBridge, run_bridge
from vmm_client.vfio_user.device import Device
from vmm_client.vfio_user.handler import DeviceHandler
from vmm_client.vfio_user.link import MemoryMode

HDR = struct.Struct("<HHIII")
REPLY, NO_REPLY, ERROR = 0x1, 0x10, 0x20
VERSION, DMA_MAP, DMA_UNMAP, GET_INFO, REGION_INFO = 1, 2, 3, 4, 5
IRQ_INFO, SET_IRQS, READ, WRITE, DMA_READ, DMA_WRITE, RESET = 7, 8, 9, 10, 11, 12, 13
CONFIG = 7
EVENTFD_TRIGGER = 0x4 | 0x20
NONE_TRIGGER = 0x1 | 0x20
NONE_UNMASK = 0x1 | 0x10
INTX, MSIX = 0, 2
IO_BAR = 0


@dataclass(frozen=True)
class Reply:
    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes

    @property
    def ok(self) -> bool:
        return self.flags & REPLY != 0 and not self.flags & ERROR


class Client:
    """A blocking vfio-user client: the parts of QEMU's hw/vfio-user the tests need.

    `guest` is guest RAM by address for the DMA_READ/DMA_WRITE requests the
    bridge sends (QEMU's pci_dma_read/pci_dma_write); `dma_log` records them.
    """

    def __init__(
        self, path: Path, guest: dict[int, bytearray] | None = None, dma_data_offset: int = 16
    ) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(os.fspath(path))
        self.next_id = 0
        self.guest = guest or {}
        self.dma_data_offset = dma_data_offset
        self.dma_log: list[tuple[int, int, int, int]] = []  # (command, address, count, size)

    def close(self) -> None:
        self.sock.close()

    def send(
        self, command: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = 0
    ) -> int:
        msg_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFF
        data = HDR.pack(msg_id, command, 16 + len(payload), flags, 0) + payload
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        self.sock.sendmsg([data], ancillary)
        return msg_id

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("bridge closed the connection")
            out += chunk
        return out

    def receive(self) -> Reply:
        """The next reply; DMA requests from the bridge are served on the way."""
        while True:
            msg_id, command, size, flags, error = HDR.unpack(self.recv_exact(16))
            payload = self.recv_exact(size - 16)
            if flags & 0xF == 0 and command in (DMA_READ, DMA_WRITE):
                self.serve_dma(msg_id, command, size, payload)
                continue
            return Reply(msg_id, command, flags, error, payload)

    def _guest(self, address: int, count: int) -> tuple[bytearray, int] | None:
        for base, ram in self.guest.items():
            if base <= address and address + count <= base + len(ram):
                return ram, address - base
        return None

    def serve_dma(self, msg_id: int, command: int, size: int, payload: bytes) -> None:
        """QEMU's vfio_user_dma_read/vfio_user_dma_write (hw/vfio-user/pci.c)."""
        at_data = self.dma_data_offset
        address = int.from_bytes(payload[0:8], "little")
        count = int.from_bytes(payload[8:at_data], "little")
        self.dma_log.append((command, address, count, size))
        if size < 32 or (command == DMA_WRITE and count > size - 32):
            error = errno.EINVAL if size < 32 else errno.E2BIG
            self.sock.sendall(HDR.pack(msg_id, command, 16, REPLY | ERROR, error))
            return
        found = self._guest(address, count)
        if found is None:
            self.sock.sendall(HDR.pack(msg_id, command, 16, REPLY | ERROR, errno.EFAULT))
            return
        ram, at = found
        head = payload[:16]  # the request's own address and count, echoed
        if command == DMA_WRITE:
            ram[at : at + count] = payload[at_data : at_data + count]
            self.sock.sendall(HDR.pack(msg_id, command, 16 + len(head), REPLY, 0) + head)
        else:
            body = (head[:at_data] + bytes(ram[at : at + count])).ljust(16 + count, b"\0")
            self.sock.sendall(HDR.pack(msg_id, command, 16 + len(body), REPLY, 0) + body)

    def call(
        self, command: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = 0
    ) -> Reply:
        msg_id = self.send(command, payload, fds, flags)
        reply = self.receive()
        assert reply.msg_id == msg_id and reply.command == command
        return reply

    # -- the messages

    def version(self) -> dict[str, object]:
        caps = {
            "capabilities": {
                "max_msg_fds": 16,
                "max_data_xfer_size": 1 << 20,
                "pgsizes": 4096,
                "max_dma_maps": 65535,
                "migration": {"pgsize": 4096, "max_bitmap_size": 256 << 20},
                "write_multiple": True,
            }
        }
        reply = self.call(VERSION, struct.pack("<HH", 0, 0) + json.dumps(caps).encode() + b"\0")
        assert reply.ok
        major, minor = struct.unpack_from("<HH", reply.payload)
        assert (major, minor) == (0, 0)
        assert reply.payload[-1] == 0  # NUL-terminated JSON (QEMU checks this)
        document = json.loads(reply.payload[4:-1])
        assert isinstance(document, dict)
        return document

    def region_info(self, index: int) -> tuple[int, int]:
        reply = self.call(REGION_INFO, struct.pack("<IIIIQQ", 32, 0, index, 0, 0, 0))
        assert reply.ok
        argsz, flags, got, _, size, _ = struct.unpack("<IIIIQQ", reply.payload)
        assert (argsz, got) == (32, index)
        return flags, size

    def irq_info(self, index: int) -> tuple[int, int]:
        reply = self.call(IRQ_INFO, struct.pack("<IIII", 16, 0, index, 0))
        assert reply.ok
        _, flags, got, count = struct.unpack("<IIII", reply.payload)
        assert got == index
        return flags, count

    def read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.call(READ, struct.pack("<QII", offset, region, count))
        assert reply.ok, f"read error {reply.error}"
        got_offset, got_region, got_count = struct.unpack_from("<QII", reply.payload)
        assert (got_offset, got_region, got_count) == (offset, region, count)
        assert len(reply.payload) == 16 + count
        return reply.payload[16:]

    def read_int(self, region: int, offset: int, size: int) -> int:
        return int.from_bytes(self.read(region, offset, size), "little")

    def write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        payload = struct.pack("<QII", offset, region, len(data)) + data
        if posted:  # QEMU's default for BAR writes: no reply ever comes
            self.send(WRITE, payload, flags=NO_REPLY)
            return
        reply = self.call(WRITE, payload)
        assert reply.ok, f"write error {reply.error}"
        assert reply.payload == payload[:16]

    def write_int(self, region: int, offset: int, size: int, value: int, **kw: bool) -> None:
        self.write(region, offset, value.to_bytes(size, "little"), **kw)

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: Sequence[int]) -> Reply:
        return self.call(SET_IRQS, struct.pack("<IIIII", 20, flags, index, start, count), fds)


def fired(fd: int, timeout: float = 2.0) -> int:
    """The eventfd's counter once it is signalled (0 if it was not within `timeout`)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.eventfd_read(fd) if ready else 0


def open_fds_to(target: str) -> int:
    """How many of this process's descriptors point at `target` (a readlink string)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                count += 1
        except OSError:
            pass
    return count


def memfd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@dataclass
class Rig:
    server: DevServer
    bridge: VfioUserBridge
    session: AsyncSession
    sockets: dict[str, Path]


@contextlib.asynccontextmanager
async def running_rig(
    tmp_path: Path, memory_mode: MemoryMode, dma_layout: DmaLayout = "spec"
) -> AsyncIterator[Rig]:
    """Two test devices on a real device server, behind a running bridge."""
    server = DevServer(
        [parse_device_spec(d) for d in ("pci-testdev", "pci-testdev,slot=5,name=second")],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
    )
    await server.start()
    channel = open_channel(server.address)
    bridge = VfioUserBridge(
        tmp_path / "vfu", access_timeout=2.0, memory_mode=memory_mode, dma_layout=dma_layout
    )
    session = await AsyncSession.attach(
        channel, bridge.frontend_options("test"), on_event=bridge.on_event, on_dma=bridge.on_dma
    )
    sockets = await bridge.start(session)
    try:
        yield Rig(server, bridge, session, sockets)
    finally:
        await bridge.stop()
        await session.close()
        await channel.close(None)
        await server.stop(0)


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """The bridge in shared mode (its default): the server maps QEMU's memfds."""
    async with running_rig(tmp_path, "shared") as r:
        yield r


@pytest_asyncio.fixture
async def messages_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """The bridge in message mode: every transfer is a DmaRequest it serves."""
    async with running_rig(tmp_path, "messages") as r:
        yield r


def device_of(rig: Rig, name: str) -> Device:
    (device,) = (d for d in rig.bridge.devices.values() if d.name == name)
    return device


def handler_of(rig: Rig, name: str) -> DeviceHandler:
    handler = device_of(rig, name).handler
    assert handler is not None
    return handler


@pytest.fixture
def eventfds() -> Iterator[list[int]]:
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    yield fds
    for fd in fds:
        os.close(fd)


def find_capability(client: Client, cap_id: int) -> int:
    pointer = client.read_int(CONFIG, 0x34, 1) & 0xFC
    for _ in range(48):
        assert pointer >= 0x40, "capability not found"
        header = client.read_int(CONFIG, pointer, 2)
        if header & 0xFF == cap_id:
            return pointer
        pointer = (header >> 8) & 0xFC
    raise AssertionError("capability list does not end")


def enumerate_and_enable(client: Client) -> None:
    """VERSION, device info, BAR sizing through config space, then decoding on."""
    caps = client.version()["capabilities"]
    assert isinstance(caps, dict)
    assert caps["max_data_xfer_size"] == 1 << 20 and caps["pgsizes"] == 4096
    assert caps["max_msg_fds"] >= 1 and caps["max_dma_maps"] >= 1
    assert "write_multiple" not in caps  # so QEMU never sends REGION_WRITE_MULTI

    reply = client.call(GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
    assert reply.ok
    assert struct.unpack("<IIII", reply.payload) == (16, 0x3, 9, 5)  # RESET|PCI, 9 regions, 5 irqs

    sizes = {i: client.region_info(i) for i in range(9)}
    assert sizes[0] == (0x3, 0x100)  # IO BAR
    assert sizes[1] == (0, 0)
    assert sizes[2] == (0x3, 0x10000)  # 64-bit prefetchable BAR ...
    assert sizes[3] == (0, 0)  # ... whose upper half is no region
    assert sizes[4] == (0x3, 0x1000)  # MSI-X table and PBA
    assert sizes[5] == (0, 0)
    assert sizes[6] == (0x1, 0x800)  # ROM: read-only
    assert sizes[7] == (0x3, 4096)  # config space, extended caps included
    assert sizes[8] == (0, 0)  # no VGA

    config = client.read(CONFIG, 0, 4096)  # what QEMU reads at realize
    assert config[0:4] == bytes.fromhex("3412577e")  # 1234:7e57
    assert client.read_int(CONFIG, 0x3D, 1) == 1  # INTA#

    # BAR sizing, as SeaBIOS and Linux do it.
    expected = {0x10: 0xFFFFFF01, 0x18: 0xFFFF000C, 0x1C: 0xFFFFFFFF, 0x20: 0xFFFFF000}
    for register, mask in expected.items():
        client.write_int(CONFIG, register, 4, 0xFFFFFFFF)
        assert client.read_int(CONFIG, register, 4) == mask, hex(register)
    for register, base in {0x10: 0xC000, 0x18: 0xFE000000, 0x1C: 0, 0x20: 0xFEBF0000}.items():
        client.write_int(CONFIG, register, 4, base)
    client.write_int(CONFIG, 0x04, 2, 0x0007)  # IO | MEM | bus master
    assert client.read_int(CONFIG, 0x04, 2) & 0x7 == 0x7
    assert client.read_int(CONFIG, 0x10, 4) == 0xC001


def scenario_accesses(client: Client, intx: int) -> None:
    enumerate_and_enable(client)

    # Registers through both BARs, every width; odd sizes split into aligned pieces.
    assert client.read_int(IO_BAR, 0, 4) == ID_VALUE
    assert client.read_int(MEM_BAR, 0, 4) == ID_VALUE
    client.write_int(MEM_BAR, 4, 4, 0xCAFEF00D, posted=True)
    assert client.read_int(MEM_BAR, 4, 4) == 0xCAFEF00D
    assert client.read_int(MEM_BAR, 0, 8) == 0xCAFEF00D << 32 | ID_VALUE
    client.write_int(IO_BAR, 4, 4, 0x12345678)  # non-posted
    assert client.read_int(IO_BAR, 4, 2) == 0x5678
    sixteen = client.read(MEM_BAR, 0, 16)  # split into two 8-byte reads
    assert struct.unpack("<IIII", sixteen)[:2] == (ID_VALUE, 0x12345678)
    client.write(MEM_BAR, 0x1001, b"\xaa\xbb\xcc", posted=True)  # 1 + 2 bytes
    assert client.read(MEM_BAR, 0x1000, 5) == b"\x00\xaa\xbb\xcc\x00"
    assert client.read(6, 0, 8) == b"DEVMODEL"  # the expansion ROM

    # INTx: QEMU arms it with an eventfd; a doorbell with MSI-X off asserts the line.
    flags, count = client.irq_info(INTX)
    assert count == 1 and flags & 0x7 == 0x7  # EVENTFD | MASKABLE | AUTOMASKED
    assert client.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, [intx]).ok
    client.write_int(MEM_BAR, 8, 4, 0, posted=True)
    assert fired(intx) == 1
    client.write_int(MEM_BAR, 0xC, 4, 1, posted=True)  # acknowledge: the line drops
    assert client.set_irqs(INTX, NONE_UNMASK, 0, 1, []).ok  # QEMU's EOI
    assert fired(intx, 0.2) == 0  # no longer asserted: no second interrupt
    # Level semantics: asserted across the unmask means a second interrupt.
    client.write_int(MEM_BAR, 8, 4, 0, posted=True)
    assert fired(intx) == 1
    assert client.set_irqs(INTX, NONE_UNMASK, 0, 1, []).ok
    assert fired(intx) == 1
    client.write_int(MEM_BAR, 0xC, 4, 1, posted=True)
    assert client.set_irqs(INTX, NONE_TRIGGER, 0, 0, []).ok  # QEMU's disable


def scenario_msix(client: Client, msix: int) -> None:
    flags, count = client.irq_info(MSIX)
    assert count == 4 and flags & 0x1
    assert client.irq_info(1)[1] == 0  # no MSI
    assert client.irq_info(3)[1] == 1  # ERR
    assert client.irq_info(4)[1] == 1  # REQ

    cap = find_capability(client, 0x11)
    control = client.read_int(CONFIG, cap + 2, 2)
    assert control & 0x7FF == 3  # table size 4
    client.write_int(CONFIG, cap + 2, 2, control | 0x8000)  # MSI-X enable
    table = client.read_int(CONFIG, cap + 4, 4)
    assert table & 7 == MSIX_BAR
    # QEMU switches MSI-X on with an fd-less message, then gives vector 0 its eventfd.
    assert client.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 1, []).ok
    assert client.set_irqs(MSIX, EVENTFD_TRIGGER, 0, 1, [msix]).ok
    # Unmask vector 0 in the server's table (the bridge forwards BAR4 like any BAR).
    client.write_int(MSIX_BAR, (table & ~7) + 12, 4, 0, posted=True)
    client.write_int(MEM_BAR, 8, 4, 0, posted=True)  # doorbell: vector 0
    assert fired(msix) == 1
    # A vector with no eventfd does not land on vector 0's.
    client.write_int(MEM_BAR, 8, 4, 1, posted=True)
    assert fired(msix, 0.2) == 0
    assert client.set_irqs(MSIX, NONE_TRIGGER, 0, 0, []).ok


def scenario_errors_dma_reset(client: Client, ram: int) -> None:
    # Refused requests get error replies and the connection goes on.
    reply = client.call(99)
    assert (reply.flags & ERROR, reply.error, reply.payload) == (ERROR, errno.ENOSYS, b"")
    reply = client.call(READ, struct.pack("<QII", 0, 8, 4))  # VGA: no such region
    assert reply.error == errno.EINVAL
    reply = client.call(READ, struct.pack("<QII", 0xFFE, CONFIG, 4))  # runs past the end
    assert reply.error == errno.EINVAL
    reply = client.call(READ, struct.pack("<QII", 0, CONFIG, 4), [ram])  # stray fd
    assert reply.error == errno.EINVAL
    assert client.read_int(CONFIG, 0, 2) == 0x1234

    # DMA_MAP with a memfd; DMA_UNMAP echoes the request.
    dma_map = struct.pack("<IIQQQ", 32, 0x3, 0, 0x100000, 0x10000)
    assert client.call(DMA_MAP, dma_map, [ram]).ok
    overlap = struct.pack("<IIQQQ", 32, 0x3, 0, 0x108000, 0x1000)
    assert client.call(DMA_MAP, overlap).error == errno.EEXIST


def scenario_unmap_and_reset(client: Client) -> None:
    unmap = struct.pack("<IIQQ", 24, 0, 0x100000, 0x10000)
    reply = client.call(DMA_UNMAP, unmap)
    assert reply.ok and reply.payload == unmap

    client.write_int(MEM_BAR, 4, 4, 0x5555AAAA, posted=True)
    assert client.call(RESET).ok
    assert client.read_int(CONFIG, 0x04, 2) == 0  # decoding off after a function reset
    assert client.read_int(MEM_BAR, 0x14, 4) == 1  # RESETS register
    assert client.read_int(MEM_BAR, 4, 4) == 0  # scratch cleared


async def test_qemu_like_session(rig: Rig, eventfds: list[int], tmp_path: Path) -> None:
    intx, msix = eventfds
    client = Client(rig.sockets["pci-testdev0"])
    ram = os.memfd_create("vfu-test-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(ram, 0x10000)
        target = memfd_target(ram)
        eventfd_links = open_fds_to("anon_inode:[eventfd]")
        await asyncio.to_thread(scenario_accesses, client, intx)
        await asyncio.to_thread(scenario_msix, client, msix)
        await asyncio.to_thread(scenario_errors_dma_reset, client, ram)

        # The bridge holds its own dup of the memfd, and can DMA through it; the
        # server (in this process) mapped it through /proc/<pid>/fd/<n>.
        assert open_fds_to(target) == 3
        assert rig.bridge.memory is not None
        assert rig.bridge.memory.announced == [(0x100000, 0x10000)]
        handler = handler_of(rig, "pci-testdev0")
        os.pwrite(ram, b"guest data", 0x10)
        assert await handler.dma_read(0x100010, 10) == b"guest data"
        await handler.dma_write(0x100020, b"from the device")
        assert os.pread(ram, 15, 0x20) == b"from the device"

        await asyncio.to_thread(scenario_unmap_and_reset, client)
        assert open_fds_to(target) == 1  # DMA_UNMAP withdrew it and closed the bridge's copy
        assert rig.bridge.memory.announced == []

        # INTx and MSI-X were disabled: the bridge kept no eventfd.
        assert open_fds_to("anon_inode:[eventfd]") == eventfd_links
    finally:
        client.close()
        os.close(ram)


async def test_disconnect_releases_descriptors(rig: Rig, eventfds: list[int]) -> None:
    intx, msix = eventfds
    ram = os.memfd_create("vfu-test-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 0x4000)
    target = memfd_target(ram)
    eventfd_links = open_fds_to("anon_inode:[eventfd]")
    client = Client(rig.sockets["second"])
    try:

        def arm() -> None:
            client.version()
            assert client.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, [intx]).ok
            assert client.set_irqs(MSIX, EVENTFD_TRIGGER, 2, 1, [msix]).ok
            assert client.call(DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 0x4000), [ram]).ok

        await asyncio.to_thread(arm)
        assert open_fds_to(target) == 3  # ours, the bridge's, the server's map
        assert open_fds_to("anon_inode:[eventfd]") == eventfd_links + 2
    finally:
        client.close()
        os.close(ram)
    # The bridge notices the hang-up and closes every descriptor QEMU gave it,
    # and withdraws the RAM from the server, which unmaps it.
    for _ in range(100):
        if open_fds_to("anon_inode:[eventfd]") == eventfd_links and open_fds_to(target) == 0:
            break
        await asyncio.sleep(0.02)
    assert open_fds_to("anon_inode:[eventfd]") == eventfd_links
    assert open_fds_to(target) == 0
    assert device_of(rig, "second").handler is None  # ready for the next client


async def test_devices_share_one_session(rig: Rig) -> None:
    first = Client(rig.sockets["pci-testdev0"])
    second = Client(rig.sockets["second"])
    try:

        def run() -> None:
            for client in (first, second):
                enumerate_and_enable(client)
            first.write_int(MEM_BAR, 4, 4, 0x11111111)
            second.write_int(MEM_BAR, 4, 4, 0x22222222)
            assert first.read_int(MEM_BAR, 4, 4) == 0x11111111
            assert second.read_int(MEM_BAR, 4, 4) == 0x22222222

        await asyncio.to_thread(run)
    finally:
        first.close()
        second.close()
    assert rig.server.servicer.counters.sessions_total == 1


async def test_second_client_is_refused(rig: Rig) -> None:
    first = Client(rig.sockets["second"])
    try:
        await asyncio.to_thread(first.version)
        intruder = Client(rig.sockets["second"])
        try:
            intruder.sock.settimeout(2)
            assert await asyncio.to_thread(intruder.sock.recv, 16) == b""
        finally:
            intruder.close()
        assert await asyncio.to_thread(first.read_int, CONFIG, 0, 2) == 0x1234
    finally:
        first.close()


async def test_server_gone_reads_all_ones(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    client = Client(rig.sockets["pci-testdev0"])
    try:
        await asyncio.to_thread(enumerate_and_enable, client)
        await rig.server.stop(0)

        def after() -> float:
            start = time.monotonic()
            assert client.read(CONFIG, 0, 4) == b"\xff" * 4
            assert client.read(MEM_BAR, 0, 8) == b"\xff" * 8
            assert client.read(CONFIG, 0, 4096) == b"\xff" * 4096
            client.write_int(MEM_BAR, 4, 4, 1, posted=True)  # dropped
            client.write_int(CONFIG, 4, 2, 0)  # dropped, but answered
            assert client.call(RESET).error == errno.ENODEV
            return time.monotonic() - start

        assert await asyncio.to_thread(after) < 1.0
    finally:
        client.close()
    lost = [r for r in caplog.records if r.getMessage().startswith("device server unreachable")]
    assert len(lost) == 1  # logged once


async def test_msix_without_touching_the_server_table(rig: Rig, eventfds: list[int]) -> None:
    """QEMU's route: it emulates the MSI-X table and only hands out eventfds.

    The bridge unmasks a vector in the server's table when it gets its eventfd
    and masks it when the eventfd is withdrawn, so an interrupt raised in
    between is held by the server and delivered when the vector comes back.
    """
    vector2 = eventfds[0]
    client = Client(rig.sockets["second"])
    try:

        def run() -> None:
            enumerate_and_enable(client)
            cap = find_capability(client, 0x11)
            client.write_int(CONFIG, cap + 2, 2, 0xC000)  # ENABLE | MASKALL, as Linux does
            client.write_int(CONFIG, 0x04, 2, 0x0407)  # INTx disable
            client.write_int(CONFIG, cap + 2, 2, 0x8000)  # MASKALL cleared
            assert client.set_irqs(MSIX, EVENTFD_TRIGGER, 2, 1, [vector2]).ok
            client.write_int(MEM_BAR, 8, 4, 2, posted=True)
            assert fired(vector2) == 1
            assert client.set_irqs(MSIX, EVENTFD_TRIGGER, 2, 1, []).ok  # guest masked it
            client.write_int(MEM_BAR, 8, 4, 2, posted=True)
            assert client.read_int(MSIX_BAR, 0x800, 8) == 1 << 2  # pending in the PBA
            assert fired(vector2, 0.2) == 0
            assert client.set_irqs(MSIX, EVENTFD_TRIGGER, 2, 1, [vector2]).ok  # unmasked
            assert fired(vector2) == 1  # the held interrupt
            assert client.read_int(MSIX_BAR, 0x800, 8) == 0

        await asyncio.to_thread(run)
    finally:
        client.close()


async def test_run_bridge(tmp_path: Path) -> None:
    server = DevServer([parse_device_spec("pci-testdev")], Listen(unix_path=tmp_path / "dev.sock"))
    await server.start()
    try:
        stop = asyncio.Event()
        ready: asyncio.Future[VfioUserBridge] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_bridge(server.address, tmp_path / "vfu", ready=ready.set_result, stop=stop)
        )
        bridge = await asyncio.wait_for(ready, 10)
        path = tmp_path / "vfu" / "pci-testdev0.sock"
        assert bridge.sockets == {"pci-testdev0": path}
        (flag, spec) = bridge.qemu_args(root_ports=False)
        assert flag == "-device" and json.loads(spec)["socket"]["path"] == str(path)
        assert path.stat().st_mode & 0o777 == 0o600
        client = Client(path)
        try:
            assert "capabilities" in await asyncio.to_thread(client.version)
        finally:
            client.close()
        stop.set()
        await asyncio.wait_for(task, 10)
        assert not path.exists()
    finally:
        await server.stop(0)


# ---------------------------------------------------------------- device DMA end to end

GUEST_RAM = 0x10_0000
RAM_BYTES = 0x1_0000
DMA_ADDR_LO, DMA_ADDR_HI, DMA_LEN, DMA_CMD, DMA_STATUS = 0x18, 0x1C, 0x20, 0x24, 0x28
FROM_GUEST, TO_GUEST = 1, 2
BUSY, DONE, DMA_ERROR = 1, 2, 4


@pytest.fixture
def guest_ram() -> Iterator[int]:
    fd = os.memfd_create("vfu-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM_BYTES)
    yield fd
    os.close(fd)


def map_ram(client: Client, address: int, size: int, fd: int | None, offset: int = 0) -> None:
    payload = struct.pack("<IIQQQ", 32, 0x3, offset, address, size)
    assert client.call(DMA_MAP, payload, [fd] if fd is not None else []).ok


def unmap_ram(client: Client, address: int, size: int) -> None:
    assert client.call(DMA_UNMAP, struct.pack("<IIQQ", 24, 0, address, size)).ok


def run_dma(client: Client, command: int, address: int, length: int) -> int:
    """What a guest driver does: program the engine with posted writes, then poll."""
    client.write_int(MEM_BAR, DMA_ADDR_LO, 4, address & 0xFFFF_FFFF, posted=True)
    client.write_int(MEM_BAR, DMA_ADDR_HI, 4, address >> 32, posted=True)
    client.write_int(MEM_BAR, DMA_LEN, 4, length, posted=True)
    client.write_int(MEM_BAR, DMA_CMD, 4, command, posted=True)
    for _ in range(1000):
        status = client.read_int(MEM_BAR, DMA_STATUS, 4)
        if not status & BUSY:
            break
        time.sleep(0.002)
    client.write_int(MEM_BAR, DMA_STATUS, 4, DONE | DMA_ERROR, posted=True)
    client.write_int(MEM_BAR, 0xC, 4, 0xFFFF_FFFF, posted=True)  # IRQ_STATUS
    return status


async def test_guest_dma_through_shared_memory(
    rig: Rig, guest_ram: int, eventfds: list[int]
) -> None:
    intx = eventfds[0]
    client = Client(rig.sockets["pci-testdev0"])
    target = memfd_target(guest_ram)
    os.pwrite(guest_ram, b"guest data", 0x200)
    try:

        def run() -> None:
            enumerate_and_enable(client)  # bus master on
            assert client.set_irqs(INTX, EVENTFD_TRIGGER, 0, 1, [intx]).ok
            map_ram(client, 0xFFFC_0000, 0x4_0000, None)  # the BIOS: no fd, not RAM
            map_ram(client, GUEST_RAM, RAM_BYTES, guest_ram)
            assert run_dma(client, FROM_GUEST, GUEST_RAM + 0x200, 10) == DONE
            assert fired(intx) == 1
            assert client.read(MEM_BAR, 0x1000, 10) == b"guest data"
            client.write(MEM_BAR, 0x1000, b"device data", posted=True)
            assert run_dma(client, TO_GUEST, GUEST_RAM + 0x300, 11) == DONE
            assert os.pread(guest_ram, 11, 0x300) == b"device data"
            assert run_dma(client, TO_GUEST, 0xFFFC_0000, 11) == DMA_ERROR  # ROM: not shared
            client.write_int(CONFIG, 0x04, 2, 0x0003)  # bus master off
            assert run_dma(client, TO_GUEST, GUEST_RAM, 4) == DMA_ERROR

        await asyncio.to_thread(run)
        assert client.dma_log == []  # no transfer went through QEMU
        assert rig.bridge.memory is not None
        assert rig.bridge.memory.announced == [(GUEST_RAM, RAM_BYTES)]
        stats = rig.server.servicer.counters.devices[1]
        assert (stats.dma_requests, stats.dma_errors) == (3, 1)
        await asyncio.to_thread(unmap_ram, client, GUEST_RAM, RAM_BYTES)
        assert rig.bridge.memory.announced == []
        assert open_fds_to(target) == 1  # the server and the bridge let go
        await asyncio.to_thread(client.write_int, CONFIG, 0x04, 2, 0x0007)
        assert await asyncio.to_thread(run_dma, client, TO_GUEST, GUEST_RAM, 4) == DMA_ERROR
    finally:
        client.close()


async def test_ram_mapped_by_every_device_is_announced_once(rig: Rig, guest_ram: int) -> None:
    """QEMU sends each vfio-user device the same DMA_MAPs; the server gets one map."""
    first = Client(rig.sockets["pci-testdev0"])
    second = Client(rig.sockets["second"])
    target = memfd_target(guest_ram)
    memory = rig.bridge.memory
    assert memory is not None
    try:

        def map_both() -> None:
            for client in (first, second):
                enumerate_and_enable(client)
                map_ram(client, GUEST_RAM, 0x8000, guest_ram)
                map_ram(client, GUEST_RAM + 0x8000, 0x8000, guest_ram, offset=0x8000)

        await asyncio.to_thread(map_both)
        assert memory.announced == [(GUEST_RAM, 0x8000), (GUEST_RAM + 0x8000, 0x8000)]
        # SeaBIOS-style remap on one connection: its new window overlaps the
        # other connection's old one, so the server keeps the old until both moved.
        await asyncio.to_thread(unmap_ram, first, GUEST_RAM, 0x8000)
        await asyncio.to_thread(map_ram, first, GUEST_RAM, 0x4000, guest_ram)
        assert memory.announced == [(GUEST_RAM, 0x8000), (GUEST_RAM + 0x8000, 0x8000)]
        os.pwrite(guest_ram, b"seam", 0x7FFE)
        assert await asyncio.to_thread(run_dma, first, FROM_GUEST, GUEST_RAM + 0x7FFE, 4) == DONE
        await asyncio.to_thread(unmap_ram, second, GUEST_RAM, 0x8000)
        assert memory.announced == [(GUEST_RAM, 0x4000), (GUEST_RAM + 0x8000, 0x8000)]
        assert await asyncio.to_thread(first.read, MEM_BAR, 0x1000, 4) == b"seam"
    finally:
        first.close()
        second.close()
    for _ in range(100):  # both hung up: everything withdrawn and closed
        if memory.announced == [] and open_fds_to(target) == 1:
            break
        await asyncio.sleep(0.02)
    assert memory.announced == [] and open_fds_to(target) == 1


@pytest.mark.parametrize(("layout", "offset"), [("spec", 16), ("u32-count", 12)])
async def test_guest_dma_through_dma_messages(
    tmp_path: Path, layout: DmaLayout, offset: int
) -> None:
    """No fd for guest RAM: the bridge asks QEMU with DMA_READ/DMA_WRITE."""
    ram = bytearray(RAM_BYTES)
    ram[0x40:0x4C] = b"via DMA_READ"
    async with running_rig(tmp_path, "messages", layout) as messages_rig:
        client = Client(
            messages_rig.sockets["pci-testdev0"], guest={GUEST_RAM: ram}, dma_data_offset=offset
        )
        await drive_dma_messages(messages_rig, client)
    assert ram[0x80:0x8D] == b"via DMA_WRITE"
    # 16-byte requests (32 with the header); a write is 32 + count long in both layouts.
    assert client.dma_log == [
        (DMA_READ, GUEST_RAM + 0x40, 12, 32),
        (DMA_WRITE, GUEST_RAM + 0x80, 13, 32 + 13),
    ]


async def drive_dma_messages(messages_rig: Rig, client: Client) -> None:
    try:

        def run() -> None:
            enumerate_and_enable(client)
            map_ram(client, GUEST_RAM, RAM_BYTES, None)
            assert run_dma(client, FROM_GUEST, GUEST_RAM + 0x40, 12) == DONE
            assert client.read(MEM_BAR, 0x1000, 12) == b"via DMA_READ"
            client.write(MEM_BAR, 0x1000, b"via DMA_WRITE", posted=True)
            assert run_dma(client, TO_GUEST, GUEST_RAM + 0x80, 13) == DONE
            # Outside every window: refused by the bridge, QEMU never asked.
            assert run_dma(client, TO_GUEST, GUEST_RAM + RAM_BYTES, 4) == DMA_ERROR

        await asyncio.to_thread(run)
    finally:
        client.close()
    assert messages_rig.bridge.memory is None


async def test_dma_messages_served_from_the_bridges_own_map(
    messages_rig: Rig, guest_ram: int
) -> None:
    """With an fd the bridge reads and writes QEMU's memfd itself; a transfer that
    runs on into an fd-less window continues with DMA_READ there."""
    tail = bytearray(0x1000)
    tail[:4] = b"TAIL"
    client = Client(messages_rig.sockets["second"], guest={GUEST_RAM + RAM_BYTES: tail})
    os.pwrite(guest_ram, b"HEAD", RAM_BYTES - 4)
    try:

        def run() -> None:
            enumerate_and_enable(client)
            map_ram(client, GUEST_RAM, RAM_BYTES, guest_ram)
            map_ram(client, GUEST_RAM + RAM_BYTES, 0x1000, None)
            assert run_dma(client, FROM_GUEST, GUEST_RAM + RAM_BYTES - 4, 8) == DONE
            assert client.read(MEM_BAR, 0x1000, 8) == b"HEADTAIL"
            assert run_dma(client, TO_GUEST, GUEST_RAM + 0x10, 8) == DONE

        await asyncio.to_thread(run)
    finally:
        client.close()
    assert os.pread(guest_ram, 8, 0x10) == b"HEADTAIL"
    assert client.dma_log == [(DMA_READ, GUEST_RAM + RAM_BYTES, 4, 32)]
