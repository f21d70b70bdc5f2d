"""Linux's virtio-blk driver on our device (virtio 1.2 §5.2): QEMU + vfio-user
bridge + device server, guest RAM shared (memory mode SHARED), a raw image file
behind it. Raw sectors, a filesystem that survives a reboot, and a read-only
image that refuses writes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.guest.image import DEFAULT_MODULES, DEFAULT_TOOLS, STORAGE_TOOLS
from vmm_client.qemu.frontend import boot_served_guest
from vmm_client.qemu.launch import GuestResult

IMAGE_SIZE = 64 << 20
TOOLS = DEFAULT_TOOLS + STORAGE_TOOLS
# ext4 is a module in Debian's kernel, and it finds its metadata checksum by the
# crypto name "crc32c" (without a provider, mount fails with ENOENT).
MODULES = (*DEFAULT_MODULES, "ext4", "crc32c_generic")
PATTERN_SECTOR = 2048  # 1 MiB in


pytestmark = pytest.mark.usefixtures("qemu_ready")


async def boot(
    tmp_path: Path, image: Path, script: str, *, readonly: bool = False, memory_mode: str = "auto"
) -> GuestResult:
    ro = ",readonly=on" if readonly else ""
    srv = DevServer(
        [parse_device_spec(f"virtio-blk,path={image},serial=devmodel-blk{ro}")],
        Listen(unix_path=tmp_path / "run" / "blk.sock"),
    )
    await srv.start()
    try:
        return await boot_served_guest(
            srv.address,
            script,
            timeout=300 if memory_mode != "messages" else 900,  # a round trip per ring access
            tools=TOOLS,
            modules=MODULES,
            memory_mode=memory_mode,
        )
    finally:
        await srv.stop(0)


def value(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key}= not in guest output:\n{output}")


def make_image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return image


# The bridge's memory mode: the server maps guest RAM ("shared") or asks the
# bridge for every ring and buffer access by DmaRequest ("messages").
@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_raw_sectors_and_a_filesystem_across_reboots(
    tmp_path: Path, memory_mode: str
) -> None:
    image = make_image(tmp_path)
    first = await boot(
        tmp_path,
        image,
        f"""
set -e
test -d /sys/block/vda
echo size=$(cat /sys/block/vda/size)
echo serial=$(cat /sys/block/vda/serial 2>/dev/null || true)
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=64 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=512 seek={PATTERN_SECTOR} conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=512 skip={PATTERN_SECTOR} count=512 2>/dev/null
echo pattern=$(md5sum < /tmp/pattern | cut -d' ' -f1)
echo back=$(md5sum < /tmp/back | cut -d' ' -f1)
mkfs.ext4 -q -F /dev/vda
mkdir -p /mnt/d
mount -t ext4 /dev/vda /mnt/d
dd if=/dev/urandom of=/mnt/d/file bs=4096 count=256 2>/dev/null
sync
echo file=$(md5sum < /mnt/d/file | cut -d' ' -f1)
umount /mnt/d
echo done=1
""",
        memory_mode=memory_mode,
    )
    out = first.output
    assert first.exit_status == 0, first.console
    assert value(out, "size") == str(IMAGE_SIZE // 512)
    assert value(out, "serial") == "devmodel-blk"
    assert value(out, "pattern") == value(out, "back")
    assert value(out, "done") == "1"
    file_sum = value(out, "file")

    second = await boot(
        tmp_path,
        image,
        """
set -e
mkdir -p /mnt/d
mount -t ext4 -o ro /dev/vda /mnt/d
echo file=$(md5sum < /mnt/d/file | cut -d' ' -f1)
umount /mnt/d
""",
        memory_mode=memory_mode,
    )
    assert second.exit_status == 0, second.console
    assert value(second.output, "file") == file_sum


async def test_pattern_lands_in_the_image_file(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    result = await boot(
        tmp_path,
        image,
        f"""
set -e
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=16 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=512 seek={PATTERN_SECTOR} conv=fsync 2>/dev/null
echo pattern=$(md5sum < /tmp/pattern | cut -d' ' -f1)
""",
    )
    assert result.exit_status == 0, result.console
    with image.open("rb") as f:
        f.seek(PATTERN_SECTOR * 512)
        host = hashlib.md5(f.read(16 * 4096)).hexdigest()
    assert host == value(result.output, "pattern")


async def test_read_only_image_refuses_writes(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    with image.open("r+b") as f:
        f.write(b"keep" * 128)
    result = await boot(
        tmp_path,
        image,
        """
echo ro=$(cat /sys/block/vda/ro)
if dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; then
  echo write=ok
else
  echo write=refused
fi
echo head=$(dd if=/dev/vda bs=4 count=1 2>/dev/null)
""",
        readonly=True,
    )
    assert result.exit_status == 0, result.console
    assert value(result.output, "ro") == "1"
    assert value(result.output, "write") == "refused"
    assert value(result.output, "head") == "keep"
    assert image.read_bytes()[:512] == b"keep" * 128
