"""The bridge's protocol handler against a fake device server: no sockets, no gRPC."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmodel.v1 import devmodel_pb2 as pb
from devserver.effects import AddressRange, Effect, IntxChanged, MsiRaised
from vmm_client.client import ClientError, MemoryRegion
from vmm_client.vfio_user.__main__ import build_parser
from vmm_client.vfio_user.bridge import VfioUserBridge
from vmm_client.vfio_user.device import Device, device_layout, socket_name
from vmm_client.vfio_user.handler import DeviceHandler
from vmm_client.vfio_user.link import DmaError, ServerLink, resolve_memory_mode
from vmm_client.vfio_user.memory_mirror import MemoryMirror
from vmm_client.vfio_user.protocol import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    TYPE_REPLY,
    Command,
    DmaAccess,
    Header,
    Message,
    Version,
    encode_message,
)

from .test_protocol import QEMU_CAPS

EVENTFD_TRIGGER = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
MSIX_CAP = 0x40
TABLE_BAR = 4


def make_info(device_id: int) -> pb.DeviceInfo:
    return pb.DeviceInfo(
        device_id=device_id,
        type="pci-testdev",
        name=f"dev{device_id}",
        bus=0,
        device=device_id,
        function=0,
        vendor_id=0x1234,
        product_id=0x7E57,
        bars=[
            pb.BarInfo(index=0, kind=pb.BAR_KIND_IO, size=0x100),
            pb.BarInfo(index=2, kind=pb.BAR_KIND_MEM64, size=0x10000),
            pb.BarInfo(index=4, kind=pb.BAR_KIND_MEM32, size=0x1000),
            pb.BarInfo(index=6, kind=pb.BAR_KIND_ROM, size=0x800),
        ],
        interrupt_pin=1,
        msix_vectors=4,
    )


@dataclass
class FakeSession:
    """Config space as bytes, BAR reads answer their offset; every call is recorded."""

    topology: pb.Topology = field(default_factory=lambda: pb.Topology(devices=[make_info(1)]))
    config: bytearray = field(default_factory=lambda: bytearray(4096))
    calls: list[tuple[object, ...]] = field(default_factory=list)
    error: ClientError | None = None
    hang: bool = False
    on_event: list[Effect] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config[0:4] = bytes.fromhex("3412577e")
        self.config[0x34] = MSIX_CAP
        self.config[MSIX_CAP : MSIX_CAP + 2] = b"\x11\x00"  # MSI-X, end of list
        self.config[MSIX_CAP + 4 : MSIX_CAP + 8] = (0x800 | TABLE_BAR).to_bytes(4, "little")

    async def _enter(self, *call: object) -> None:
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        if self.hang:
            await asyncio.Event().wait()

    async def config_read(
        self, bus: int, device: int, function: int, offset: int, size: int
    ) -> int:
        await self._enter("config_read", offset, size)
        return int.from_bytes(self.config[offset : offset + size], "little")

    async def config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> list[Effect]:
        await self._enter("config_write", offset, size, value)
        self.config[offset : offset + size] = value.to_bytes(size, "little")
        return []

    async def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int:
        await self._enter("bar_read", bar, offset, size)
        return offset

    def bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None:
        self.calls.append(("bar_write", bar, offset, size, value))
        if self.error is not None:
            raise self.error

    async def reset_device(self, device_id: int) -> list[Effect]:
        await self._enter("reset", device_id)
        return []

    async def flush(self) -> None:
        self.calls.append(("flush",))

    def dma_reply(self, request_id: int, data: bytes = b"", error: str = "") -> None:
        self.calls.append(("dma_reply", request_id, data, error))

    async def memory_map_update(
        self, add: Sequence[MemoryRegion] = (), remove: Sequence[AddressRange] = ()
    ) -> None:
        await self._enter("memory_map_update", tuple(add), tuple(remove))


@dataclass
class Rig:
    session: FakeSession
    device: Device
    handler: DeviceHandler
    sent: list[bytes]

    async def call(
        self, command: int, payload: bytes = b"", fds: tuple[int, ...] = (), flags: int = 0
    ) -> tuple[Header, bytes] | None:
        message = Message(Header(5, command, 16 + len(payload), flags), payload, fds)
        reply = await self.handler.handle(message)
        if reply is None:
            return None
        header = Header.decode(reply)
        assert header.msg_id == 5 and header.command == command
        assert header.flags & TYPE_REPLY and header.size == len(reply)
        return header, reply[16:]

    async def ok(self, command: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bytes:
        result = await self.call(command, payload, fds)
        assert result is not None
        header, body = result
        assert not header.is_error, f"error {header.error}"
        return body

    async def error(self, command: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> int:
        result = await self.call(command, payload, fds)
        assert result is not None
        header, body = result
        assert header.flags & FLAG_ERROR and body == b""
        return header.error

    def calls(self, kind: str) -> list[tuple[object, ...]]:
        return [c[1:] for c in self.session.calls if c[0] == kind]

    async def negotiate(self) -> None:
        await self.ok(Command.VERSION, Version(0, 0).encode())
        self.session.calls.clear()


def make_rig(timeout: float = 1.0, memory: bool = False) -> Rig:
    session = FakeSession()
    info = session.topology.devices[0]
    device = Device(info, device_layout(info), socket_path=Path("/x"))
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    link = ServerLink(session, timeout)
    handler = DeviceHandler(device, link, send, memory=MemoryMirror(link) if memory else None)
    device.handler = handler
    return Rig(session, device, handler, sent)


@pytest.fixture
async def rig() -> Rig:
    r = make_rig()
    await r.negotiate()
    return r


@pytest.fixture
def eventfds() -> Iterator[list[int]]:
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
    yield fds
    for fd in fds:
        os.close(fd)


def dup(fds: list[int]) -> tuple[int, ...]:
    """What arrives over SCM_RIGHTS: new descriptors the receiver owns."""
    return tuple(os.dup(fd) for fd in fds)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def region(offset: int, index: int, count: int, data: bytes | None = None) -> bytes:
    body = struct.pack("<QII", offset, index, count)
    return body if data is None else body + data


def irq_set(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    return struct.pack("<IIIII", 20, flags, index, start, count) + data


# ---------------------------------------------------------------- negotiation and dispatch


async def test_version_comes_first_and_once() -> None:
    r = make_rig()
    assert await r.error(Command.REGION_READ, region(0, 7, 4)) == errno.EINVAL
    body = await r.ok(Command.VERSION, Version(0, 0).encode())
    reply = Version.decode(body)
    assert (reply.major, reply.minor) == (0, 0)
    assert reply.capabilities is not None and reply.capabilities.max_data_xfer_size == 1 << 20
    assert await r.error(Command.VERSION, Version(0, 0).encode()) == errno.EINVAL


async def test_other_major_versions_are_refused() -> None:
    r = make_rig()
    assert await r.error(Command.VERSION, Version(1, 0).encode()) == errno.ENOTSUP


async def test_unknown_and_malformed_commands(rig: Rig) -> None:
    assert await rig.error(99) == errno.ENOSYS
    assert await rig.error(Command.DEVICE_FEATURE) == errno.ENOSYS
    assert await rig.call(99, flags=FLAG_NO_REPLY) is None  # never answer NO_REPLY
    assert await rig.error(Command.DEVICE_GET_INFO, b"\x10") == errno.EINVAL
    assert await rig.error(Command.DEVICE_GET_REGION_IO_FDS, bytes(16)) == errno.ENOTSUP
    # A message of type "reply" (or a reserved type) is not a command.
    reply = await rig.handler.handle(Message(Header(5, 9, 32, 0x2), region(0, 7, 4)))
    assert reply is not None and Header.decode(reply).error == errno.EINVAL


async def test_information(rig: Rig) -> None:
    body = await rig.ok(Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
    assert struct.unpack("<IIII", body) == (16, 3, 9, 5)
    body = await rig.ok(Command.DEVICE_GET_REGION_INFO, struct.pack("<IIIIQQ", 32, 0, 2, 0, 0, 0))
    assert struct.unpack("<IIIIQQ", body) == (32, 3, 2, 0, 0x10000, 0)
    bad = struct.pack("<IIIIQQ", 32, 0, 9, 0, 0, 0)
    assert await rig.error(Command.DEVICE_GET_REGION_INFO, bad) == errno.EINVAL
    body = await rig.ok(Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, 2, 0))
    assert struct.unpack("<IIII", body) == (16, 1, 2, 4)
    assert await rig.error(Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, 5, 0)) == (
        errno.EINVAL
    )


async def test_stray_descriptors_are_refused_and_closed(rig: Rig, eventfds: list[int]) -> None:
    stray = dup(eventfds[:2])
    assert await rig.error(Command.REGION_READ, region(0, 7, 4), stray) == errno.EINVAL
    assert not any(is_open(fd) for fd in stray)
    assert rig.session.calls == []  # refused before anything was forwarded
    stray = dup(eventfds[:1])
    assert await rig.error(99, b"", stray) == errno.ENOSYS
    assert not is_open(stray[0])


# ---------------------------------------------------------------- region accesses


async def test_config_reads_split_into_dwords(rig: Rig) -> None:
    body = await rig.ok(Command.REGION_READ, region(0, 7, 16))
    assert body[:16] == region(0, 7, 16) and body[16:20] == bytes.fromhex("3412577e")
    assert rig.calls("config_read") == [(0, 4), (4, 4), (8, 4), (12, 4)]
    rig.session.calls.clear()
    body = await rig.ok(Command.REGION_READ, region(1, 7, 3))
    assert body[16:] == bytes.fromhex("12577e")
    assert rig.calls("config_read") == [(1, 1), (2, 2)]


async def test_bar_reads_split_into_qwords(rig: Rig) -> None:
    body = await rig.ok(Command.REGION_READ, region(0x10, 2, 16))
    assert rig.calls("bar_read") == [(2, 0x10, 8), (2, 0x18, 8)]
    assert body[16:] == (0x10).to_bytes(8, "little") + (0x18).to_bytes(8, "little")
    rig.session.calls.clear()
    await rig.ok(Command.REGION_READ, region(5, 0, 3))
    assert rig.calls("bar_read") == [(0, 5, 1), (0, 6, 2)]


async def test_writes(rig: Rig) -> None:
    # Posted BAR write: forwarded, never answered.
    assert (
        await rig.call(Command.REGION_WRITE, region(8, 2, 4, b"\1\0\0\0"), flags=FLAG_NO_REPLY)
        is None
    )
    assert rig.calls("bar_write") == [(2, 8, 4, 1)]
    assert rig.calls("flush") == []
    rig.session.calls.clear()
    # Non-posted odd-sized write: split, flushed, answered without data.
    body = await rig.ok(Command.REGION_WRITE, region(0x1001, 2, 3, b"\xaa\xbb\xcc"))
    assert body == region(0x1001, 2, 3)
    assert rig.calls("bar_write") == [(2, 0x1001, 1, 0xAA), (2, 0x1002, 2, 0xCCBB)]
    assert rig.calls("flush") == [()]
    rig.session.calls.clear()
    await rig.ok(Command.REGION_WRITE, region(4, 7, 6, bytes(range(1, 7))))
    assert rig.calls("config_write") == [(4, 4, 0x04030201), (8, 2, 0x0605)]


async def test_write_multi(rig: Rig) -> None:
    payload = (
        struct.pack("<Q", 2)
        + struct.pack("<QII8s", 8, 2, 4, b"\5")
        + struct.pack("<QII8s", 0x10, 7, 2, b"\7")
    )
    body = await rig.ok(Command.REGION_WRITE_MULTI, payload)
    assert body == struct.pack("<Q", 2)
    assert rig.calls("bar_write") == [(2, 8, 4, 5)]
    assert rig.calls("config_write") == [(0x10, 2, 7)]
    rig.session.calls.clear()
    bad = (
        struct.pack("<Q", 2)
        + struct.pack("<QII8s", 8, 2, 4, b"")
        + struct.pack("<QII8s", 0, 8, 4, b"")
    )
    assert await rig.error(Command.REGION_WRITE_MULTI, bad) == errno.EINVAL
    assert rig.session.calls == []  # all or nothing


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (region(0, 9, 4), errno.EINVAL),  # bad region index
        (region(0, 8, 4), errno.EINVAL),  # VGA: size 0
        (region(0x1000, 7, 4), errno.EINVAL),  # offset past the region
        (region(0xFFC, 7, 8), errno.EINVAL),  # runs past its end
        (region(0, 7, 0), errno.EINVAL),  # count 0
        (region(0, 7, (1 << 20) + 1), errno.E2BIG),
        (region(0, 7, 4)[:12], errno.EINVAL),  # short
    ],
)
async def test_bad_reads(rig: Rig, payload: bytes, code: int) -> None:
    assert await rig.error(Command.REGION_READ, payload) == code
    assert rig.session.calls == []


async def test_bad_writes(rig: Rig) -> None:
    assert await rig.error(Command.REGION_WRITE, region(0, 6, 4, b"abcd")) == errno.EINVAL  # ROM
    assert await rig.error(Command.REGION_WRITE, region(0, 2, 4, b"abc")) == errno.EINVAL
    # A bad posted write cannot be answered; it is dropped.
    assert (
        await rig.call(Command.REGION_WRITE, region(0, 3, 4, b"abcd"), flags=FLAG_NO_REPLY) is None
    )
    assert rig.session.calls == []


async def test_reset(rig: Rig) -> None:
    assert await rig.ok(Command.DEVICE_RESET) == b""
    assert rig.calls("reset") == [(1,)]


# ---------------------------------------------------------------- a device server that is gone


async def test_server_gone(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.session.error = ClientError("device server ended the session: UNAVAILABLE")
    for _ in range(3):
        body = await rig.ok(Command.REGION_READ, region(0, 7, 8))
        assert body[16:] == b"\xff" * 8
    assert (await rig.ok(Command.REGION_READ, region(0, 2, 8)))[16:] == b"\xff" * 8
    assert await rig.ok(Command.REGION_WRITE, region(0, 7, 2, b"\0\0")) == region(0, 7, 2)
    assert (
        await rig.call(Command.REGION_WRITE, region(0, 2, 4, bytes(4)), flags=FLAG_NO_REPLY) is None
    )
    assert await rig.error(Command.DEVICE_RESET) == errno.ENODEV
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "unreachable" in errors[0].getMessage()
    # Once lost, the session is not asked again: only the first batch reached it.
    assert rig.session.calls == [("config_read", 0, 4), ("config_read", 4, 4)]


async def test_server_hangs() -> None:
    r = make_rig(timeout=0.05)
    await r.negotiate()
    r.session.hang = True
    body = await r.ok(Command.REGION_READ, region(0, 7, 4096))
    assert body[16:] == b"\xff" * 4096
    assert len(r.calls("config_read")) == 1024  # one pipelined batch
    r.session.hang = False
    body = await r.ok(Command.REGION_READ, region(0, 7, 2))  # a timeout is not final
    assert body[16:] == b"\x34\x12"


# ---------------------------------------------------------------- interrupts


async def test_intx_level_and_automask(rig: Rig, eventfds: list[int]) -> None:
    intx = eventfds[0]
    assert (
        await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 0, 0, 1), dup([intx])) == b""
    )
    rig.device.intx_level = True
    rig.handler.on_intx(True)
    assert count(intx) == 1
    rig.handler.on_intx(True)  # auto-masked until the client unmasks
    assert count(intx) == 0
    unmask = irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 0, 1)
    await rig.ok(Command.DEVICE_SET_IRQS, unmask)
    assert count(intx) == 1  # still asserted at the EOI: interrupt again
    assert rig.calls("config_read") == [(6, 2)]  # after a round trip that syncs the level
    rig.device.intx_level = False
    await rig.ok(Command.DEVICE_SET_IRQS, unmask)
    assert count(intx) == 0
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 0, 0, 1))
    rig.device.intx_level = True
    rig.handler.on_intx(True)
    assert count(intx) == 0  # masked by the client
    # The client triggers it itself (loopback).
    await rig.ok(Command.DEVICE_SET_IRQS, unmask)
    assert count(intx) == 1


async def test_disable_closes_eventfds(rig: Rig, eventfds: list[int]) -> None:
    mine = dup(eventfds[:1])
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 0, 0, 1), mine)
    assert is_open(mine[0])
    await rig.ok(
        Command.DEVICE_SET_IRQS, irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, 0)
    )
    assert not is_open(mine[0])
    replaced = dup(eventfds[1:2])
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 3, 0, 1), replaced)
    newer = dup(eventfds[2:3])
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 3, 0, 1), newer)
    assert not is_open(replaced[0]) and is_open(newer[0])  # QEMU sends a new dup each time
    rig.handler.close()
    assert not is_open(newer[0])


async def test_msix_vectors_and_the_server_table(rig: Rig, eventfds: list[int]) -> None:
    v0, v2 = eventfds[0], eventfds[1]
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 2, 0, 1))  # MSI-X on, no fd
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 2, 2, 1), dup([v2]))
    # The table is found once through the capability list; vector 0 masked, 2 unmasked.
    assert rig.calls("bar_write") == [(4, 0x800 + 12, 4, 1), (4, 0x800 + 2 * 16 + 12, 4, 0)]
    rig.handler.on_msi(2)
    assert count(v2) == 1
    rig.handler.on_msi(0)  # no eventfd: pending until it gets one
    rig.handler.on_msi(7)  # no such vector: ignored
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 2, 0, 1), dup([v0]))
    assert count(v0) == 1
    # Client-side mask and unmask with DATA_BOOL: vector 2 held, then delivered.
    mask = irq_set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK, 2, 0, 3, b"\0\0\1")
    await rig.ok(Command.DEVICE_SET_IRQS, mask)
    rig.handler.on_msi(2)
    assert count(v2) == 0
    await rig.ok(
        Command.DEVICE_SET_IRQS, irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 2, 2, 1)
    )
    assert count(v2) == 1
    rig.session.calls.clear()
    await rig.ok(
        Command.DEVICE_SET_IRQS, irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 2, 0, 0)
    )
    assert sorted(rig.calls("bar_write")) == [(4, 0x800 + 12, 4, 1), (4, 0x800 + 44, 4, 1)]
    assert rig.handler.irqs.fds() == []


@pytest.mark.parametrize(
    ("payload", "nfds", "code"),
    [
        (irq_set(EVENTFD_TRIGGER, 2, 0, 2), 1, errno.EINVAL),  # 2 vectors, 1 fd
        (irq_set(EVENTFD_TRIGGER, 2, 3, 2), 2, errno.EINVAL),  # past the last vector
        (irq_set(EVENTFD_TRIGGER, 1, 0, 1), 1, errno.EINVAL),  # MSI has no vectors
        (irq_set(EVENTFD_TRIGGER, 5, 0, 1), 1, errno.EINVAL),  # no such index
        (irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, 1), 1, errno.EINVAL),
        (irq_set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_MASK, 0, 0, 1), 1, errno.ENOTTY),
        (irq_set(EVENTFD_TRIGGER | IRQ_SET_DATA_NONE, 0, 0, 1), 1, errno.EINVAL),
    ],
)
async def test_bad_set_irqs(
    rig: Rig, eventfds: list[int], payload: bytes, nfds: int, code: int
) -> None:
    fds = dup(eventfds[:nfds])
    assert await rig.error(Command.DEVICE_SET_IRQS, payload, fds) == code
    assert not any(is_open(fd) for fd in fds)
    assert rig.handler.irqs.fds() == []


async def test_only_eventfds_become_interrupts(rig: Rig) -> None:
    read_end, write_end = os.pipe()
    try:
        assert (
            await rig.error(
                Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 0, 0, 1), (write_end,)
            )
            == errno.EINVAL
        )
        assert not is_open(write_end)
    finally:
        os.close(read_end)


async def test_intx_unmask_eventfd(rig: Rig, eventfds: list[int]) -> None:
    """The KVM route: the client signals a resample eventfd when the guest EOIs."""
    intx, resample = eventfds[0], eventfds[1]
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 0, 0, 1), dup([intx]))
    unmask = irq_set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, 0, 0, 1)
    await rig.ok(Command.DEVICE_SET_IRQS, unmask, dup([resample]))
    rig.device.intx_level = True
    rig.handler.on_intx(True)
    assert count(intx) == 1
    os.eventfd_write(resample, 1)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if (fired := count(intx)) != 0:
            break
    assert fired == 1
    await rig.ok(
        Command.DEVICE_SET_IRQS, irq_set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, 0)
    )
    assert rig.handler.irqs.fds() == []


# ---------------------------------------------------------------- DMA


def dma_map(address: int, size: int, offset: int = 0, flags: int = 3) -> bytes:
    return struct.pack("<IIQQQ", 32, flags, offset, address, size)


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("vfu-unit-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x4000)
    yield fd
    os.close(fd)


async def test_dma_map_and_unmap(rig: Rig, ram: int) -> None:
    (mine,) = dup([ram])
    assert await rig.ok(Command.DMA_MAP, dma_map(0x10000, 0x4000), (mine,)) == b""
    assert is_open(mine)
    (again,) = dup([ram])
    assert await rig.error(Command.DMA_MAP, dma_map(0x12000, 0x1000), (again,)) == errno.EEXIST
    assert not is_open(again)
    os.pwrite(ram, b"hello", 0x100)
    assert await rig.handler.dma_read(0x10100, 5) == b"hello"
    await rig.handler.dma_write(0x10200, b"world")
    assert os.pread(ram, 5, 0x200) == b"world"
    with pytest.raises(DmaError):
        await rig.handler.dma_read(0x13FFF, 2)  # crosses the window's end
    unmap = struct.pack("<IIQQ", 24, 0, 0x10000, 0x4000)
    assert await rig.ok(Command.DMA_UNMAP, unmap) == unmap  # echoed
    assert not is_open(mine)
    with pytest.raises(DmaError):
        await rig.handler.dma_read(0x10100, 5)


async def test_bad_dma_maps(rig: Rig, ram: int, eventfds: list[int]) -> None:
    two = dup([ram, ram])
    assert await rig.error(Command.DMA_MAP, dma_map(0, 0x1000), two) == errno.EINVAL
    assert not any(is_open(fd) for fd in two)
    past_end = dup([ram])
    assert (
        await rig.error(Command.DMA_MAP, dma_map(0, 0x4000, offset=0x1000), past_end)
        == errno.EINVAL
    )
    not_memory = dup(eventfds[:1])
    assert await rig.error(Command.DMA_MAP, dma_map(0, 0x1000), not_memory) == errno.EINVAL
    assert not is_open(past_end[0]) and not is_open(not_memory[0])
    assert await rig.error(Command.DMA_MAP, dma_map(0, 0)) == errno.EINVAL
    assert rig.handler.dma.regions == []


@pytest.mark.parametrize(("address", "size"), [(0x800, 0x1000), (0x1000, 0x800), (0x1001, 0x1000)])
async def test_unaligned_dma_maps_are_refused(rig: Rig, ram: int, address: int, size: int) -> None:
    """We offered 4 KiB pages in VERSION: a window off that grid is EINVAL (as VFIO's
    type1 IOMMU), its fd is closed, and the table is unchanged."""
    (mine,) = dup([ram])
    assert await rig.error(Command.DMA_MAP, dma_map(address, size), (mine,)) == errno.EINVAL
    assert not is_open(mine)
    assert await rig.error(Command.DMA_MAP, dma_map(address, size)) == errno.EINVAL
    assert rig.handler.dma.regions == []
    await rig.ok(Command.DMA_MAP, dma_map(0x1000, 0x1000))  # the connection goes on


async def test_dma_unmap_rules(rig: Rig) -> None:
    for address in (0x0, 0x1000, 0x4000):
        await rig.ok(Command.DMA_MAP, dma_map(address, 0x1000))
    cut = struct.pack("<IIQQ", 24, 0, 0x1800, 0x1000)
    assert await rig.error(Command.DMA_UNMAP, cut) == errno.EINVAL
    dirty = struct.pack("<IIQQ", 24, 1, 0, 0x1000)
    assert await rig.error(Command.DMA_UNMAP, dirty) == errno.ENOTSUP
    both = struct.pack("<IIQQ", 24, 0, 0, 0x2000)  # covers two windows
    await rig.ok(Command.DMA_UNMAP, both)
    assert [r.address for r in rig.handler.dma.regions] == [0x4000]
    everything = struct.pack("<IIQQ", 24, 2, 0, 0)
    await rig.ok(Command.DMA_UNMAP, everything)
    assert rig.handler.dma.regions == []


async def test_dma_through_messages(rig: Rig) -> None:
    """Without an fd the bridge asks the client with DMA_READ/DMA_WRITE."""
    await rig.ok(Command.DMA_MAP, dma_map(0x2000, 0x1000, flags=3))
    read = asyncio.create_task(rig.handler.dma_read(0x2010, 4))
    await asyncio.sleep(0)
    (request,) = rig.sent
    header = Header.decode(request)
    assert header.command == Command.DMA_READ and header.is_command
    assert request[16:] == struct.pack("<QQ", 0x2010, 4)  # QEMU needs >= 32 bytes
    # QEMU 11.1's reply: address, u64 count, data at payload offset 16.
    payload = struct.pack("<QQ", 0x2010, 4) + b"data"
    rig.handler.handle_reply(
        Message(Header(header.msg_id, Command.DMA_READ, 16 + len(payload), TYPE_REPLY), payload)
    )
    assert await read == b"data"

    write = asyncio.create_task(rig.handler.dma_write(0x2020, b"xy"))
    await asyncio.sleep(0)
    header = Header.decode(rig.sent[1])
    assert header.size == 32 + 2  # what QEMU's count check needs
    assert rig.sent[1][16:] == struct.pack("<QQ", 0x2020, 2) + b"xy"
    assert DmaAccess.decode(rig.sent[1][16:]) == DmaAccess(0x2020, 2, b"xy")
    rig.handler.handle_reply(
        Message(
            Header(header.msg_id, Command.DMA_WRITE, 16, TYPE_REPLY | FLAG_ERROR, errno.ENODEV), b""
        )
    )
    with pytest.raises(DmaError, match="refused"):
        await write

    pending = asyncio.create_task(rig.handler.dma_read(0x2000, 1))
    await asyncio.sleep(0)
    rig.handler.close()  # the client went away
    with pytest.raises(DmaError):
        await pending


async def test_dma_request_timeout() -> None:
    r = make_rig()
    r.handler.dma_timeout = 0.02
    await r.negotiate()
    await r.ok(Command.DMA_MAP, dma_map(0, 0x1000))
    with pytest.raises(DmaError, match="no reply"):
        await r.handler.dma_read(0, 4)
    # A late reply is dropped with a warning, not an error.
    late = Header.decode(r.sent[0])
    r.handler.handle_reply(Message(Header(late.msg_id, Command.DMA_READ, 16, TYPE_REPLY), b""))


async def test_shared_mode_announces_ram_windows_and_withdraws_them(ram: int) -> None:
    r = make_rig(memory=True)
    await r.negotiate()
    (mine,) = dup([ram])
    await r.ok(Command.DMA_MAP, dma_map(0x10000, 0x4000, flags=3), (mine,))
    await r.ok(Command.DMA_MAP, dma_map(0xFFFC0000, 0x40000, flags=1))  # ROM: no fd
    ((add, remove),) = r.calls("memory_map_update")
    assert remove == ()
    assert add == (
        MemoryRegion(0x10000, 0x4000, path=f"/proc/{os.getpid()}/fd/{mine}", file_offset=0),
    )
    unmap = struct.pack("<IIQQ", 24, 0, 0x10000, 0x4000)
    await r.ok(Command.DMA_UNMAP, unmap)
    assert r.calls("memory_map_update")[1] == ((), (AddressRange(0x10000, 0x4000),))
    assert not is_open(mine)  # closed once the server had let go
    await r.ok(Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 0, 0xFFFC0000, 0x40000))
    assert len(r.calls("memory_map_update")) == 2  # nothing to tell about the ROM
    r.handler.close()


async def test_read_only_window_is_announced_read_only(ram: int) -> None:
    r = make_rig(memory=True)
    await r.negotiate()
    await r.ok(Command.DMA_MAP, dma_map(0, 0x1000, flags=1), dup([ram]))
    ((add, _),) = r.calls("memory_map_update")
    assert isinstance(add, tuple) and add[0].read_only
    r.handler.close()


async def test_a_server_that_refuses_the_map_does_not_fail_dma_map(
    ram: int, caplog: pytest.LogCaptureFixture
) -> None:
    """QEMU treats a failed DMA_MAP as fatal; the device's DMA fails instead."""
    r = make_rig(memory=True)
    await r.negotiate()
    r.session.error = ClientError("gone")
    (mine,) = dup([ram])
    assert await r.ok(Command.DMA_MAP, dma_map(0, 0x1000), (mine,)) == b""
    assert "did not take RAM window" in caplog.text
    assert r.handler.link.lost is not None
    r.handler.close()
    await asyncio.sleep(0)  # the mirror's last sync runs, and closes the fd
    assert not is_open(mine)


