"""A hostile or buggy vfio-user client against the running bridge.

Each test breaks one rule of the protocol on one device's socket and checks
what the bridge does about it: a clear error reply where the message could
be read (and that connection goes on), or a closed connection with a log
line where the byte stream can no longer be trusted. Either way the bridge,
the other device's connection and the session to the device server keep
working, and the device takes a new client. The client is the hand-packed
one of test_vfio_user_bridge (independent of vmm_client.vfio_user.protocol).
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from .test_vfio_user_bridge import (
    CONFIG,
    DMA_MAP,
    ERROR,
    HDR,
    NO_REPLY,
    READ,
    REPLY,
    SET_IRQS,
    VERSION,
    WRITE,
    Client,
    Rig,
    open_fds_to,
    running_rig,
)

MSIX = 2
EVENTFD_TRIGGER = 0x4 | 0x20
TESTDEV_ID = 0x1234  # the test device's vendor id, read back through config space


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with running_rig(tmp_path, "shared") as r:
        yield r


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("vfu-hostile-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x10000)
    yield fd
    os.close(fd)


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (the bridge's tasks change it, no event)
            await asyncio.sleep(0.01)


async def disconnected(rig: Rig) -> None:
    """Wait until the bridge has wound down every connection (closed on our side)."""
    await until(lambda: all(d.handler is None for d in rig.bridge.devices.values()))


async def others_still_work(rig: Rig) -> None:
    """Both devices take a new client, which they serve."""
    await disconnected(rig)
    for name in ("second", "pci-testdev0"):
        client = Client(rig.sockets[name])
        try:

            def check(c: Client = client) -> None:
                c.version()
                assert c.read_int(CONFIG, 0, 2) == TESTDEV_ID

            await asyncio.to_thread(check)
        finally:
            client.close()


async def run_client(rig: Rig, attack: Callable[[Client], None]) -> None:
    """Run `attack` on a fresh, negotiated client of the first test device, while a
    client of the second device is connected and must go on working."""
    bad = Client(rig.sockets["pci-testdev0"])
    good = Client(rig.sockets["second"])
    try:

        def run() -> None:
            good.version()
            bad.version()
            attack(bad)
            assert good.read_int(CONFIG, 0, 2) == TESTDEV_ID

        await asyncio.to_thread(run)
    finally:
        bad.close()
        good.close()
    await others_still_work(rig)


def hung_up(client: Client) -> bool:
    """The bridge closed the connection (after any error reply it sent)."""
    client.sock.settimeout(5)
    return client.sock.recv(4096) == b""


# ---------------------------------------------------------------- the byte stream


@pytest.mark.parametrize("sent", [8, 15])
async def test_truncated_header_then_hang_up(
    rig: Rig, sent: int, caplog: pytest.LogCaptureFixture
) -> None:
    def attack(bad: Client) -> None:
        bad.sock.sendall(HDR.pack(9, READ, 32, 0, 0)[:sent])
        bad.sock.shutdown(2)

    await run_client(rig, attack)
    assert f"client hung up {sent} bytes into a message" in caplog.text


async def test_truncated_message_then_hang_up(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    def attack(bad: Client) -> None:
        # The header promises a REGION_READ of 32 bytes; 8 of its 16 payload bytes come.
        bad.sock.sendall(HDR.pack(9, READ, 32, 0, 0) + bytes(8))
        bad.sock.shutdown(2)

    await run_client(rig, attack)
    assert "client hung up 24 bytes into a message" in caplog.text


@pytest.mark.parametrize("size", [0, 8, 15, 1 << 30, 0xFFFF_FFFF])
async def test_size_the_framer_cannot_trust(
    rig: Rig, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A size below the header or over the limit: an error reply to that id, then
    the connection closes (nothing after it can be framed)."""

    def attack(bad: Client) -> None:
        bad.sock.sendall(HDR.pack(7, READ, size, 0, 0))
        reply = bad.receive()
        assert (reply.msg_id, reply.flags & ERROR, reply.error) == (7, ERROR, errno.EINVAL)
        assert hung_up(bad)

    await run_client(rig, attack)
    assert "closing the connection" in caplog.text


async def test_too_many_descriptors_close_the_connection(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """More descriptors than the bridge makes room for: the kernel truncates them, so
    the bridge cannot know what came; it closes every one it got and hangs up."""
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(80)]
    target = os.readlink(f"/proc/self/fd/{fds[0]}")
    before = open_fds_to(target)
    try:

        def attack(bad: Client) -> None:
            bad.send(SET_IRQS, struct.pack("<IIIII", 20, EVENTFD_TRIGGER, MSIX, 0, 80), fds)
            assert hung_up(bad)

        await run_client(rig, attack)
    finally:
        for fd in fds:
            os.close(fd)
    assert "too many descriptors" in caplog.text
    assert open_fds_to(target) == before - len(fds)  # the bridge kept no copy


