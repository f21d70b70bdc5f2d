"""Linux boot in the KVM frontend: the pure builders (boot.rst / zero-page.rst offsets,
MP spec 1.4 checksums), kernel parsing, the CLI's errors, and the real boot (VMX/SVM only)."""

from __future__ import annotations

import base64
import itertools
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmm_client.guest.console import BEGIN, END
from vmm_client.guest.image import load_image
from vmm_client.kvm import linux
from vmm_client.kvm.linux_boot import _watch_power_down
from vmm_client.kvm.vm import GuestExit, kvm_flavour

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def vmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmm_client", "run", "--no-devserver", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def cached_image() -> tuple[Path, Path]:
    try:
        image = load_image()
    except Exception as e:  # no apt, no cache: nothing to test with
        pytest.skip(f"guest image unavailable: {e}")
    if image is None:
        pytest.skip("guest image not built (vmm_client.guest.image.build_image())")
    return image.vmlinux, image.initrd


def fake_bzimage(version: int = 0x20F, xloadflags: int = 1, setup_sects: int = 4) -> bytes:
    data = bytearray((setup_sects + 1) * 512 + 4096)
    data[0x1F1] = setup_sects
    struct.pack_into("<H", data, 0x1FE, 0xAA55)
    data[0x200:0x202] = b"\xeb\x66"  # jmp: header ends at 0x202 + 0x66
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, version)
    struct.pack_into("<I", data, 0x22C, 0x37FF_FFFF)
    struct.pack_into("<H", data, 0x236, xloadflags)
    struct.pack_into("<I", data, 0x238, 2047)
    struct.pack_into("<I", data, 0x260, 16 * MiB)
    return bytes(data)


# -- zero page


def test_zero_page_offsets() -> None:
    e820 = linux.e820_map(512 * MiB)
    zp = linux.build_zero_page(
        linux.BootParams(
            512 * MiB, 2047, initrd_address=0x1F00_0000, initrd_size=0x12345, e820=e820
        )
    )
    assert len(zp) == 4096
    assert zp[0x1E8] == len(e820)  # e820_entries
    assert zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55  # boot_flag
    assert zp[0x210] == 0xFF  # type_of_loader
    assert zp[0x211] & 0x81 == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<II", zp, 0x218) == (0x1F00_0000, 0x12345)  # ramdisk
    assert struct.unpack_from("<H", zp, 0x224)[0] == 0xFE00  # heap_end_ptr
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x20000  # cmd_line_ptr
    assert struct.unpack_from("<I", zp, 0x238)[0] == 2047  # cmdline_size
    first = struct.unpack_from("<QQI", zp, 0x2D0)
    assert first == (0, 0x9FC00, 1)
    assert zp[:0x40] == bytes(0x40)  # no framebuffer: empty screen_info


def test_bzimage_header_is_copied() -> None:
    image = linux.parse_bzimage(fake_bzimage())
    zp = linux.build_zero_page(linux.BootParams(256 * MiB, 2047, setup_header=image.setup_header))
    assert zp[0x1F1:0x210] == image.setup_header[: 0x210 - 0x1F1]
    assert struct.unpack_from("<I", zp, 0x22C)[0] == 0x37FF_FFFF  # initrd_addr_max kept
    assert zp[0x210] == 0xFF


def test_screen_info_framebuffer() -> None:
    fb = linux.Framebuffer(base=0xE000_0000, width=640, height=480, stride=2560, size=640 * 480 * 4)
    si = linux.screen_info(fb)
    assert si[0x0F] == 0x23
    assert struct.unpack_from("<HHHI", si, 0x12) == (640, 480, 32, 0xE000_0000)
    assert struct.unpack_from("<I", si, 0x1C)[0] == (640 * 480 * 4 + 0xFFFF) >> 16
    assert struct.unpack_from("<H", si, 0x24)[0] == 2560


# -- e820


@pytest.mark.parametrize("ram", [64 * MiB, 512 * MiB, 3 << 30, 8 << 30])
def test_e820_disjoint_and_covers_ram(ram: int) -> None:
    entries = sorted(linux.e820_map(ram))
    for a, b in itertools.pairwise(entries):
        assert a.end <= b.address, (a, b)
    usable = sum(e.size for e in entries if e.kind == linux.E820_RAM)
    assert usable == ram - (linux.HIGH_MEMORY - linux.EBDA_START)  # less the legacy hole
    assert any(e.kind == 2 and e.address == linux.PCI_HOLE_START for e in entries)


# -- MP table


def test_mptable_checksums_and_counts() -> None:
    blob = linux.build_mptable(4)
    assert blob[:4] == b"_MP_" and sum(blob[:16]) % 256 == 0
    assert struct.unpack_from("<I", blob, 4)[0] == linux.MPTABLE_ADDRESS + 16
    table = blob[16:]
    assert table[:4] == b"PCMP"
    length, spec = struct.unpack_from("<HB", table, 4)
    assert spec == 4 and length == len(table)
    assert sum(table) % 256 == 0
    count = struct.unpack_from("<H", table, 34)[0]
    assert count == 4 + 2 + 1 + 16 + 2
    # Processors first, BSP flag only on CPU 0.
    assert table[44] == 0 and table[44 + 3] == 3 and table[64 + 3] == 1


# -- placement