async def test_a_map_update_that_times_out_loses_the_server(ram: int) -> None:
    """The server may still apply it: the mirror cannot know its map, so it stops."""
    r = make_rig(timeout=0.05, memory=True)
    await r.negotiate()
    r.session.hang = True
    await r.ok(Command.DMA_MAP, dma_map(0, 0x1000), dup([ram]))
    assert r.handler.link.lost is not None and "memory map update" in r.handler.link.lost
    r.handler.close()
    await asyncio.sleep(0)


async def test_disconnect_withdraws_ram_and_closes_fds_after(ram: int) -> None:
    r = make_rig(memory=True)
    await r.negotiate()
    fds = dup([ram, ram])
    await r.ok(Command.DMA_MAP, dma_map(0x0, 0x1000), fds[:1])
    await r.ok(Command.DMA_MAP, dma_map(0x1000, 0x1000, offset=0x1000), fds[1:])
    r.handler.close()
    assert all(is_open(fd) for fd in fds)  # the server may still be opening them
    for _ in range(10):
        await asyncio.sleep(0)
    (_, remove) = r.calls("memory_map_update")[-1]
    assert remove == (AddressRange(0x0, 0x1000), AddressRange(0x1000, 0x1000))
    assert not any(is_open(fd) for fd in fds)


