"""A filesystem on our virtio-blk survives a real guest reboot (issue 5): one QEMU
process, `reboot -f` in the guest, the machine reset reaching the bridge and the
device server as a device reset, and Linux's driver probing the device again."""

from __future__ import annotations

from pathlib import Path

import pytest

from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.guest.image import DEFAULT_MODULES, DEFAULT_TOOLS, STORAGE_TOOLS
from vmm_client.qemu.reboot import run_served_across_reboots

pytestmark = pytest.mark.usefixtures("qemu_ready")

IMAGE_SIZE = 160 << 20
TOOLS = DEFAULT_TOOLS + STORAGE_TOOLS
MODULES = (*DEFAULT_MODULES, "ext4", "crc32c_generic")

FIRST = """
set -e
mkfs.ext4 -q -F /dev/vda
mkdir -p /mnt/d
mount -t ext4 /dev/vda /mnt/d
dd if=/dev/urandom of=/mnt/d/data bs=1M count=64 2>/dev/null
sync
echo sum=$(md5sum < /mnt/d/data | cut -d' ' -f1)
echo size=$(stat -c %s /mnt/d/data)
"""
# Boot 2 reads what boot 1 wrote from the disk: nothing survives a reboot in
# the guest's page cache.
SECOND = """
set -e
mkdir -p /mnt/d
mount -t ext4 /dev/vda /mnt/d
echo sum=$(md5sum < /mnt/d/data | cut -d' ' -f1)
echo size=$(stat -c %s /mnt/d/data)
umount /mnt/d
fsck.ext4 -n -f /dev/vda >/dev/null 2>&1 && echo fsck=clean || echo fsck=dirty
"""


def value(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key}= not in guest output:\n{output}")


# The bridge's memory mode: the server maps guest RAM ("shared") or asks the
# bridge for every ring and buffer access by DmaRequest ("messages").
@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_a_checksum_survives_a_guest_reboot(tmp_path: Path, memory_mode: str) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    srv = DevServer(
        [parse_device_spec(f"virtio-blk,path={image}")],
        Listen(unix_path=tmp_path / "run" / "blk.sock"),
    )
    await srv.start()
    try:
        result = await run_served_across_reboots(
            srv.address,
            [FIRST, SECOND],
            timeout=900,
            tools=TOOLS,
            modules=MODULES,
            memory_mode=memory_mode,
        )
        counters = srv.servicer.counters
        resets = sum(d.resets for d in counters.devices.values())
    finally:
        await srv.stop(0)
    console = result.guest.console
    assert [(b.boot, b.exit_status) for b in result.boots] == [(1, 0), (2, 0)], console
    first, second = (b.output for b in result.boots)
    assert value(first, "size") == value(second, "size") == str(64 << 20)
    assert value(second, "sum") == value(first, "sum")
    assert value(second, "fsck") == "clean"
    # QEMU resets its vfio-user devices once at start-up (a single boot counts
    # 1 here) and again at the guest's reboot (QEMU 11.1: twice more), each
    # reaching the server as a device reset.
    assert resets > 1, f"only {resets} device reset reached the server"
