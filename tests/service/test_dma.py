"""Device DMA over the Attach stream, in every memory mode, against a real server.

SHARED: guest RAM is a memfd this process made, named to the server as
/proc/self/fd/N (the server runs in this process, so that is "the same host").
DMA_MESSAGES: the test is the frontend and answers DmaRequest events through
AsyncSession's on_dma callback, from a BytearrayMemory. The test device's DMA
engine is driven through its registers as a guest driver would.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.devices.testdev import (
    DMA_CMD_FROM_GUEST,
    DMA_CMD_TO_GUEST,
    DMA_STATUS_BUSY,
    DMA_STATUS_DONE,
    DMA_STATUS_ERROR,
    MEM_BAR,
    RAM_OFFSET,
    REG_DMA_ADDR_HI,
    REG_DMA_ADDR_LO,
    REG_DMA_CMD,
    REG_DMA_LEN,
    REG_DMA_STATUS,
    REG_IRQ_STATUS,
    PciTestDevice,
)
from devserver.effects import AddressRange, Effect, IntxChanged
from devserver.memory import MAX_REGIONS, BytearrayMemory
from devserver.service import dma_messages
from devserver.service import servicer as servicer_module
from devserver.service.server import DevServer
from vmm_client.client import (
    AsyncSession,
    ClientError,
    FrontendOptions,
    MemoryRegion,
    SyncSession,
    get_stats,
    open_channel,
)

SLOT, SECOND = 1, 5
GUEST = 0x10_0000
RAM_SIZE = 0x1_0000


def fds_to(target: str) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            count += os.readlink(f"/proc/self/fd/{name}") == target
    return count


@pytest.fixture
def ram() -> Iterator[int]:
    """64 KiB of guest RAM in a sealed memfd, as QEMU's memory-backend-memfd makes it."""
    fd = os.memfd_create("dma-test-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    yield fd
    os.close(fd)


def ram_region(fd: int, base: int = GUEST, size: int = RAM_SIZE, offset: int = 0) -> MemoryRegion:
    return MemoryRegion(base, size, path=f"/proc/self/fd/{fd}", file_offset=offset)


@dataclass
class Frontend:
    """A session plus the guest driver's view of the test devices."""

    session: AsyncSession
    channel: grpc.aio.Channel
    events: list[Effect] = field(default_factory=list)

    async def enable(self, device: int = SLOT, command: int = 0x6) -> None:
        await self.session.config_write(0, device, 0, 0x04, 2, command)  # MEM | bus master

    def program(self, address: int, length: int, device: int = SLOT) -> None:
        s = self.session
        s.bar_write(device, MEM_BAR, REG_DMA_ADDR_LO, 4, address & 0xFFFF_FFFF)
        s.bar_write(device, MEM_BAR, REG_DMA_ADDR_HI, 4, address >> 32)
        s.bar_write(device, MEM_BAR, REG_DMA_LEN, 4, length)

    def command(self, command: int, device: int = SLOT) -> None:
        self.session.bar_write(device, MEM_BAR, REG_DMA_CMD, 4, command)

    async def status(self, device: int = SLOT) -> int:
        return await self.session.bar_read(device, MEM_BAR, REG_DMA_STATUS, 4)

    async def settled(self, device: int = SLOT) -> int:
        """Poll DMA_STATUS like a driver until BUSY clears (a DmaReply travels back
        on the stream, so the read right after a command may still see BUSY)."""
        for _ in range(200):
            status = await self.status(device)
            if not status & DMA_STATUS_BUSY:
                return status
            await asyncio.sleep(0.005)
        return status

    async def device_ram(self, length: int, device: int = SLOT) -> bytes:
        out = b""
        for at in range(0, length, 8):
            value = await self.session.bar_read(device, MEM_BAR, RAM_OFFSET + at, 8)
            out += value.to_bytes(8, "little")
        return out[:length]

    def fill_device_ram(self, data: bytes, device: int = SLOT) -> None:
        for at in range(0, len(data), 8):
            chunk = data[at : at + 8].ljust(8, b"\0")
            self.session.bar_write(
                device, MEM_BAR, RAM_OFFSET + at, 8, int.from_bytes(chunk, "little")
            )

    async def ack(self, device: int = SLOT) -> None:
        self.session.bar_write(device, MEM_BAR, REG_DMA_STATUS, 4, 0x6)
        self.session.bar_write(device, MEM_BAR, REG_IRQ_STATUS, 4, 0xFFFF_FFFF)
        await self.status(device)


@pytest_asyncio.fixture
async def connect(server: DevServer) -> AsyncIterator[Callable[..., object]]:
    opened: list[Frontend] = []

    async def attach(
        mode: int,
        regions: tuple[MemoryRegion, ...] = (),
        on_dma: Callable[[pb.DmaRequest], None] | None = None,
    ) -> Frontend:
        channel = open_channel(server.address)
        events: list[Effect] = []
        session = await AsyncSession.attach(
            channel,
            FrontendOptions("dma-test", memory_mode=mode, regions=regions),
            on_event=events.append,
            on_dma=on_dma,
        )
        frontend = Frontend(session, channel, events)
        opened.append(frontend)
        return frontend

    yield attach
    for frontend in opened:
        await frontend.session.close()
        await frontend.channel.close(None)


def no_dma(request: pb.DmaRequest) -> None:
    raise AssertionError(f"the server asked the frontend for DMA in shared mode: {request}")


# ---------------------------------------------------------------- SHARED


async def test_shared_dma_both_directions(connect: Callable[..., object], ram: int) -> None:
    f = await connect(pb.MEMORY_MODE_SHARED, (ram_region(ram),), no_dma)  # type: ignore[misc]
    assert isinstance(f, Frontend)
    await f.enable()
    os.pwrite(ram, b"written by the guest", 0x100)
    f.program(GUEST + 0x100, 20)
    f.command(DMA_CMD_FROM_GUEST)
    # A posted command, then a read: the DMA already happened when the read is answered.
    assert await f.status() == DMA_STATUS_DONE
    assert await f.device_ram(20) == b"written by the guest"
    assert IntxChanged(SLOT, 1, True) in f.events
    await f.ack()

    f.fill_device_ram(b"written by the device")
    f.program(GUEST + RAM_SIZE - 21, 21)  # ends exactly at the end of RAM
    f.command(DMA_CMD_TO_GUEST)
    assert await f.status() == DMA_STATUS_DONE
    assert os.pread(ram, 21, RAM_SIZE - 21) == b"written by the device"


async def test_shared_address_outside_the_map_is_an_error_status(
    connect: Callable[..., object], ram: int, server: DevServer
) -> None:
    f = await connect(pb.MEMORY_MODE_SHARED, (ram_region(ram),), no_dma)  # type: ignore[misc]
    assert isinstance(f, Frontend)
    await f.enable()
    for address, length in ((0, 4), (GUEST + RAM_SIZE - 2, 4), (2**64 - 4096, 4096)):
        f.program(address, length)
        f.command(DMA_CMD_TO_GUEST)
        assert await f.status() == DMA_STATUS_ERROR, hex(address)
        await f.ack()
    assert os.pread(ram, RAM_SIZE, 0) == bytes(RAM_SIZE)
    # Without bus mastering nothing happens either, even inside RAM.
    await f.enable(command=0x2)
    f.program(GUEST, 4)
    f.command(DMA_CMD_TO_GUEST)
    assert await f.status() == DMA_STATUS_ERROR
    stats = {d.device_id: d for d in (await get_stats(f.channel)).devices}[SLOT]
    assert (stats.dma_requests, stats.dma_errors) == (3, 3)  # BME-off never reached the server


async def test_memory_map_update_during_a_session(
    connect: Callable[..., object], ram: int, server: DevServer
) -> None:
    """The frontend's map starts empty and follows it, as QEMU's DMA_MAPs do."""
    f = await connect(pb.MEMORY_MODE_SHARED, (), no_dma)  # type: ignore[misc]
    assert isinstance(f, Frontend)
    target = os.readlink(f"/proc/self/fd/{ram}")
    await f.enable()
    f.program(GUEST, 4)
    f.command(DMA_CMD_TO_GUEST)
    assert await f.status() == DMA_STATUS_ERROR  # nothing mapped yet
    await f.ack()

    # Two halves, from the two halves of the memfd: one access may span them.
    await f.session.memory_map_update(
        add=[
            ram_region(ram, GUEST, 0x8000),
            ram_region(ram, GUEST + 0x8000, 0x8000, offset=0x8000),
        ]
    )
    assert fds_to(target) == 3  # ours and the server's two maps
    f.fill_device_ram(b"across the seam!")
    f.program(GUEST + 0x7FF8, 16)
    f.command(DMA_CMD_TO_GUEST)
    assert await f.status() == DMA_STATUS_DONE
    assert os.pread(ram, 16, 0x7FF8) == b"across the seam!"
    await f.ack()

    await f.session.memory_map_update(remove=[AddressRange(GUEST, RAM_SIZE)])
    assert fds_to(target) == 1  # the server let go of both
    f.command(DMA_CMD_TO_GUEST)
    assert await f.status() == DMA_STATUS_ERROR
    assert (await get_stats(f.channel)).memory_map_updates == 2


async def test_session_end_releases_shared_memory(connect: Callable[..., object], ram: int) -> None:
    target = os.readlink(f"/proc/self/fd/{ram}")
    f = await connect(pb.MEMORY_MODE_SHARED, (ram_region(ram),))  # type: ignore[misc]
    assert isinstance(f, Frontend)
    assert fds_to(target) == 2
    await f.session.close()
    for _ in range(100):
        if fds_to(target) == 1:
            break
        await asyncio.sleep(0.01)
    assert fds_to(target) == 1


# ---------------------------------------------------------------- DMA_MESSAGES


@dataclass
class Answerer:
    """The frontend's side of DMA_MESSAGES: serve DmaRequests from a bytearray."""

    memory: BytearrayMemory = field(default_factory=lambda: BytearrayMemory(RAM_SIZE, GUEST))
    hold: bool = False
    held: list[pb.DmaRequest] = field(default_factory=list)
    seen: list[pb.DmaRequest] = field(default_factory=list)
    session: AsyncSession | None = None

    def __call__(self, request: pb.DmaRequest) -> None:
        self.seen.append(request)
        if self.hold:
            self.held.append(request)
        else:
            self.answer(request)

    def answer(self, request: pb.DmaRequest) -> None:
        assert self.session is not None
        try:
            if request.write:
                self.memory.write(request.address, request.data)
                self.session.dma_reply(request.request_id)
            else:
                data = self.memory.read(request.address, request.length)
                self.session.dma_reply(request.request_id, data=data)
        except Exception as e:  # outside our RAM: say so, as the bridge does
            self.session.dma_reply(request.request_id, error=str(e))


async def messages(connect: Callable[..., object], answerer: Answerer) -> Frontend:
    f = await connect(pb.MEMORY_MODE_DMA_MESSAGES, (), answerer)  # type: ignore[misc]
    assert isinstance(f, Frontend)
    answerer.session = f.session
    await f.enable()
    await f.enable(SECOND)
    return f


async def test_messages_dma_both_directions(connect: Callable[..., object]) -> None:
    answerer = Answerer()
    f = await messages(connect, answerer)
    answerer.memory.data[0x40:0x50] = b"guest bytes here"
    f.program(GUEST + 0x40, 16)
    f.command(DMA_CMD_FROM_GUEST)
    assert await f.settled() == DMA_STATUS_DONE
    assert await f.device_ram(16) == b"guest bytes here"
    (request,) = answerer.seen
    assert (request.device_id, request.address, request.length, request.write) == (
        SLOT,
        GUEST + 0x40,
        16,
        False,
    )
    await f.ack()

    f.fill_device_ram(b"device bytes")
    f.program(GUEST + 0x80, 12)
    f.command(DMA_CMD_TO_GUEST)
    assert await f.settled() == DMA_STATUS_DONE
    assert answerer.memory.data[0x80:0x8C] == b"device bytes"
    assert answerer.seen[1].write and answerer.seen[1].data == b"device bytes"
    assert answerer.seen[1].request_id != request.request_id


async def test_reads_are_answered_while_a_dma_reply_is_owed(
    connect: Callable[..., object],
) -> None:
    """The server never waits for the frontend: a vCPU polling status is answered."""
    answerer = Answerer(hold=True)
    f = await messages(connect, answerer)
    answerer.memory.data[:4] = b"abcd"
    f.program(GUEST, 4)
    f.command(DMA_CMD_FROM_GUEST)
    for _ in range(5):
        assert await f.status() == DMA_STATUS_BUSY
    f.command(DMA_CMD_TO_GUEST)  # ignored while busy
    assert await f.session.config_read(0, SLOT, 0, 0, 2) == 0x1234
    assert len(answerer.held) == 1
    events_before = len(f.events)
    answerer.answer(answerer.held.pop())
    assert await f.settled() == DMA_STATUS_DONE
    assert await f.device_ram(4) == b"abcd"
    assert f.events[events_before:] == [IntxChanged(SLOT, 1, True)]


async def test_replies_match_by_id_in_any_order(connect: Callable[..., object]) -> None:
    answerer = Answerer(hold=True)
    f = await messages(connect, answerer)
    answerer.memory.data[:8] = b"AAAABBBB"
    f.program(GUEST, 4, SLOT)
    f.program(GUEST + 4, 4, SECOND)
    f.command(DMA_CMD_FROM_GUEST, SLOT)
    f.command(DMA_CMD_FROM_GUEST, SECOND)
    await f.status()
    first, second = answerer.held
    answerer.answer(second)
    assert await f.settled(SECOND) == DMA_STATUS_DONE
    assert await f.status(SLOT) == DMA_STATUS_BUSY
    answerer.answer(first)
    assert await f.settled(SLOT) == DMA_STATUS_DONE
    assert await f.device_ram(4, SLOT) == b"AAAA"
    assert await f.device_ram(4, SECOND) == b"BBBB"


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (lambda r: pb.DmaReply(request_id=r, ok=False, error="no such page"), "no such page"),
        (lambda r: pb.DmaReply(request_id=r, ok=False), "refused"),
        (lambda r: pb.DmaReply(request_id=r, ok=True, data=b"abc"), "returned 3 bytes"),
    ],
    ids=["error", "bare-error", "short"],
)
async def test_failed_replies_are_an_error_status(
    connect: Callable[..., object],
    server: DevServer,
    reply: Callable[[int], pb.DmaReply],
    needle: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    answerer = Answerer(hold=True)
    f = await messages(connect, answerer)
    f.program(GUEST, 4)
    f.command(DMA_CMD_FROM_GUEST)
    await f.status()
    (request,) = answerer.held
    f.session._send(pb.Request(dma_reply=reply(request.request_id)))
    assert await f.settled() == DMA_STATUS_ERROR
    assert await f.device_ram(4) == bytes(4)
    session = server.servicer._session
    assert session is not None
    device = session.bus.function(SLOT)
    assert isinstance(device, PciTestDevice)
    assert needle in device.dma_error


async def test_a_second_reply_to_one_request_ends_the_stream(
    connect: Callable[..., object],
) -> None:
    answerer = Answerer()
    f = await messages(connect, answerer)
    f.program(GUEST, 4)
    f.command(DMA_CMD_FROM_GUEST)
    assert await f.settled() == DMA_STATUS_DONE
    f.session.dma_reply(answerer.seen[0].request_id, data=b"more")
    with pytest.raises(ClientError, match="no DMA request with that id") as info:
        await f.status()  # orders after the stray reply, which ends the stream
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_outstanding_requests_are_bounded(
    connect: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer_module, "MAX_DMA_OUTSTANDING", 1)
    answerer = Answerer(hold=True)
    f = await messages(connect, answerer)
    f.program(GUEST, 4, SLOT)
    f.program(GUEST, 4, SECOND)
    f.command(DMA_CMD_FROM_GUEST, SLOT)
    f.command(DMA_CMD_FROM_GUEST, SECOND)
    assert await f.status(SECOND) == DMA_STATUS_ERROR  # failed at once, never sent
    assert await f.status(SLOT) == DMA_STATUS_BUSY
    assert len(answerer.seen) == 1


async def test_session_end_fails_what_the_frontend_owes(
    connect: Callable[..., object], server: DevServer
) -> None:
    answerer = Answerer(hold=True)
    f = await messages(connect, answerer)
    f.program(GUEST, 4)
    f.command(DMA_CMD_FROM_GUEST)
    assert await f.status() == DMA_STATUS_BUSY
    await f.session.close()
    for _ in range(100):
        if server.servicer._session is None:
            break
        await asyncio.sleep(0.01)
    async with open_channel(server.address) as channel:
        stats = {d.device_id: d for d in (await get_stats(channel)).devices}[SLOT]
        assert (stats.dma_requests, stats.dma_errors) == (1, 1)
        # The next frontend starts clean.
        session = await AsyncSession.attach(channel, FrontendOptions("next"))
        assert await session.bar_read(SLOT, MEM_BAR, REG_DMA_STATUS, 4) == 0
        await session.close()


async def test_an_unanswered_transfer_times_out(
    connect: Callable[..., object], server: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frontend that never answers: the engine's transfer fails after the DMA
    timeout (error status, interrupt sent on its own), the late reply is dropped,
    and the stream goes on."""
    monkeypatch.setattr(dma_messages, "DMA_TIMEOUT", 0.3)
    answerer = Answerer(hold=True)
    f = await messages(connect, answerer)
    f.program(GUEST, 4)
    f.command(DMA_CMD_FROM_GUEST)
    assert await f.status() == DMA_STATUS_BUSY
    events_before = len(f.events)
    for _ in range(200):
        if f.events[events_before:]:
            break
        await asyncio.sleep(0.01)
    assert f.events[events_before:] == [IntxChanged(SLOT, 1, True)]  # with no request of ours
    assert await f.status() == DMA_STATUS_ERROR
    session = server.servicer._session
    assert session is not None
    device = session.bus.function(SLOT)
    assert isinstance(device, PciTestDevice)
    assert "did not answer DMA request" in device.dma_error
    answerer.answer(answerer.held.pop())  # late: dropped, not a protocol error
    await f.ack()
    answerer.hold = False
    answerer.memory.data[:4] = b"next"
    f.command(DMA_CMD_FROM_GUEST)
    assert await f.settled() == DMA_STATUS_DONE
    assert await f.device_ram(4) == b"next"
    stats = {d.device_id: d for d in (await get_stats(f.channel)).devices}[SLOT]
    assert (stats.dma_requests, stats.dma_errors) == (2, 1)


# ---------------------------------------------------------------- NONE


async def test_no_memory_access_means_an_error_status(connect: Callable[..., object]) -> None:
    f = await connect(pb.MEMORY_MODE_NONE, (), no_dma)  # type: ignore[misc]
    assert isinstance(f, Frontend)
    await f.enable()
    f.program(GUEST, 4)
    f.command(DMA_CMD_FROM_GUEST)
    assert await f.status() == DMA_STATUS_ERROR
    assert IntxChanged(SLOT, 1, True) in f.events


# ---------------------------------------------------------------- hostile memory maps


@pytest.mark.parametrize(
    ("add", "remove", "code", "needle"),
    [
        ("overlap-existing", (), grpc.StatusCode.INVALID_ARGUMENT, "overlaps the region"),
        ("overlap-each-other", (), grpc.StatusCode.INVALID_ARGUMENT, r"add\[0\] and \[1\]"),
        ("empty", (), grpc.StatusCode.INVALID_ARGUMENT, "size 0"),
        ("wrap", (), grpc.StatusCode.INVALID_ARGUMENT, "wraps"),
        ("too-big", (), grpc.StatusCode.INVALID_ARGUMENT, "past the end"),
        ("no-path", (), grpc.StatusCode.INVALID_ARGUMENT, "needs a path"),
        ("missing", (), grpc.StatusCode.FAILED_PRECONDITION, "cannot open"),
        ("too-many", (), grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_REGIONS}"),
        ("none", ((GUEST + 0x800, 0x1000),), grpc.StatusCode.INVALID_ARGUMENT, "cuts"),
        ("none", ((2**64 - 1, 2),), grpc.StatusCode.INVALID_ARGUMENT, "wraps"),
        ("none", ((0, 0),), grpc.StatusCode.INVALID_ARGUMENT, "size 0"),
    ],
)
async def test_hostile_memory_map_update_ends_only_that_stream(
    connect: Callable[..., object],
    server: DevServer,
    ram: int,
    add: str,
    remove: tuple[tuple[int, int], ...],
    code: grpc.StatusCode,
    needle: str,
) -> None:
    target = os.readlink(f"/proc/self/fd/{ram}")
    f = await connect(pb.MEMORY_MODE_SHARED, (ram_region(ram, GUEST, 0x8000),))  # type: ignore[misc]
    assert isinstance(f, Frontend)
    path = f"/proc/self/fd/{ram}"
    regions = {
        "overlap-existing": [MemoryRegion(GUEST + 0x7000, 0x2000, path=path)],
        "overlap-each-other": [
            MemoryRegion(0x40_0000, 0x2000, path=path),
            MemoryRegion(0x40_1000, 0x1000, path=path),
        ],
        "empty": [MemoryRegion(0x40_0000, 0, path=path)],
        "wrap": [MemoryRegion(2**64 - 0x1000, 0x2000, path=path)],
        "too-big": [MemoryRegion(0x40_0000, RAM_SIZE, path=path, file_offset=0x1000)],
        "no-path": [MemoryRegion(0x40_0000, 0x1000)],
        "missing": [MemoryRegion(0x40_0000, 0x1000, path="/nonexistent/guest-ram")],
        "too-many": [
            MemoryRegion(0x40_0000 + i * 0x1000, 0x1000, path=path) for i in range(MAX_REGIONS)
        ],
        "none": [],
    }[add]
    with pytest.raises(ClientError, match=needle) as info:
        await f.session.memory_map_update(
            add=regions, remove=[AddressRange(b, s) for b, s in remove]
        )
    assert info.value.code == code
    for _ in range(100):  # the session's memory is let go with it
        if fds_to(target) == 1:
            break
        await asyncio.sleep(0.01)
    assert fds_to(target) == 1
    async with open_channel(server.address) as channel:
        session = await AsyncSession.attach(channel, FrontendOptions("after"))
        assert await session.config_read(0, SLOT, 0, 0, 2) == 0x1234
        await session.close()


async def test_sync_session_updates_the_map(server: DevServer, ram: int) -> None:
    """A blocking frontend (a KVM vCPU thread's view) follows its memory the same way."""

    def drive() -> tuple[int, bytes]:
        options = FrontendOptions("sync", memory_mode=pb.MEMORY_MODE_SHARED)
        with SyncSession(server.address, options) as s:
            s.memory_map_update(add=[ram_region(ram)])
            s.config_write(0, SLOT, 0, 0x04, 2, 0x6)
            for register, value in ((REG_DMA_ADDR_LO, GUEST + 0x10), (REG_DMA_LEN, 4)):
                s.bar_write(SLOT, MEM_BAR, register, 4, value)
            s.bar_write(SLOT, MEM_BAR, RAM_OFFSET, 4, int.from_bytes(b"sync", "little"))
            s.bar_write(SLOT, MEM_BAR, REG_DMA_CMD, 4, DMA_CMD_TO_GUEST)
            status = s.bar_read(SLOT, MEM_BAR, REG_DMA_STATUS, 4)
            s.memory_map_update(remove=[AddressRange(GUEST, RAM_SIZE)])
            return status, os.pread(ram, 4, 0x10)

    assert await asyncio.to_thread(drive) == (DMA_STATUS_DONE, b"sync")