# ---------------------------------------------------------------- refused requests


def refused(client: Client, command: int, payload: bytes, fds: list[int] | None = None) -> int:
    reply = client.call(command, payload, fds or [])
    assert reply.flags & (REPLY | ERROR) == REPLY | ERROR and reply.payload == b""
    return reply.error


async def test_bad_requests_get_error_replies_and_the_connection_goes_on(
    rig: Rig, ram: int
) -> None:
    def attack(bad: Client) -> None:
        # Unknown commands, and a second VERSION.
        assert refused(bad, 0xFFFF, b"") == errno.ENOSYS
        assert refused(bad, VERSION, struct.pack("<HH", 0, 0)) == errno.EINVAL
        # A region index out of range, however large.
        for region in (9, 0xFFFF_FFFF):
            assert refused(bad, READ, struct.pack("<QII", 0, region, 4)) == errno.EINVAL
        # Accesses past a region's end, wrapping, empty, or over max_data_xfer_size.
        for offset, count in ((0x1000, 1), (0xFFC, 8), ((1 << 64) - 1, 2), (0, 0)):
            assert refused(bad, READ, struct.pack("<QII", offset, CONFIG, count)) == errno.EINVAL
        assert refused(bad, READ, struct.pack("<QII", 0, 2, 0xFFFF_FFFF)) == errno.E2BIG
        # A payload shorter than its struct; a write whose count is not its data.
        assert refused(bad, READ, struct.pack("<QI", 0, CONFIG)) == errno.EINVAL
        short = struct.pack("<QII", 0x10, CONFIG, 4) + b"\x01\x02"
        assert refused(bad, WRITE, short) == errno.EINVAL
        long = struct.pack("<QII", 0x10, CONFIG, 1) + b"\x01\x02"
        assert refused(bad, WRITE, long) == errno.EINVAL
        # Descriptors on a command that takes none; eventfds for the wrong vector count.
        assert refused(bad, READ, struct.pack("<QII", 0, CONFIG, 4), [ram]) == errno.EINVAL
        irqs = struct.pack("<IIIII", 20, EVENTFD_TRIGGER, MSIX, 0, 2)
        eventfd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            assert refused(bad, SET_IRQS, irqs, [eventfd]) == errno.EINVAL
        finally:
            os.close(eventfd)
        # A reply to a request the bridge never sent is dropped.
        bad.sock.sendall(HDR.pack(0x4242, READ, 16, REPLY, 0))
        # A posted write the bridge refuses gets no reply; the next request does.
        bad.send(WRITE, struct.pack("<QII", 0x2000, CONFIG, 4) + bytes(4), flags=NO_REPLY)
        assert bad.read_int(CONFIG, 0, 2) == TESTDEV_ID

    await run_client(rig, attack)


async def test_bad_dma_maps_are_refused(rig: Rig, ram: int) -> None:
    def dma_map(address: int, size: int, offset: int = 0, flags: int = 3) -> bytes:
        return struct.pack("<IIQQQ", 32, flags, offset, address, size)

    def attack(bad: Client) -> None:
        assert bad.call(DMA_MAP, dma_map(0x100000, 0x4000), [ram]).ok
        # Overlapping a window, at either end or inside it.
        for address, size in ((0x0FF000, 0x2000), (0x103000, 0x1000), (0x100000, 0x4000)):
            assert refused(bad, DMA_MAP, dma_map(address, size), [ram]) == errno.EEXIST
        # Not on the 4 KiB grid we offered.
        for address, size in ((0x200800, 0x1000), (0x200000, 0x800)):
            assert refused(bad, DMA_MAP, dma_map(address, size), [ram]) == errno.EINVAL
        # Wrapping the 64-bit space, empty, past the end of its file, unknown flags.
        assert refused(bad, DMA_MAP, dma_map((1 << 64) - 0x1000, 0x2000)) == errno.EINVAL
        assert refused(bad, DMA_MAP, dma_map(0x200000, 0)) == errno.EINVAL
        past = dma_map(0x200000, 0x2000, offset=0xF000)
        assert refused(bad, DMA_MAP, past, [ram]) == errno.EINVAL
        assert refused(bad, DMA_MAP, dma_map(0x200000, 0x1000, flags=0x10)) == errno.EINVAL
        # Two descriptors for one window.
        assert refused(bad, DMA_MAP, dma_map(0x200000, 0x1000), [ram, ram]) == errno.EINVAL

    memory = rig.bridge.memory
    assert memory is not None
    announced: list[list[tuple[int, int]]] = []
    real_sync = memory.sync

    async def sync() -> bool:
        ok = await real_sync()
        announced.append(memory.announced)
        return ok

    memory.sync = sync  # type: ignore[method-assign]
    await run_client(rig, attack)
    # Only the one good window reached the device server, and it left with its client.
    assert announced == [[(0x100000, 0x4000)]]
    await until(lambda: not memory.announced)
