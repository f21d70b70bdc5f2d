"""vesa-fb through a real server: the VRAM's backing in the topology and in the
BAR event, a frontend's own mapping of it, and Screendump of what it drew."""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc
from devserver.config import parse_device_spec
from devserver.devices import framebuffer as fb
from devserver.effects import BarDecodeChanged
from devserver.pci.regs import PCI_BASE_ADDRESS_0, PCI_COMMAND, PCI_COMMAND_MEMORY
from devserver.service import screendump as tool
from devserver.service.server import DevServer, Listen
from vmm_client.client import AsyncSession, FrontendOptions, get_topology, open_channel

FB_SLOT = 3
TESTDEV_SLOT = 4
MIB = 1 << 20
VRAM_BASE = 0xE000_0000
MMIO_BASE = 0xE100_0000


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DevServer]:
    srv = DevServer(
        [
            parse_device_spec(f"vesa-fb,slot={FB_SLOT},vram=8"),
            parse_device_spec(f"pci-testdev,slot={TESTDEV_SLOT}"),
        ],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
    )
    await srv.start()
    yield srv
    await srv.stop(0)


def _device(topology: pb.Topology, slot: int) -> pb.DeviceInfo:
    (device,) = [d for d in topology.devices if d.device == slot]
    return device


async def _program(session: AsyncSession) -> list[BarDecodeChanged]:
    """Place BAR0 and BAR2 and turn memory decoding on, as firmware would."""
    await session.config_write(0, FB_SLOT, 0, PCI_BASE_ADDRESS_0, 4, VRAM_BASE)
    await session.config_write(0, FB_SLOT, 0, PCI_BASE_ADDRESS_0 + 8, 4, MMIO_BASE)
    effects = await session.config_write(0, FB_SLOT, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    return [e for e in effects if isinstance(e, BarDecodeChanged)]


def _set_mode(session: AsyncSession, device_id: int, width: int, height: int, bpp: int) -> None:
    def reg(index: int, value: int) -> None:
        session.bar_write(device_id, fb.MMIO_BAR, fb.DISPI_OFFSET + 2 * index, 2, value)

    reg(fb.VBE_DISPI_INDEX_ENABLE, 0)
    reg(fb.VBE_DISPI_INDEX_BPP, bpp)
    reg(fb.VBE_DISPI_INDEX_XRES, width)
    reg(fb.VBE_DISPI_INDEX_YRES, height)
    reg(fb.VBE_DISPI_INDEX_VIRT_WIDTH, width)
    reg(fb.VBE_DISPI_INDEX_ENABLE, fb.VBE_DISPI_ENABLED | fb.VBE_DISPI_LFB_ENABLED)


async def test_topology_names_the_vram_backing(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        device = _device(await get_topology(channel), FB_SLOT)
    assert (device.type, device.vendor_id, device.product_id) == ("vesa-fb", 0x1234, 0x1111)
    assert device.class_code == 0x038000
    bars = {b.index: b for b in device.bars}
    assert sorted(bars) == [0, 2]
    assert bars[0].shared_memory and bars[0].prefetchable and bars[0].size == 8 * MIB
    assert bars[0].backing.size == 8 * MIB
    assert bars[0].backing.path.startswith("/proc/")
    assert await asyncio.to_thread(os.path.exists, bars[0].backing.path)
    assert not bars[2].shared_memory and not bars[2].HasField("backing")


async def test_guest_pixels_in_the_mapping_come_back_in_screendump(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        session = await AsyncSession.attach(channel, FrontendOptions("fb", shared_memory_bars=True))
        try:
            device_id = _device(session.topology, FB_SLOT).device_id
            events = await _program(session)
            (vram_event,) = [e for e in events if e.bar == fb.VRAM_BAR]
            assert vram_event.new is not None and vram_event.new.base == VRAM_BASE
            assert vram_event.backing is not None
            # The frontend maps the backing, as a memslot or QEMU's BAR mmap would.
            fd = os.open(vram_event.backing.path, os.O_RDWR)
            try:
                with mmap.mmap(fd, vram_event.backing.size, mmap.MAP_SHARED) as vram:
                    width, height = 2048, 1024  # 6 MiB of RGB: more than one reply
                    for row in range(height):
                        pixel = bytes((row & 0xFF, 0x40, row >> 8, 0))  # B G R X
                        vram[row * width * 4 : (row + 1) * width * 4] = pixel * width
                    _set_mode(session, device_id, width, height, 32)
                    await session.flush()
                    # A forwarded read sees the same bytes as the mapping.
                    assert await session.bar_read(device_id, fb.VRAM_BAR, 4 * width, 4) == (
                        0x0000_4001
                    )
                    stub = devmodel_pb2_grpc.DeviceModelStub(channel)
                    one = await stub.Screendump(pb.ScreendumpRequest(device_id=device_id))
                    assert (one.mode.width, one.mode.height, one.mode.bpp) == (width, height, 32)
                    assert one.mode.stride == width * 4
                    assert 0 < one.rows < height
                    assert len(one.rgb) == one.rows * width * 3
                    picture = await tool.screendump(channel, device_id)
            finally:
                os.close(fd)
        finally:
            await session.close()
    assert picture is not None
    assert (picture.width, picture.height) == (width, height)
    for row in (0, 1, 511, 1023):
        start = row * width * 3
        assert picture.rgb[start : start + 6] == bytes((row >> 8, 0x40, row & 0xFF)) * 2
    assert picture.ppm().startswith(b"P6\n2048 1024\n255\n")


async def test_refused_mode_shows_nothing(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        session = await AsyncSession.attach(channel, FrontendOptions("fb"))
        try:
            device_id = _device(session.topology, FB_SLOT).device_id
            await _program(session)
            _set_mode(session, device_id, 4096, 4096, 32)  # 64 MiB > 8 MiB of VRAM
            await session.flush()
            assert await tool.screendump(channel, device_id) is None
            reply = await devmodel_pb2_grpc.DeviceModelStub(channel).Screendump(
                pb.ScreendumpRequest(device_id=device_id)
            )
            assert not reply.HasField("mode") and not reply.rgb
        finally:
            await session.close()


async def test_screendump_of_other_devices_is_refused(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        topology = await get_topology(channel)
        stub = devmodel_pb2_grpc.DeviceModelStub(channel)
        testdev_id = _device(topology, TESTDEV_SLOT).device_id
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Screendump(pb.ScreendumpRequest(device_id=testdev_id))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not a display" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Screendump(pb.ScreendumpRequest(device_id=999))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # Not attached: the display is off.
        fb_id = _device(topology, FB_SLOT).device_id
        assert await tool.screendump(channel, fb_id) is None


async def test_command_line_tool_writes_a_ppm(server: DevServer, tmp_path: Path) -> None:
    out = tmp_path / "shot.ppm"
    async with open_channel(server.address) as channel:
        session = await AsyncSession.attach(channel, FrontendOptions("fb"))
        try:
            device_id = _device(session.topology, FB_SLOT).device_id
            await _program(session)
            session.bar_write(device_id, fb.VRAM_BAR, 0, 4, 0x00FF_8000)  # forwarded pixel store
            _set_mode(session, device_id, 64, 64, 32)
            await session.flush()
            code = await asyncio.to_thread(tool.main, [server.address, str(device_id), str(out)])
        finally:
            await session.close()
    assert code == 0
    data = out.read_bytes()
    header = b"P6\n64 64\n255\n"
    assert data.startswith(header)
    assert data[len(header) : len(header) + 3] == bytes((0xFF, 0x80, 0x00))
    assert len(data) == len(header) + 64 * 64 * 3


def test_command_line_usage() -> None:
    assert tool.main([]) == 2
    assert tool.main(["unix:/x", "not-a-number", "out.ppm"]) == 2
