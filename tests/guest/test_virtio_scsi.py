"""Linux's virtio_scsi + sd drivers on our virtio-scsi device (virtio 1.2 §5.6):
QEMU + vfio-user bridge + device server. One device with a writable disk, one
with `readonly=on`: the guest finds both as /dev/sdX (target scan, INQUIRY,
READ CAPACITY, MODE SENSE), sg_inq reads our INQUIRY and VPD pages, raw
sectors, UNMAP and an ext4 filesystem round-trip, and the read-only disk is seen
write-protected and keeps its bytes even when the guest forces a write.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.guest.image import DEFAULT_MODULES, DEFAULT_TOOLS, STORAGE_TOOLS, GuestTool
from vmm_client.qemu.frontend import boot_served_guest

RW_SIZE = 64 << 20
RO_SIZE = 16 << 20
# STORAGE_TOOLS' e2fsprogs, and sg3-utils with sg_raw: a raw CDB straight to
# the device (SG_IO), past the block layer's own read-only check.
TOOLS = (
    *DEFAULT_TOOLS,
    *(t for t in STORAGE_TOOLS if t.package != "sg3-utils"),
    GuestTool("sg3-utils", ("sg_inq", "sg_readcap", "sg_raw")),
)
# ext4 is a module in Debian's kernel and needs the crc32c crypto provider.
MODULES = (*DEFAULT_MODULES, "ext4", "crc32c_generic")
PATTERN_SECTOR = 2048

pytestmark = pytest.mark.usefixtures("qemu_ready")

SCRIPT = f"""
set -e
for i in $(seq 1 150); do
    [ -e /sys/block/sda ] && [ -e /sys/block/sdb ] && break
    sleep 0.2
done
RW=; RO=
for d in /sys/block/sd*; do
    n=$(basename $d)
    case $(cat $d/size) in
        {RW_SIZE // 512}) RW=$n ;;
        {RO_SIZE // 512}) RO=$n ;;
    esac
done
echo rw=$RW ro=$RO
echo rw_ro=$(cat /sys/block/$RW/ro) ro_ro=$(cat /sys/block/$RO/ro)
sg_inq /dev/$RW | grep -i 'vendor identification' | sed 's/.*: */vendor=/'
echo serial=$(sg_inq -p 0x80 /dev/$RW | sed -n 's/.*[Uu]nit serial number: *//p')
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=64 2>/dev/null
dd if=/tmp/pattern of=/dev/$RW bs=512 seek={PATTERN_SECTOR} conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/$RW of=/tmp/back bs=512 skip={PATTERN_SECTOR} count=512 2>/dev/null
echo pattern=$(md5sum < /tmp/pattern | cut -d' ' -f1)
echo back=$(md5sum < /tmp/back | cut -d' ' -f1)
# UNMAP (thin provisioning): the range reads zeroes afterwards.
echo provisioning=$(cat /sys/block/$RW/device/scsi_disk/*/provisioning_mode)
blkdiscard -o {PATTERN_SECTOR * 512} -l 262144 /dev/$RW
dd if=/dev/$RW bs=512 skip={PATTERN_SECTOR} count=512 2>/dev/null > /tmp/gone
echo discarded=$(md5sum < /tmp/gone | cut -d' ' -f1)
echo zeroes=$(dd if=/dev/zero bs=512 count=512 2>/dev/null | md5sum | cut -d' ' -f1)
mkfs.ext4 -q -F /dev/$RW
mkdir -p /mnt/d
mount -t ext4 /dev/$RW /mnt/d
dd if=/dev/urandom of=/mnt/d/file bs=4096 count=256 2>/dev/null
sync
echo file=$(md5sum < /mnt/d/file | cut -d' ' -f1)
umount /mnt/d
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/$RW /mnt/d
echo again=$(md5sum < /mnt/d/file | cut -d' ' -f1)
umount /mnt/d
if dd if=/dev/zero of=/dev/$RO bs=512 count=1 conv=fsync 2>/dev/null; then
    echo ro_write=ok
else
    echo ro_write=refused
fi
# Past the block layer's check: the device itself must refuse (DATA PROTECT),
# and an opcode it does not know is ILLEGAL REQUEST.
sg_raw -R -s 512 -i /dev/zero /dev/$RO 2a 00 00 00 00 00 00 00 01 00 > /tmp/forced 2>&1 || true
grep -q -i 'data protect' /tmp/forced && echo forced=refused || cat /tmp/forced
sg_raw -R /dev/$RW c1 00 00 00 00 00 > /tmp/odd 2>&1 || true
grep -q -i 'illegal request' /tmp/odd && echo unknown=illegal || cat /tmp/odd
echo done=1
"""


def value(output: str, key: str) -> str:
    for line in output.splitlines():
        for word in line.split():
            if word.startswith(key + "="):
                return word.split("=", 1)[1].strip()
    raise AssertionError(f"{key}= not in guest output:\n{output}")


@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_disks_filesystem_and_readonly(tmp_path: Path, memory_mode: str) -> None:
    rw = tmp_path / "rw.img"
    with rw.open("wb") as f:
        f.truncate(RW_SIZE)
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"\xa5" * RO_SIZE)
    ro_sum = hashlib.sha256(ro.read_bytes()).hexdigest()
    srv = DevServer(
        [
            parse_device_spec(f"virtio-scsi,disk={rw}"),
            parse_device_spec(f"virtio-scsi,disk={ro},readonly=on"),
        ],
        Listen(unix_path=tmp_path / "run" / "scsi.sock"),
    )
    await srv.start()
    try:
        result = await boot_served_guest(
            srv.address,
            SCRIPT,
            timeout=300 if memory_mode != "messages" else 900,
            tools=TOOLS,
            modules=MODULES,
            memory_mode=memory_mode,
        )
    finally:
        await srv.stop(0)
    out = result.output
    assert result.exit_status == 0, result.console
    assert value(out, "rw").startswith("sd") and value(out, "ro").startswith("sd")
    assert value(out, "rw_ro") == "0"
    assert value(out, "ro_ro") == "1"  # MODE SENSE's write-protect bit
    assert value(out, "vendor") == "DEVMODEL"
    assert value(out, "serial").startswith("DM")
    assert value(out, "pattern") == value(out, "back")
    assert value(out, "provisioning") == "unmap"
    assert value(out, "discarded") == value(out, "zeroes")
    assert value(out, "file") == value(out, "again")
    assert value(out, "ro_write") == "refused"
    assert value(out, "forced") == "refused"
    assert value(out, "unknown") == "illegal"
    assert value(out, "done") == "1"
    assert hashlib.sha256(ro.read_bytes()).hexdigest() == ro_sum
