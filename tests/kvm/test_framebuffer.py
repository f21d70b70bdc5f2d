"""A shared-memory BAR as a memslot, with a real device: the server's vesa-fb.

pcitest draws the top half of a 64x64 picture into the VRAM BAR, moves the BAR
while it decodes, checks the pixels came along and the old address is dead,
and draws the bottom half at the new address. Checked from every side: the
guest's checks; the frontend's memslot (mapped, then moved as the same slot);
the server's counters (the pixel stores never reached it as BAR writes, only
the four mode registers did); and the server's own mapping of the VRAM, read
back as a screendump while the guest waits on its "FBDRAWN" line.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc
from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.client import get_stats, open_channel
from vmm_client.kvm.memslots import SlotChange
from vmm_client.kvm.runner import run_program

pytestmark = pytest.mark.kvm

FB_SLOT = 3
FB_SIZE = 1 << 20
WIDTH = HEIGHT = 64


def fb_pixel(i: int) -> int:
    """pcitest.c's fb_pixel: XRGB8888."""
    return 0x005A_0000 | ((i & 0xFF) << 8) | ((i >> 6) & 0xFF)


@pytest_asyncio.fixture
async def fb_server(tmp_path: Path) -> AsyncIterator[DevServer]:
    specs = ("pci-testdev", f"vesa-fb,slot={FB_SLOT},vram=1", "pci-testdev,slot=5")
    srv = DevServer(
        [parse_device_spec(d) for d in specs], Listen(unix_path=tmp_path / "run" / "dev.sock")
    )
    await srv.start()
    yield srv
    await srv.stop(0)


@pytest.mark.parametrize("user", [False, True], ids=["ring0", "ring3"])
async def test_framebuffer_memslot_follows_the_bar(
    pcitest_elf: bytes, fb_server: DevServer, user: bool
) -> None:
    address = fb_server.address
    pictures: list[pb.ScreendumpReply] = []
    line = bytearray()

    def output(data: bytes) -> None:
        # On the vCPU's thread: the guest waits on this UART write while the
        # server is asked, with a blocking channel, what its mapping shows.
        line.extend(data)
        if data == b"\n":
            if line == b"FBDRAWN\n":
                with grpc.insecure_channel(address) as channel:
                    stub = devmodel_pb2_grpc.DeviceModelStub(channel)
                    pictures.append(
                        stub.Screendump(pb.ScreendumpRequest(device_id=FB_SLOT), timeout=30)
                    )
            line.clear()

    run = await asyncio.to_thread(
        run_program, pcitest_elf, address, output=output, timeout=120, user=user
    )
    out = run.output
    assert run.result.ok, out
    assert "pcitest: 3 devices, 0 failures" in out
    assert f"FBMOVED {FB_SLOT} 0xe0100000 -> 0xf0000000" in out
    assert "CHECK fb-moved-top-half got=0x0 want=0x0 ok" in out
    assert "CHECK fb-old-address-dead got=0xffffffff want=0xffffffff ok" in out

    # The frontend: one memslot, mapped where the guest put the BAR, then moved
    # (the same slot re-addressed, not a new one), and dropped at the end.
    fb_changes = [c for c in run.slot_changes if c.device_id == FB_SLOT]
    slot = fb_changes[0].slot
    assert fb_changes == [
        SlotChange("map", FB_SLOT, 0, slot, 0xE010_0000),
        SlotChange("move", FB_SLOT, 0, slot, 0xF000_0000),
        SlotChange("unmap", FB_SLOT, 0, slot, 0xF000_0000),
    ]
    assert run.memslots[slot].guest_address == 0xF000_0000 and run.memslots[slot].size == FB_SIZE
    # The routing table still holds the BAR (a frontend without memslots would forward).
    assert run.routing.range_of(FB_SLOT, 0) is not None
    assert run.routing.range_of(FB_SLOT, 0).base == 0xF000_0000  # type: ignore[union-attr]

    # The server: 4096 pixel stores, none of them a BAR write; only the mode
    # registers (XRES, YRES, BPP, ENABLE) and the ID read crossed the stream.
    async with open_channel(address) as channel:
        stats = await get_stats(channel)
    fb = next(d for d in stats.devices if d.device_id == FB_SLOT)
    assert (fb.bar_writes, fb.bar_reads) == (4, 1)
    assert fb.bar_decode_changes >= 2  # started decoding, moved

    # ...and the server's own mapping of the VRAM shows every pixel the guest drew,
    # both halves, before and after the move.
    assert len(pictures) == 1
    picture = pictures[0]
    assert (picture.mode.width, picture.mode.height, picture.mode.bpp) == (WIDTH, HEIGHT, 32)
    assert picture.rows == HEIGHT
    expected = b"".join(
        struct.pack(">I", fb_pixel(i))[1:] for i in range(WIDTH * HEIGHT)
    )  # XRGB -> R, G, B
    assert picture.rgb == expected
