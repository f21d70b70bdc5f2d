"""Linux's virtio_blk on our device's optional features (virtio 1.2 §5.2.3):

- DISCARD / WRITE_ZEROES: files removed in the guest and trimmed (fstrim), or a
  range discarded (blkdiscard), give their blocks back to the host: the image's
  st_blocks drop. With discard=off Linux sees no discard support.
- TOPOLOGY: Linux takes the 4 KiB physical block and the I/O sizes offered.
- MQ: with num-queues=N and N vCPUs Linux makes N hardware queues, one per
  CPU, and I/O submitted from every CPU lands right.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.guest.image import DEFAULT_MODULES, DEFAULT_TOOLS, STORAGE_TOOLS
from vmm_client.qemu.frontend import boot_served_guest
from vmm_client.qemu.launch import GuestResult

pytestmark = pytest.mark.usefixtures("qemu_ready")

IMAGE_SIZE = 128 << 20
MIB = 1 << 20
TOOLS = DEFAULT_TOOLS + STORAGE_TOOLS
MODULES = (*DEFAULT_MODULES, "ext4", "crc32c_generic")


async def boot(
    tmp_path: Path,
    spec: str,
    script: str,
    *,
    extra_qemu_args: tuple[str, ...] = (),
    memory_mode: str = "shared",
) -> GuestResult:
    srv = DevServer([parse_device_spec(spec)], Listen(unix_path=tmp_path / "run" / "blk.sock"))
    await srv.start()
    try:
        return await boot_served_guest(
            srv.address,
            script,
            timeout=600,
            tools=TOOLS,
            modules=MODULES,
            extra_qemu_args=extra_qemu_args,
            memory_mode=memory_mode,
        )
    finally:
        await srv.stop(0)


def value(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key}= not in guest output:\n{output}")


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def sparse_image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    return image


# Both memory modes: the server maps guest RAM ("shared") or asks the bridge
# for every ring and buffer access by DmaRequest ("messages").
@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_fstrim_and_blkdiscard_free_blocks_in_the_image(
    tmp_path: Path, memory_mode: str
) -> None:
    image = sparse_image(tmp_path)
    spec = f"virtio-blk,path={image}"
    written = await boot(
        tmp_path,
        spec,
        """
set -e
echo discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)
echo granularity=$(cat /sys/block/vda/queue/discard_granularity)
mkfs.ext4 -q -F /dev/vda
mkdir -p /mnt/d
mount -t ext4 /dev/vda /mnt/d
dd if=/dev/urandom of=/mnt/d/data bs=1M count=48 2>/dev/null
sync
umount /mnt/d
# Raw data past where ext4 put anything small: the last 8 MiB of the disk.
dd if=/dev/urandom of=/dev/vda bs=1M seek=120 count=8 conv=fsync 2>/dev/null
""",
        memory_mode=memory_mode,
    )
    assert written.exit_status == 0, written.console
    assert int(value(written.output, "discard_max")) > 0
    assert value(written.output, "granularity") == "4096"
    full = allocated(image)
    assert full >= 56 * MIB

    trimmed = await boot(
        tmp_path,
        spec,
        f"""
set -e
mkdir -p /mnt/d
mount -t ext4 /dev/vda /mnt/d
rm /mnt/d/data
sync
fstrim /mnt/d
umount /mnt/d
blkdiscard -o {120 * MIB} -l {8 * MIB} /dev/vda
echo tail=$(dd if=/dev/vda bs=1M skip=120 count=8 2>/dev/null | md5sum | cut -d' ' -f1)
echo zero=$(dd if=/dev/zero bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)
""",
        memory_mode=memory_mode,
    )
    assert trimmed.exit_status == 0, trimmed.console
    after = allocated(image)
    # 48 MiB of file and 8 MiB of raw data went back to the host.
    assert after <= full - 50 * MIB, (full, after)
    # A punched hole reads zeroes (the device offers nothing else for a discard).
    assert value(trimmed.output, "tail") == value(trimmed.output, "zero")


async def test_discard_off_offers_none_and_the_topology(tmp_path: Path) -> None:
    image = sparse_image(tmp_path)
    result = await boot(
        tmp_path,
        f"virtio-blk,path={image},discard=off",
        """