# ---------------------------------------------------------------- bridge-level helpers


async def test_events_reach_the_device_handler(rig: Rig, eventfds: list[int]) -> None:
    bridge = VfioUserBridge(Path("/nonexistent"))
    bridge.devices[1] = rig.device
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 0, 0, 1), dup(eventfds[:1]))
    await rig.ok(Command.DEVICE_SET_IRQS, irq_set(EVENTFD_TRIGGER, 2, 1, 1), dup(eventfds[1:2]))
    bridge.on_event(IntxChanged(1, 1, True))
    assert rig.device.intx_level and count(eventfds[0]) == 1
    bridge.on_event(IntxChanged(1, 1, False))
    assert not rig.device.intx_level
    bridge.on_event(MsiRaised(1, 1, 0xFEE00000, 0x41))
    assert count(eventfds[1]) == 1
    bridge.on_event(MsiRaised(9, 1, 0, 0))  # unknown device: ignored


def test_socket_names_and_qemu_args() -> None:
    assert socket_name(pb.DeviceInfo(device_id=3, name="blk0")) == "blk0.sock"
    assert socket_name(pb.DeviceInfo(device_id=3, name="../etc/x")) == "device3.sock"
    assert socket_name(pb.DeviceInfo(device_id=4, name="")) == "device4.sock"
    bridge = VfioUserBridge(Path("/run/vfu"))
    info = make_info(2)
    bridge.devices[2] = Device(info, device_layout(info), Path("/run/vfu/dev2.sock"))
    assert bridge.qemu_args(msg_timeout_ms=10000, root_ports=False) == [
        "-device",
        '{"driver":"vfio-user-pci","id":"vfu-dev2",'
        '"socket":{"type":"unix","path":"/run/vfu/dev2.sock"},"x-msg-timeout":10000}',
    ]
    assert bridge.qemu_args() == [
        "-device",
        "pcie-root-port,id=devmodel-rp1,bus=pcie.0,chassis=1,slot=1",
        "-device",
        '{"driver":"vfio-user-pci","id":"vfu-dev2",'
        '"socket":{"type":"unix","path":"/run/vfu/dev2.sock"},"bus":"devmodel-rp1"}',
    ]


