"""The console's UNIX-socket ByteStream: one client, bounded both ways."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from devserver.backends.console_ends import open_console_ends
from devserver.backends.console_socket import RX_LIMIT, TX_LIMIT, SocketConsole
from devserver.config import parse_device_spec
from devserver.errors import ConfigError


async def _until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (state changes in callbacks, no event)
            await asyncio.sleep(0.01)


async def test_bytes_both_ways_and_one_client(tmp_path: Path) -> None:
    path = str(tmp_path / "con.sock")
    console = SocketConsole(path)
    await console.start()
    woken: list[int] = []
    console.on_readable = lambda: woken.append(console.readable())
    try:
        assert console.write(b"nobody") is False  # no client: dropped
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            await _exchange(console, path, reader, writer, woken)
        finally:
            writer.close()
            await writer.wait_closed()
        await _until(lambda: not console.connected)
    finally:
        await console.aclose()
    assert not _exists(path)


async def _exchange(
    console: SocketConsole,
    path: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    woken: list[int],
) -> None:
    await _until(lambda: console.connected)
    r2, w2 = await asyncio.open_unix_connection(path)  # refused: closed at once
    assert await r2.read() == b""
    w2.close()
    await w2.wait_closed()
    assert console.refused == 1
    writer.write(b"to the guest")
    await writer.drain()
    await _until(lambda: console.readable() == 12)
    assert woken
    assert console.read(5) == b"to th" and console.read(100) == b"e guest"
    assert console.write(b"to the host")
    assert await reader.readexactly(11) == b"to the host"


def _exists(path: str) -> bool:
    return Path(path).exists()


async def test_reading_stops_at_the_limit_and_resumes(tmp_path: Path) -> None:
    path = str(tmp_path / "con.sock")
    console = SocketConsole(path)
    await console.start()
    try:
        _reader, writer = await asyncio.open_unix_connection(path)
        try:
            await _flood(console, writer)
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        await console.aclose()


async def _flood(console: SocketConsole, writer: asyncio.StreamWriter) -> None:
    writer.write(b"z" * (RX_LIMIT * 8))
    await _until(lambda: console.readable() >= RX_LIMIT)
    await asyncio.sleep(0.1)
    held = console.readable()
    assert held < RX_LIMIT + 256 * 1024  # bounded: one read past the limit at most
    taken = 0
    while taken < RX_LIMIT * 8:
        await _until(lambda: console.readable() > 0)
        taken += len(console.read(RX_LIMIT))
        assert console.readable() < RX_LIMIT + 256 * 1024
    assert taken == RX_LIMIT * 8


def test_open_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        open_console_ends([parse_device_spec(f"virtio-console,socket={plain}")])
    with pytest.raises(ConfigError, match="cannot listen"):
        open_console_ends([parse_device_spec(f"virtio-console,socket={tmp_path}/no/such")])
    opened = open_console_ends([parse_device_spec(f"virtio-console,socket={tmp_path}/ok")])
    assert list(opened) == [0]
    opened[0].console.close()
    assert not (tmp_path / "ok").exists()


async def test_a_client_that_does_not_read_gets_writes_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "con.sock")
    console = SocketConsole(path)
    await console.start()
    try:
        _reader, writer = await asyncio.open_unix_connection(path)
        try:
            await _until(lambda: console.connected)
            accepted = 0
            for _ in range(64 * TX_LIMIT // 4096):
                if not console.write(b"t" * 4096):
                    break
                accepted += 4096
                await asyncio.sleep(0)
            # Refused once the transport holds TX_LIMIT: at most that plus what
            # the kernel's socket buffers took, far below all 16 MiB offered.
            assert accepted < 16 * TX_LIMIT
            assert not console.write(b"t")
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        await console.aclose()


def test_a_client_is_served_under_uvloop(tmp_path: Path) -> None:
    """`python -m devserver` runs on uvloop, whose transports are no
    asyncio.Transport subclasses: a client must still be served."""
    import uvloop

    async def main() -> None:
        path = str(tmp_path / "con.sock")
        console = SocketConsole(path)
        await console.start()
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            await _until(lambda: console.connected)
            writer.write(b"ping")
            await _until(lambda: console.readable() == 4)
            assert console.read(8) == b"ping"
            assert console.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
        finally:
            writer.close()
            await console.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))
