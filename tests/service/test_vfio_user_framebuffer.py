"""The vesa-fb's VRAM through the vfio-user bridge as QEMU sees it: BAR0 is an
mmappable region whose fd comes with GET_REGION_INFO, and stores through that
mapping are what Screendump returns (no message per pixel)."""

from __future__ import annotations

import array
import asyncio
import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devserver.config import parse_device_spec
from devserver.devices import framebuffer as fb
from devserver.service import screendump as tool
from devserver.service.server import DevServer, Listen
from vmm_client.client import AsyncSession, open_channel
from vmm_client.vfio_user.bridge import VfioUserBridge, open_bridge
from vmm_client.vfio_user.protocol import REGION_INFO_FLAG_MMAP
from vmm_client.vfio_user.shared_bars import open_shared_bars

from .test_vfio_user_bridge import CONFIG, HDR, REGION_INFO, REPLY, Client

MIB = 1 << 20
VRAM = 2 * MIB


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DevServer]:
    srv = DevServer(
        [
            parse_device_spec("vesa-fb,vram=2,name=fb"),
            parse_device_spec("pci-testdev,name=td"),
        ],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
    )
    await srv.start()
    yield srv
    await srv.stop(0)


def region_info_with_fd(client: Client, index: int) -> tuple[int, int, int, list[int]]:
    """GET_REGION_INFO, keeping the descriptors that come with the reply:
    (flags, size, offset, fds)."""
    msg_id = client.send(REGION_INFO, struct.pack("<IIIIQQ", 32, 0, index, 0, 0, 0))
    data, ancillary, _, _ = client.sock.recvmsg(48, socket.CMSG_SPACE(4 * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    data += client.recv_exact(48 - len(data))
    got_id, command, size, flags, error = HDR.unpack_from(data)
    assert (got_id, command, size, flags & REPLY, error) == (msg_id, REGION_INFO, 48, REPLY, 0)
    _, region_flags, got_index, _, region_size, offset = struct.unpack_from("<IIIIQQ", data, 16)
    assert got_index == index
    return region_flags, region_size, offset, fds


def drive_guest(socket_path: Path) -> tuple[int, int, int]:
    """What QEMU and the guest do: map BAR0 from the fd, program the BARs and a
    mode through forwarded accesses, and draw by plain stores into the mapping.
    Returns (BAR0 flags, BAR2 flags, descriptors received for BAR2)."""
    client = Client(socket_path)
    try:
        client.version()
        flags0, size0, offset0, fds0 = region_info_with_fd(client, 0)
        flags2, _, _, fds2 = region_info_with_fd(client, 2)
        for fd in fds2:
            os.close(fd)
        assert (size0, offset0, len(fds0)) == (VRAM, 0, 1)
        fd = fds0[0]
        try:
            with mmap.mmap(fd, size0, mmap.MAP_SHARED) as vram:
                client.write_int(CONFIG, 0x10, 4, 0xE000_0000)
                client.write_int(CONFIG, 0x18, 4, 0xE100_0000)
                client.write_int(CONFIG, 0x04, 2, 0x2)  # memory decoding
                for index, value in (
                    (fb.VBE_DISPI_INDEX_ENABLE, 0),
                    (fb.VBE_DISPI_INDEX_BPP, 32),
                    (fb.VBE_DISPI_INDEX_XRES, 320),
                    (fb.VBE_DISPI_INDEX_YRES, 200),
                    (fb.VBE_DISPI_INDEX_VIRT_WIDTH, 320),
                    (fb.VBE_DISPI_INDEX_ENABLE, fb.VBE_DISPI_ENABLED | fb.VBE_DISPI_LFB_ENABLED),
                ):
                    client.write_int(fb.MMIO_BAR, fb.DISPI_OFFSET + 2 * index, 2, value)
                for row in range(200):
                    vram[row * 1280 : (row + 1) * 1280] = bytes((0x11, row, 0xEE, 0)) * 320
                # A forwarded read (QEMU's own access path) sees the same bytes.
                assert client.read_int(0, 1280 * 7, 4) == 0x00EE_0711
        finally:
            os.close(fd)
        return flags0, flags2, len(fds2)
    finally:
        client.close()


async def test_vram_is_mapped_from_the_region_fd(server: DevServer, tmp_path: Path) -> None:
    async with open_bridge(server.address, tmp_path / "vfu") as bridge:
        assert bridge.map_shared_bars  # a unix: server is on this host
        flags0, flags2, fds2 = await asyncio.to_thread(drive_guest, bridge.sockets["fb"])
        async with open_channel(server.address) as channel:
            device_id = next(d.info.device_id for d in bridge.devices.values() if d.name == "fb")
            picture = await tool.screendump(channel, device_id)
    assert flags0 & REGION_INFO_FLAG_MMAP
    assert not flags2 & REGION_INFO_FLAG_MMAP and fds2 == 0
    assert picture is not None and (picture.width, picture.height) == (320, 200)
    for row in (0, 7, 199):
        assert picture.rgb[row * 960 : row * 960 + 3] == bytes((0xEE, row, 0x11))


async def test_no_mmap_for_a_server_elsewhere(server: DevServer, tmp_path: Path) -> None:
    """Without map_shared_bars (a TCP server's /proc paths are not ours) the
    region is plain: every access is forwarded."""
    async with open_channel(server.address) as channel:
        bridge = VfioUserBridge(tmp_path / "vfu", map_shared_bars=False)
        session = await AsyncSession.attach(channel, bridge.frontend_options("t"))
        try:
            sockets = await bridge.start(session)

            def probe() -> tuple[int, list[int]]:
                client = Client(sockets["fb"])
                try:
                    client.version()
                    flags, _, _, fds = region_info_with_fd(client, 0)
                    return flags, fds
                finally:
                    client.close()

            flags, fds = await asyncio.to_thread(probe)
        finally:
            await bridge.stop()
            await session.close()
    assert not flags & REGION_INFO_FLAG_MMAP and fds == []
    assert all(not d.mmap_fds for d in bridge.devices.values())


async def test_backing_that_cannot_be_opened_is_served_by_messages(tmp_path: Path) -> None:
    info = pb.DeviceInfo(
        device_id=1,
        name="fb",
        bars=[
            pb.BarInfo(
                index=0,
                kind=pb.BAR_KIND_MEM32,
                size=VRAM,
                shared_memory=True,
                backing=pb.SharedMemoryBacking(path=str(tmp_path / "gone"), size=VRAM),
            )
        ],
    )
    assert open_shared_bars(info) == {}
    small = tmp_path / "small"
    small.write_bytes(bytes(4096))
    info.bars[0].backing.path = str(small)
    assert open_shared_bars(info) == {}
    small.write_bytes(bytes(VRAM))
    fds = open_shared_bars(info)
    assert list(fds) == [0]
    os.close(fds[0])