echo discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)
echo zeroes_max=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)
echo physical=$(cat /sys/block/vda/queue/physical_block_size)
echo io_min=$(cat /sys/block/vda/queue/minimum_io_size)
echo io_opt=$(cat /sys/block/vda/queue/optimal_io_size)
""",
    )
    assert result.exit_status == 0, result.console
    assert value(result.output, "discard_max") == "0"
    # VIRTIO_BLK_F_TOPOLOGY: 4 KiB physical blocks, 1 MiB optimal I/O.
    assert value(result.output, "physical") == value(result.output, "io_min") == "4096"
    assert value(result.output, "io_opt") == str(MIB)
    assert int(value(result.output, "zeroes_max")) > 0  # WRITE_ZEROES stays


@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_several_queues_one_per_cpu(tmp_path: Path, memory_mode: str) -> None:
    queues = 4
    image = sparse_image(tmp_path)
    result = await boot(
        tmp_path,
        f"virtio-blk,path={image},num-queues={queues}",
        f"""
set -e
echo cpus=$(grep -c ^processor /proc/cpuinfo)
echo hwqueues=$(ls /sys/block/vda/mq | wc -l)
echo vectors=$(grep -c virtio0-req /proc/interrupts || true)
# One writer pinned to each CPU: its requests go down that CPU's queue.
for cpu in $(seq 0 {queues - 1}); do
    dd if=/dev/urandom of=/tmp/p$cpu bs=64k count=16 2>/dev/null
    taskset -c $cpu dd if=/tmp/p$cpu of=/dev/vda bs=64k seek=$((cpu * 16)) \\
        oflag=direct conv=fsync 2>/dev/null &
done
wait
for cpu in $(seq 0 {queues - 1}); do
    a=$(md5sum < /tmp/p$cpu | cut -d' ' -f1)
    b=$(taskset -c $cpu dd if=/dev/vda bs=64k skip=$((cpu * 16)) count=16 iflag=direct \\
        2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$a" = "$b" ] && echo same$cpu=yes || echo same$cpu=no
done
""",
        extra_qemu_args=("-smp", str(queues)),
        memory_mode=memory_mode,
    )
    assert result.exit_status == 0, result.console
    out = result.output
    assert value(out, "cpus") == str(queues)
    assert value(out, "hwqueues") == str(queues)
    # Each request queue has its own MSI-X vector (virtio0-req.0 .. req.N-1).
    assert value(out, "vectors") == str(queues)
    for cpu in range(queues):
        assert value(out, f"same{cpu}") == "yes"


async def test_cache_none_mkfs_write_and_read_back(tmp_path: Path) -> None:
    """cache=none (O_DIRECT on the host, through the backend's bounce buffer):
    a file system made, written, remounted and read back; raw sector-sized
    direct writes at odd sectors land in the image file."""
    image = sparse_image(tmp_path)
    result = await boot(
        tmp_path,
        f"virtio-blk,path={image},cache=none",
        f"""
set -e
echo write_cache=$(cat /sys/block/vda/queue/write_cache)
mkfs.ext4 -q -F /dev/vda {64 * MIB // 1024}
mkdir -p /mnt/d
mount -t ext4 /dev/vda /mnt/d
dd if=/dev/urandom of=/mnt/d/data bs=1M count=8 2>/dev/null
echo a=$(md5sum < /mnt/d/data | cut -d' ' -f1)
umount /mnt/d
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt/d
echo b=$(md5sum < /mnt/d/data | cut -d' ' -f1)
umount /mnt/d
yes devmodel | head -c 1536 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=512 seek={100 * MIB // 512 + 3} count=3 oflag=direct conv=fsync \\
    2>/dev/null
echo c=$(dd if=/dev/vda bs=512 skip={100 * MIB // 512 + 3} count=3 iflag=direct 2>/dev/null \\
    | md5sum | cut -d' ' -f1)
echo d=$(md5sum < /tmp/p | cut -d' ' -f1)
""",
    )
    assert result.exit_status == 0, result.console
    out = result.output
    # O_DIRECT skips only the host's page cache: writes still need a flush.
    assert value(out, "write_cache") == "write back"
    assert value(out, "a") == value(out, "b")
    assert value(out, "c") == value(out, "d")
    with image.open("rb") as f:
        f.seek(100 * MIB + 3 * 512)
        assert f.read(1536) == (b"devmodel\n" * 200)[:1536]
