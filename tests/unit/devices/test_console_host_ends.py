"""virtio-console host ends besides the socket: a pty (with its pty-link) and
the server's stdio (here a pty pair stands in for the terminal), and the
device spec syntax that chooses them (config.py's console_options)."""

from __future__ import annotations

import asyncio
import os
import termios
from collections.abc import Callable
from pathlib import Path

import pytest

from devserver.backends import console_fd
from devserver.backends.console_ends import open_console_ends
from devserver.backends.console_fd import (
    RX_LIMIT,
    TX_LIMIT,
    set_terminal_size,
    terminal_size,
)
from devserver.backends.console_pty import PtyConsole
from devserver.backends.console_socket import SocketConsole
from devserver.backends.console_stdio import StdioConsole
from devserver.config import (
    ConsoleOptions,
    ConsolePortOption,
    console_options,
    parse_device_spec,
)
from devserver.errors import ConfigError


async def _until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (state changes in callbacks, no event)
            await asyncio.sleep(0.01)


def _options(text: str) -> ConsoleOptions:
    return console_options(parse_device_spec(text).options)


# -- the spec syntax


def test_chardev_forms() -> None:
    assert _options("virtio-console,socket=/s") == ConsoleOptions("/s", 80, 25)
    assert _options("virtio-console,chardev=socket:/s") == ConsoleOptions("/s", 80, 25)
    assert _options("virtio-console,chardev=pty,pty-link=/l") == ConsoleOptions(
        "", 80, 25, "pty", "/l"
    )
    checked = _options(
        "virtio-console,chardev=stdio,port=org.a:socket:/a,port=b:pty,port=c:pty:/c.link"
    )
    assert checked.kind == "stdio"
    assert checked.ports == (
        ConsolePortOption("org.a", "socket", "/a"),
        ConsolePortOption("b", "pty", ""),
        ConsolePortOption("c", "pty", "/c.link"),
    )
    assert [e.name for e in checked.ends()] == ["", "org.a", "b", "c"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("virtio-console", "needs chardev="),
        ("virtio-console,socket=/s,chardev=pty", "not both"),
        ("virtio-console,chardev=tcp:1", "use socket:PATH"),
        ("virtio-console,chardev=socket:", "use socket:PATH"),
        ("virtio-console,chardev=stdio:x", "use socket:PATH"),
        ("virtio-console,chardev=pty:/l", "pty-link=PATH"),
        ("virtio-console,socket=/s,pty-link=/l", "needs chardev=pty"),
        ("virtio-console,socket=/s,port=noname", "port=NAME:socket:PATH"),
        ("virtio-console,socket=/s,port=:pty", "port=NAME:socket:PATH"),
        ("virtio-console,socket=/s,port=a:pty,port=a:pty", "two ports named"),
        ("virtio-console,chardev=stdio,port=a:stdio", "only one port"),
        ("virtio-console,socket=/s,port=a:socket:/s", "same socket"),
    ],
)
def test_bad_specs_say_how_to_fix_them(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _options(text)


def test_only_port_may_repeat() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_device_spec("virtio-console,socket=/a,socket=/b")


# -- pty


async def test_pty_carries_bytes_both_ways_and_keeps_its_link(tmp_path: Path) -> None:
    link = tmp_path / "con"
    pty = PtyConsole(cols=100, rows=30, link=str(link))
    woken: list[str] = []
    pty.on_readable = lambda: woken.append("data")
    await pty.start()
    try:
        assert os.readlink(link) == pty.path
        assert pty.window_size() == (100, 30)
        user = os.open(link, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(user, b"keys\r")  # raw: no translation, no echo
            await _until(lambda: pty.readable() == 5)
            assert pty.read(64) == b"keys\r" and woken
            assert pty.write(b"out\n")
            assert await asyncio.to_thread(os.read, user, 64) == b"out\n"
            assert pty.connected
        finally:
            os.close(user)
    finally:
        await pty.aclose()
    assert not link.exists()


async def test_pty_resize_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console_fd, "SIZE_POLL", 0.01)
    pty = PtyConsole(cols=80, rows=25)
    resized: list[tuple[int, int] | None] = []
    pty.on_resize = lambda: resized.append(pty.window_size())
    await pty.start()
    try:
        set_terminal_size(pty.slave, 132, 43)
        await _until(lambda: resized)
        assert resized == [(132, 43)]
    finally:
        await pty.aclose()


async def test_pty_output_is_bounded_and_drops_are_counted() -> None:
    pty = PtyConsole(cols=80, rows=25)
    drops: list[int] = []
    pty.drop_sink = drops.append
    await pty.start()
    try:
        # Nobody reads the pty: the kernel's buffer fills, then ours, then drops.
        sent = 0
        chunk = b"x" * 4096
        for _ in range(TX_LIMIT // 4096 + 64):
            if pty.write(chunk):
                sent += len(chunk)
            await asyncio.sleep(0)
        assert sent <= TX_LIMIT + 64 * 1024
        assert pty.dropped == sum(drops) > 0
    finally:
        await pty.aclose()


async def test_pty_input_pauses_at_the_limit() -> None:
    pty = PtyConsole(cols=80, rows=25)
    await pty.start()
    try:
        chunk = b"y" * 1024
        written = 0
        os.set_blocking(pty.slave, False)
        for _ in range(RX_LIMIT // 1024 * 4):
            try:
                written += os.write(pty.slave, chunk)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        await _until(lambda: pty.readable() >= RX_LIMIT)
        await asyncio.sleep(0.05)
        assert pty.readable() < RX_LIMIT + 4096  # paused, not growing
        taken = 0
        while taken < written:
            await _until(lambda: pty.readable() > 0)
            taken += len(pty.read(RX_LIMIT))
        assert taken == written
    finally:
        await pty.aclose()


def test_pty_link_over_a_file_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(ConfigError, match="not a symlink"):
        PtyConsole(cols=80, rows=25, link=str(plain))


# -- stdio


async def test_stdio_goes_raw_and_comes_back() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        set_terminal_size(slave, 90, 33)
        console = StdioConsole(slave, slave)
        assert console.window_size() == (90, 33)
        await console.start()
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ECHO | termios.ICANON)
        assert raw[3] & termios.ISIG  # Ctrl-C still stops the server
        os.write(master, b"typed")
        await _until(lambda: console.readable() == 5)
        assert console.read(8) == b"typed"
        assert console.write(b"shown")
        assert await asyncio.to_thread(os.read, master, 64) == b"shown"
        await console.aclose()
        assert termios.tcgetattr(slave) == before
        assert os.get_blocking(slave)
    finally:
        os.close(master)
        os.close(slave)


async def test_stdio_from_a_file_reads_nothing(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_bytes(b"ignored")
    fd = os.open(source, os.O_RDONLY)
    out_r, out_w = os.pipe()
    try:
        console = StdioConsole(fd, out_w)
        assert console.window_size() is None
        await console.start()
        assert console.readable() == 0
        assert console.write(b"ok")
        assert await asyncio.to_thread(os.read, out_r, 8) == b"ok"
        await console.aclose()
    finally:
        for f in (fd, out_r, out_w):
            os.close(f)


def test_terminal_size_of_a_non_terminal_is_none(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        assert terminal_size(r) is None
    finally:
        os.close(r)
        os.close(w)


# -- opening every end of a spec


def test_open_console_ends_opens_each_port(tmp_path: Path) -> None:
    spec = parse_device_spec(
        f"virtio-console,chardev=pty,port=a:socket:{tmp_path}/a.sock,port=b:pty:{tmp_path}/b"
    )
    (ends,) = open_console_ends([spec]).values()
    try:
        assert isinstance(ends.console, PtyConsole)
        assert [name for name, _ in ends.ports] == ["a", "b"]
        assert isinstance(ends.ports[0][1], SocketConsole)
        assert set(ends.pty_paths()) == {"", "b"}
        assert os.readlink(tmp_path / "b") == ends.pty_paths()["b"]
    finally:
        for end in ends.all():
            end.close()
    assert not (tmp_path / "a.sock").exists() and not (tmp_path / "b").exists()


def test_a_bad_port_closes_what_was_opened(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    spec = parse_device_spec(
        f"virtio-console,socket={tmp_path}/ok.sock,port=a:socket:{tmp_path}/plain"
    )
    with pytest.raises(ConfigError, match="not a socket"):
        open_console_ends([spec])
    assert not (tmp_path / "ok.sock").exists()
