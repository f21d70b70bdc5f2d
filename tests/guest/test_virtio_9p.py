"""Linux's 9p file system (9pnet_virtio, 9P2000.L) on our virtio-9p device
(virtio 1.2 §5.11): QEMU + vfio-user bridge + device server exporting a host
directory. The guest mounts it, lists it, reads a host file, writes one the
host then reads, makes, renames and removes, and tries to escape: a symlink
to / it makes, and one the host planted pointing outside; neither shows the
host's files (the server never follows a symlink; the guest follows them in
its own namespace).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.qemu.frontend import boot_served_guest
from vmm_client.qemu.launch import GuestResult

pytestmark = pytest.mark.usefixtures("qemu_ready")

SECRET = "host-secret-7c1e"

SCRIPT = """
set -e
mkdir -p /mnt/share
mount -t 9p -o trans=virtio,version=9p2000.L hostshare /mnt/share
echo ls=$(ls /mnt/share | sort | tr '\\n' ' ')
echo cat=$(cat /mnt/share/hello.txt)
echo "written by the guest" > /mnt/share/fromguest.txt
mkdir /mnt/share/made
echo moveme > /mnt/share/made/a.txt
mv /mnt/share/made/a.txt /mnt/share/made/b.txt
echo moved=$(cat /mnt/share/made/b.txt)
echo scratch > /mnt/share/scratch.txt
rm /mnt/share/scratch.txt
mkdir /mnt/share/gone
rmdir /mnt/share/gone
dd if=/dev/zero of=/mnt/share/big bs=65536 count=16 2>/dev/null
echo big=$(wc -c < /mnt/share/big)
ln -s / /mnt/share/x
echo link=$(readlink /mnt/share/x)
set +e
echo escape1=$(cat /mnt/share/x/etc/hostname 2>/dev/null | head -c 200)
echo escape2=$(cat /mnt/share/out 2>/dev/null | head -c 200)
echo escape3=$(cat /mnt/share/../secret.txt 2>/dev/null | head -c 200)
echo escape4=$(cat /mnt/share/x{secret} 2>/dev/null | head -c 200)
sync
umount /mnt/share
echo done=1
"""


def value(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key}= not in guest output:\n{output}")


async def boot(tmp_path: Path, export: Path, script: str, memory_mode: str) -> GuestResult:
    srv = DevServer(
        [parse_device_spec(f"virtio-9p,path={export},tag=hostshare")],
        Listen(unix_path=tmp_path / "run" / "9p.sock"),
    )
    await srv.start()
    try:
        return await boot_served_guest(
            srv.address,
            script,
            timeout=300 if memory_mode != "messages" else 900,  # a round trip per ring access
            memory_mode=memory_mode,
        )
    finally:
        await srv.stop(0)


@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_mount_read_write_and_no_escape(tmp_path: Path, memory_mode: str) -> None:
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    export = tmp_path / "export"
    export.mkdir()
    (export / "hello.txt").write_text("hello from the host\n")
    (export / "out").symlink_to("../secret.txt")
    # escape4: the host file by its host path, through the guest's link to /.
    script = SCRIPT.replace("{secret}", str(tmp_path / "secret.txt"))
    result = await boot(tmp_path, export, script, memory_mode)
    out = result.output
    assert result.exit_status == 0, result.console
    assert value(out, "ls").split() == ["hello.txt", "out"]
    assert value(out, "cat") == "hello from the host"
    assert value(out, "moved") == "moveme"
    assert value(out, "big") == str(16 * 65536)
    assert value(out, "link") == "/"
    assert value(out, "done") == "1"
    assert (export / "fromguest.txt").read_text() == "written by the guest\n"
    assert (export / "made" / "b.txt").read_text() == "moveme\n"
    assert not (export / "made" / "a.txt").exists()
    assert not (export / "scratch.txt").exists() and not (export / "gone").exists()
    assert (export / "x").is_symlink()
    # Whatever the guest's own files show through its links, never the host's.
    for key in ("escape1", "escape2", "escape3", "escape4"):
        assert SECRET not in value(out, key)
    assert value(out, "escape2") == value(out, "escape4") == ""