async def test_replies_arrive_as_whole_messages() -> None:
    """encode_message round-trips through the handler's own reply path."""
    r = make_rig()
    reply = await r.handler.handle(Message(Header(9, Command.VERSION, 20), Version(0, 0).encode()))
    assert reply is not None
    assert reply == encode_message(9, Command.VERSION, reply[16:], flags=TYPE_REPLY)


def test_our_version_reply_fits_in_qemus_request() -> None:
    """QEMU refuses a reply larger than its request ("reply larger than recv buffer")."""
    request = (
        struct.pack("<HH", 0, 0) + json.dumps(QEMU_CAPS, separators=(",", ":")).encode() + b"\0"
    )

    async def run() -> bytes | None:
        r = make_rig()
        return await r.handler.handle(Message(Header(0, 1, 16 + len(request)), request))

    reply = asyncio.run(run())
    assert reply is not None and len(reply) <= 16 + len(request)


def test_cli_parser() -> None:
    args = build_parser().parse_args(["--socket-dir", "/tmp/x", "--print-qemu-args"])
    assert args.socket_dir == Path("/tmp/x") and args.print_qemu_args
    assert args.devserver.startswith("unix:") and args.timeout == 4.0
    assert args.memory_mode == "auto"
    assert build_parser().parse_args(["--memory-mode", "messages"]).memory_mode == "messages"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--memory-mode", "magic"])


