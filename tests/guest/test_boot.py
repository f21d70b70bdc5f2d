"""The real thing: provision QEMU (cached), build the guest (cached), boot it under TCG.

The first run installs QEMU into the cache (needs root and Debian's mirror,
about a minute) and builds the image (about 15 s); after that each boot takes
a few seconds. The tests skip only when QEMU is not installed and this is not
root; any other failure is a failure.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vmm_client.guest.console import MAX_CMDLINE_SCRIPT
from vmm_client.guest.image import GuestImage, build_image
from vmm_client.qemu.hostutil import NeedsRootError
from vmm_client.qemu.launch import boot
from vmm_client.qemu.provision import QemuTree, check_qemu, provision


@pytest.fixture(scope="module")
def guest() -> tuple[QemuTree, GuestImage]:
    t0 = time.monotonic()
    try:
        tree = provision()
    except NeedsRootError as e:
        pytest.skip(f"no cached QEMU tree, and installing one needs root: {e}")
    check_qemu(tree)
    image = build_image()
    print(f"QEMU tree and guest image ready after {time.monotonic() - t0:.1f} s")
    return tree, image


def test_lspci_and_uname(guest: tuple[QemuTree, GuestImage]) -> None:
    tree, image = guest
    r = boot(image, tree, "lspci -nn; uname -r")
    print(f"boot: script started after {r.boot_seconds:.1f} s, done after {r.total_seconds:.1f} s")
    assert r.exit_status == 0, r.console
    lines = r.output.splitlines()
    # q35's host bridge and ICH9 LPC are always there.
    assert any("Host bridge [0600]" in line and "[8086:29c0]" in line for line in lines), r.output
    assert any("[8086:2918]" in line for line in lines), r.output
    assert lines[-1] == image.kernel_version
    assert r.init_errors == (), r.console


def test_exit_status_stderr_long_scripts_and_files(
    guest: tuple[QemuTree, GuestImage],
) -> None:
    tree, image = guest
    padding = "# " + "x" * 70 + "\n"
    script = (
        padding * (MAX_CMDLINE_SCRIPT // len(padding) + 1)  # too long for the command line
        + "cat /opt/data.txt\n"
        + "echo to-stderr >&2\n"
        + "for m in virtio_pci virtio_blk virtio_net 9p sd_mod uio_pci_generic; do\n"
        + "  [ -d /sys/module/$m ] || echo missing $m\n"
        + "done\n"
        + "printf 'no newline'\n"
        + "exit 7\n"
    )
    r = boot(image, tree, script, extra_files={"/opt/data.txt": b"file from the host\n"})
    assert r.exit_status == 7, r.console
    assert r.output == "file from the host\nto-stderr\nno newline"


def test_virtio_drivers_bind(guest: tuple[QemuTree, GuestImage], tmp_path: Path) -> None:
    tree, image = guest
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xab" * 512 + bytes(1 << 20))
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("over 9p\n")
    script = (
        "ls /sys/bus/virtio/drivers/virtio_blk/ | grep -c virtio\n"
        "ls /sys/bus/virtio/drivers/virtio_net/ | grep -c virtio\n"
        "head -c 2 /dev/vda | hexdump -C | head -1\n"
        "mount -t 9p -o trans=virtio share /mnt && cat /mnt/hello.txt\n"
    )
    r = boot(
        image,
        tree,
        script,
        extra_qemu_args=[
            "-drive",
            f"file={disk},if=none,id=d0,format=raw",
            "-device",
            "virtio-blk-pci,drive=d0",
            "-device",
            "virtio-net-pci",
            "-fsdev",
            f"local,id=fs0,path={share},security_model=none",
            "-device",
            "virtio-9p-pci,fsdev=fs0,mount_tag=share",
        ],
    )
    assert r.exit_status == 0, r.console
    lines = r.output.splitlines()
    assert lines[:2] == ["1", "1"], r.output
    assert lines[2].startswith("00000000  ab ab"), r.output
    assert lines[3] == "over 9p"


def test_every_tool_set_runs_in_the_guest(guest: tuple[QemuTree, GuestImage]) -> None:
    """The tools device tests ask for (storage, network, benchmarks) build and run."""
    from vmm_client.guest.image import ALL_TOOLS

    tree, _ = guest
    image = build_image(tools=ALL_TOOLS)
    script = (
        "mkfs.ext4 -V 2>&1 | head -1\n"
        "dd if=/dev/zero of=/tmp/fs.img bs=1M count=8 2>/dev/null\n"
        "mkfs.ext4 -q -F /tmp/fs.img && e2fsck -fn /tmp/fs.img >/dev/null && echo fs-ok\n"
        "sg_inq --version 2>&1 | head -1\n"
        "ip -V\n"
        "ip link show lo | head -1\n"
        "fio --version\n"
    )
    r = boot(image, tree, script)
    assert r.exit_status == 0, r.console
    assert "fs-ok" in r.output
    assert "iproute2" in r.output
    assert "lo:" in r.output
    assert "fio-" in r.output
