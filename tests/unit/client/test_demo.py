"""The main job's host side (vmm_client.demo) without a guest: the PNG writer,
the live script output, the named port's answers, a screendump of a dark
screen, the balloon's target set with no driver to inflate it, and the guest
modules a server's devices need.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from devserver.config import parse_device_spec
from devserver.service.screendump import ScreendumpError
from devserver.service.server import DevServer, Listen
from vmm_client import demo
from vmm_client.client import ClientError, open_channel
from vmm_client.guest.console import BEGIN, END
from vmm_client.guest.image import DEFAULT_MODULES, DISPLAY_MODULES
from vmm_client.qemu.drivers import modules_for, served_devices


def read_png(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB rows of the demo's PNG (8-bit RGB, filter 0 on every row)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        assert crc == zlib.crc32(tag + body)
        if tag == b"IHDR":
            width, height, depth, colour = struct.unpack_from(">IIBB", body)
            assert (depth, colour) == (8, 2)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    row = 1 + 3 * width
    assert len(raw) == row * height
    assert all(raw[y * row] == 0 for y in range(height))
    return width, height, b"".join(raw[y * row + 1 : (y + 1) * row] for y in range(height))


def test_png_holds_the_pixels() -> None:
    rgb = bytes(range(256)) * 9  # 768 pixels, as 12 rows of 64
    assert read_png(demo.png(64, 12, rgb)) == (64, 12, rgb)


def test_live_script_prints_only_the_scripts_lines(capsys: pytest.CaptureFixture[str]) -> None:
    live = demo.LiveScript()
    console = f"noise\r\n{BEGIN} 1234\r\nfirst line\r\nsecond\r\n\r\n{END} 1234\r\nafter"
    for i in range(0, len(console), 3):  # the console comes in pieces of any size
        live(console[i : i + 3])
    assert capsys.readouterr().out == "first line\nsecond\n\n"


def test_modules_for_adds_the_bochs_driver_once_for_a_vesa_fb() -> None:
    assert modules_for(["pci-testdev", "virtio-blk"]) == DEFAULT_MODULES
    with_fb = modules_for(["vesa-fb", "virtio-console", "vesa-fb"])
    assert with_fb == (*DEFAULT_MODULES, *DISPLAY_MODULES)


async def streams() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
]:
    a, b = socket.socketpair()
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


def picture() -> demo.SavedPicture:
    return demo.SavedPicture(Path("/x.png"), 640, 480, 32, "ab" * 32)


async def test_agent_answers_each_line_and_takes_a_picture_when_drawn() -> None:
    (host_r, host_w), (guest_r, guest_w) = await streams()
    ends = demo.HostEnds()
    taken: list[int] = []

    async def take() -> demo.SavedPicture:
        taken.append(1)
        return picture()

    task = asyncio.create_task(demo.answer_agent(host_r, host_w, ends, take))
    guest_w.write(b"hello drawn=no\n")
    assert await guest_r.readline() == b"hello from the host\n"
    guest_w.write(b"hello drawn=yes\n")
    assert await guest_r.readline() == b"screendump saved: 640x480, sha256 abababababababab\n"
    guest_w.close()
    await asyncio.wait_for(task, 10)
    assert ends.agent_lines == ["hello drawn=no", "hello drawn=yes"]
    assert ends.picture == picture() and taken == [1]
    assert not ends.problems
    host_w.close()


async def test_a_failed_screendump_is_answered_and_reported() -> None:
    (host_r, host_w), (guest_r, guest_w) = await streams()
    ends = demo.HostEnds()

    async def take() -> demo.SavedPicture:
        raise ScreendumpError("display off")

    task = asyncio.create_task(demo.answer_agent(host_r, host_w, ends, take))
    guest_w.write(b"drawn=yes\n")
    assert await guest_r.readline() == b"the screendump failed\n"
    guest_w.close()
    await asyncio.wait_for(task, 10)
    assert ends.problems == ["screendump failed: display off"]
    assert ends.picture is None
    host_w.close()


async def test_a_balloon_line_sets_the_target_and_answers_what_the_guest_holds() -> None:
    (host_r, host_w), (guest_r, guest_w) = await streams()
    ends = demo.HostEnds()
    seen = iter([demo.BalloonSeen(32 << 20, 32 << 20), demo.BalloonSeen(32 << 20, 8 << 20)])

    async def set_balloon() -> demo.BalloonSeen:
        return next(seen)

    task = asyncio.create_task(demo.answer_agent(host_r, host_w, ends, None, set_balloon))
    guest_w.write(b"balloon: set my target\n")
    answer = b"balloon target 32 MiB, the guest holds 32 MiB\n"
    assert await guest_r.readline() == answer
    assert not ends.problems
    guest_w.write(b"balloon: again\n")  # a guest that never got there is a failure
    assert await guest_r.readline() == b"balloon target 32 MiB, the guest holds 8 MiB\n"
    guest_w.close()
    await asyncio.wait_for(task, 10)
    assert ends.balloon == demo.BalloonSeen(32 << 20, 8 << 20)
    assert ends.problems == [
        "the balloon never reached its target: target 32 MiB, the guest holds 8 MiB"
    ]
    host_w.close()


async def test_no_balloon_or_a_failed_rpc_is_an_answer_too() -> None:
    (host_r, host_w), (guest_r, guest_w) = await streams()
    ends = demo.HostEnds()
    task = asyncio.create_task(demo.answer_agent(host_r, host_w, ends, None, None))
    guest_w.write(b"balloon\n")
    assert await guest_r.readline() == b"no balloon: the server has no virtio-balloon\n"
    guest_w.close()
    await asyncio.wait_for(task, 10)
    host_w.close()

    (host_r, host_w), (guest_r, guest_w) = await streams()

    async def refused() -> demo.BalloonSeen:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "no device 9"
        )

    task = asyncio.create_task(demo.answer_agent(host_r, host_w, ends, None, refused))
    guest_w.write(b"balloon\n")
    assert await guest_r.readline() == b"the Balloon RPC failed\n"
    guest_w.close()
    await asyncio.wait_for(task, 10)
    assert ends.problems == ["the Balloon RPC failed: NOT_FOUND: no device 9"]
    assert ends.balloon is None
    host_w.close()


async def test_no_vesa_fb_means_no_screendump_but_an_answer() -> None:
    (host_r, host_w), (guest_r, guest_w) = await streams()
    ends = demo.HostEnds()
    task = asyncio.create_task(demo.answer_agent(host_r, host_w, ends, None))
    guest_w.write(b"drawn=yes\n")
    assert await guest_r.readline() == b"no screendump: the server has no vesa-fb\n"
    guest_w.close()
    await asyncio.wait_for(task, 10)
    host_w.close()


@pytest.fixture
async def fb_server(tmp_path: Path) -> AsyncIterator[DevServer]:
    srv = DevServer(
        [parse_device_spec("vesa-fb,vram=4"), parse_device_spec("pci-testdev")],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
    )
    await srv.start()
    yield srv
    await srv.stop(0)


async def test_a_dark_screen_is_a_clear_failure(fb_server: DevServer, tmp_path: Path) -> None:
    devices = await served_devices(fb_server.address)
    assert [d.type for d in devices] == ["vesa-fb", "pci-testdev"]
    async with open_channel(fb_server.address) as channel:
        with pytest.raises(ScreendumpError, match="shows nothing"):
            await demo.capture(channel, devices[0].device_id, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


async def test_inflate_sets_the_target_and_stops_waiting_for_an_absent_driver(
    tmp_path: Path,
) -> None:
    srv = DevServer(
        [parse_device_spec("virtio-balloon")], Listen(unix_path=tmp_path / "run" / "dev.sock")
    )
    await srv.start()
    try:
        (device,) = await served_devices(srv.address)
        assert device.type == "virtio-balloon"
        async with open_channel(srv.address) as channel:
            seen = await demo.inflate(channel, device.device_id, wait_s=0.3, poll_s=0.1)
    finally:
        await srv.stop(0)
    # No guest attached: the target is the server's, the driver holds nothing.
    assert seen == demo.BalloonSeen(demo.BALLOON_TARGET_BYTES, 0)
    assert str(seen) == "target 32 MiB, the guest holds 0 MiB"


async def test_no_server_is_a_clear_client_error(tmp_path: Path) -> None:
    with pytest.raises(ClientError, match="cannot reach the device server at unix:"):
        await served_devices(f"unix:{tmp_path}/none.sock")


async def test_a_missing_console_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"cannot connect to hvc0's host end at .*none\.sock"):
        await demo.connect(tmp_path / "none.sock", "hvc0")