def test_memory_mode_choice() -> None:
    assert resolve_memory_mode("auto", "unix:/run/dev.sock") == "shared"
    assert resolve_memory_mode("auto", "10.0.0.2:7000") == "messages"
    assert resolve_memory_mode("shared", "10.0.0.2:7000") == "shared"
    assert resolve_memory_mode("messages", "unix:/x") == "messages"
    with pytest.raises(ValueError):
        resolve_memory_mode("magic", "unix:/x")
    shared = VfioUserBridge(Path("/x")).frontend_options("t")
    assert shared.memory_mode == pb.MEMORY_MODE_SHARED and not shared.regions
    messages = VfioUserBridge(Path("/x"), memory_mode="messages").frontend_options("t")
    assert messages.memory_mode == pb.MEMORY_MODE_DMA_MESSAGES


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(0, 20),
    st.sampled_from([0, FLAG_NO_REPLY, TYPE_REPLY, 0x2]),
    st.one_of(
        st.binary(max_size=48),
        st.builds(
            lambda offset, index, count: struct.pack("<QII", offset, index, count),
            st.integers(0, 1 << 64 - 1),
            st.integers(0, 10),
            st.integers(0, 5000),
        ),
    ),
)
def test_any_message_gets_an_answer_or_none(command: int, flags: int, payload: bytes) -> None:
    """Hostile input never escapes as an exception and never leaks a descriptor."""

    async def run() -> None:
        r = make_rig()
        await r.negotiate()
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        reply = await r.handler.handle(
            Message(Header(3, command, 16 + len(payload), flags), payload, (fd,))
        )
        if reply is not None:
            header = Header.decode(reply)
            assert header.msg_id == 3 and header.size == len(reply) and header.is_reply
        else:
            assert flags & FLAG_NO_REPLY
        kept = set(r.handler.irqs.fds()) | {d.fd for d in r.handler.dma.regions if d.fd is not None}
        assert is_open(fd) == (fd in kept)
        r.handler.close()
        assert not is_open(fd)

    asyncio.run(run())
