"""Linux's own bochs DRM driver on our vesa-fb: QEMU + vfio-user bridge + device
server. The driver binds (ID, VRAM size, EDID, QEMU extended registers), its
fbdev emulation gives /dev/fb0, the guest draws random pixels into it (through
QEMU's mapping of the BAR0 memfd, never a message per store), and Screendump
returns them while the guest still shows them.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
from pathlib import Path

import pytest

from devserver.config import parse_device_spec
from devserver.devices.framebuffer import to_rgb
from devserver.service import screendump as tool
from devserver.service.server import DevServer, Listen
from vmm_client.client import get_topology, open_channel
from vmm_client.guest.image import DEFAULT_MODULES, DISPLAY_MODULES
from vmm_client.qemu.frontend import boot_served_guest

pytestmark = pytest.mark.usefixtures("qemu_ready")

# The script checks the binding and fb0, draws stride * height random bytes,
# prints their md5 and DRAWN, then keeps the picture up while the host looks.
# fbcon is let go of first, so neither its cursor nor its text lands on it.
# Writes span 8 rows each: Debian 12's kernel (6.1) computes an empty damage
# rectangle for a write() of exactly one whole scanline (its x2 wraps to 0), so
# 4096-byte writes would stay in the fbdev shadow buffer and never reach VRAM.
SCRIPT = """
set -e
echo bound=$(ls /sys/bus/pci/drivers/bochs-drm | grep -c :)
i=0
while [ ! -e /dev/fb0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
fb=/sys/class/graphics/fb0
echo fbname=$(cat $fb/name)
echo size=$(cat $fb/virtual_size)
echo bpp=$(cat $fb/bits_per_pixel)
echo stride=$(cat $fb/stride)
for v in /sys/class/vtconsole/vtcon*; do
  grep -q 'frame buffer' $v/name && echo 0 > $v/bind || true
done
s=$(cat $fb/stride)
h=$(cut -d, -f2 $fb/virtual_size)
dd if=/dev/urandom of=/tmp/pat bs=$s count=$h 2>/dev/null
dd if=/tmp/pat of=/dev/fb0 bs=$((s * 8)) count=$((h / 8)) 2>/dev/null
echo md5=$(md5sum < /tmp/pat | cut -d' ' -f1)
echo DRAWN
sleep 30
"""
HOLD_S = 30.0  # the script's sleep: the picture stays up this long after DRAWN


def value(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key}= not in guest output:\n{output}")


def vram_rows(path: str, offset: int, stride: int, rows: int) -> bytes:
    """The raw bytes of the shown rows, straight from the VRAM memfd."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as vram:
            return bytes(vram[offset : offset + stride * rows])
    finally:
        os.close(fd)


async def test_bochs_driver_draws_and_screendump_sees_it(tmp_path: Path) -> None:
    srv = DevServer(
        [parse_device_spec("vesa-fb,name=fb")], Listen(unix_path=tmp_path / "run" / "fb.sock")
    )
    await srv.start()
    loop = asyncio.get_running_loop()
    drawn = asyncio.Event()
    console: list[str] = []
    tail = [""]

    def on_output(text: str) -> None:  # QEMU's reader thread
        console.append(text)
        tail[0] = (tail[0] + text)[-64:]  # text may come a character at a time
        if "DRAWN" in tail[0]:
            loop.call_soon_threadsafe(drawn.set)

    try:
        async with open_channel(srv.address) as channel:
            (info,) = (await get_topology(channel)).devices
            backing = info.bars[0].backing
            guest = asyncio.create_task(
                boot_served_guest(
                    srv.address,
                    SCRIPT,
                    timeout=600,
                    modules=(*DEFAULT_MODULES, *DISPLAY_MODULES),
                    extra_append="vt.global_cursor_default=0",
                    on_output=on_output,
                )
            )
            waiter = asyncio.create_task(drawn.wait())
            await asyncio.wait({guest, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if guest.done():
                waiter.cancel()
                result = guest.result()
                pytest.fail(f"the guest ended before drawing:\n{result.output}\n{result.console}")
            # The picture is up; the guest's md5 line came just before DRAWN.
            md5 = value("".join(console).replace("\r", ""), "md5")
            shot = None
            raw = b""
            deadline = loop.time() + HOLD_S / 2
            while loop.time() < deadline:
                # Deferred I/O may flush the shadow buffer a little later: poll.
                shot = await tool.screendump(channel, info.device_id)
                if shot is not None:
                    mode = shot.mode
                    raw = await asyncio.to_thread(
                        vram_rows, backing.path, mode.offset, mode.stride, mode.height
                    )
                    if hashlib.md5(raw).hexdigest() == md5:
                        break
                await asyncio.sleep(0.5)
            result = await guest
    finally:
        await srv.stop(0)

    assert result.exit_status == 0, result.console
    out = result.output
    assert value(out, "bound") == "1", out
    assert "bochs" in value(out, "fbname")
    assert value(out, "size") == "1024,768"  # the EDID's preferred mode
    assert value(out, "bpp") == "32"
    assert value(out, "stride") == "4096"
    assert shot is not None, "Screendump never showed a mode"
    assert (shot.width, shot.height, shot.mode.bpp) == (1024, 768, 32)
    assert hashlib.md5(raw).hexdigest() == md5, "VRAM never held the guest's pixels"
    assert shot.rgb == to_rgb(raw, 32)