def test_initrd_below_max_and_above_kernel() -> None:
    addr = linux.place_initrd(10 * MiB + 5, 512 * MiB, 80 * MiB, 0x37FF_FFFF)
    assert addr % 4096 == 0 and addr >= 80 * MiB and addr + 10 * MiB + 5 <= 512 * MiB
    low = linux.place_initrd(MiB, 2 << 30, 80 * MiB, 0x37FF_FFFF)
    assert low + MiB <= 0x3800_0000
    with pytest.raises(ValueError, match="use -m"):
        linux.place_initrd(100 * MiB, 128 * MiB, 80 * MiB)


def test_cmdline_limit() -> None:
    assert linux.check_cmdline("a", 1) == b"a\0"
    with pytest.raises(ValueError, match="takes 1"):
        linux.check_cmdline("ab", 1)


# -- parsing


def test_bzimage_parse() -> None:
    image = linux.parse_kernel(fake_bzimage())
    assert image.kind == "bzimage" and image.entry == 0x100200
    assert image.segments[0].address == 0x100000 and len(image.segments[0].data) == 4096
    with pytest.raises(linux.NotAKernel, match=r"2\.06"):
        linux.parse_kernel(fake_bzimage(version=0x205))
    with pytest.raises(linux.NotAKernel, match="XLF_KERNEL_64"):
        linux.parse_kernel(fake_bzimage(xloadflags=0))
    with pytest.raises(linux.NotAKernel):
        linux.parse_kernel(b"#!/bin/sh\n" * 100)


def test_real_vmlinux_parse() -> None:
    vmlinux, _ = cached_image()
    image = linux.parse_kernel(vmlinux.read_bytes())
    assert image.kind == "vmlinux" and image.entry == 0x1000000
    assert image.start == 0x1000000 and image.pvh_entry is not None


def test_real_bzimage_parse() -> None:
    candidates = sorted(Path("/boot").glob("vmlinuz-*")) + sorted(
        (Path.home() / ".cache/devmodel/debs").glob("**/vmlinuz-*")
    )
    if not candidates:
        pytest.skip("no bzImage on this machine (/boot/vmlinuz-* absent)")
    image = linux.parse_kernel(candidates[0].read_bytes())
    assert image.kind == "bzimage" and image.entry == 0x100200 and image.cmdline_size >= 255


# -- CLI


def test_cli_not_a_kernel() -> None:
    result = vmm("--kernel", str(ROOT / "pyproject.toml"), "-m", "512M")
    assert result.returncode == 2
    assert "is not a Linux kernel" in result.stderr and "Traceback" not in result.stderr


def test_cli_ram_too_small(tmp_path: Path) -> None:
    kernel = tmp_path / "bz"
    kernel.write_bytes(fake_bzimage())
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(40 * MiB))
    result = vmm("--kernel", str(kernel), "--initrd", str(initrd), "-m", "32M")
    assert result.returncode == 2
    assert "too small" in result.stderr and "use -m" in result.stderr


@pytest.mark.skipif(kvm_flavour() != "pvm", reason="only kvm_pvm refuses")
def test_cli_pvm_refusal() -> None:
    vmlinux, initrd = cached_image()
    result = vmm("--kernel", str(vmlinux), "--initrd", str(initrd), "-m", "512M")
    assert result.returncode == 3
    assert "stock Linux kernels cannot run under kvm_pvm" in result.stderr


@pytest.mark.kvm
@pytest.mark.skipif(kvm_flavour() != "pvm", reason="the --force attempt is for kvm_pvm")
def test_cli_pvm_force_stops_cleanly() -> None:
    """Not a boot test: --force must end within its timeout and explain where it stopped."""
    vmlinux, initrd = cached_image()
    result = vmm(
        "--kernel",
        str(vmlinux),
        "--initrd",
        str(initrd),
        "-m",
        "512M",
        "--force",
        "--timeout",
        "8",
        timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "guest ended:" in result.stderr and "rip 0x" in result.stderr


def test_power_down_line_ends_the_run() -> None:
    seen: list[bytes] = []
    write = _watch_power_down(seen.append)
    for byte in b"[  1.0] reboot: Power dow":
        write(bytes((byte,)))
    with pytest.raises(GuestExit) as caught:
        write(b"n")
    assert caught.value.reason == "poweroff" and caught.value.status == 0
    assert b"".join(seen).endswith(b"Power down")


@pytest.mark.kvm
def test_boots_guest_image_to_init() -> None:
    """Boot the Debian guest image to its /init markers (frontend-kvm.md §2.3); VMX/SVM only."""
    if kvm_flavour() == "pvm":
        pytest.skip("/dev/kvm is kvm_pvm: stock Linux cannot boot here (needs VMX/SVM KVM)")
    vmlinux, initrd = cached_image()
    nonce = "6b766d"
    script = base64.b64encode(b"echo hello-from-kvm").decode()
    result = vmm(
        "--kernel",
        str(vmlinux),
        "--initrd",
        str(initrd),
        "-m",
        "512M",
        "--timeout",
        "120",
        "--append",
        f"devmodel.nonce={nonce} devmodel.cmd={script}",
        timeout=180,
    )
    print(result.stdout[-3000:], result.stderr)
    assert f"{BEGIN} {nonce}" in result.stdout
    assert "hello-from-kvm" in result.stdout
    assert f"{END} {nonce}" in result.stdout
    assert result.returncode == 0
