"""Linux boot in the KVM frontend: the pure builders (boot.rst / zero-page.rst offsets,
MP spec 1.4 checksums), kernel parsing, the CLI's errors, and the real boot (VMX/SVM only)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc
from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.client import FrontendOptions, SyncSession
from vmm_client.guest.console import BEGIN, END
from vmm_client.guest.image import load_image
from vmm_client.kvm import firmware, linux
from vmm_client.kvm.linux_boot import _watch_power_down
from vmm_client.kvm.ramlayout import PCI_HOLE_START
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
    # The PCI hole is a gap (Linux puts BARs in the largest gap below 4 GiB, and claims
    # firmware-assigned ones only outside e820 entries): nothing touches [3G, 4G).
    assert not any(e.address < 1 << 32 and e.end > PCI_HOLE_START for e in entries)


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
    vmlinux, _ = cached_image()
    candidates = [vmlinux.parent / "bzImage", *sorted(Path("/boot").glob("vmlinuz-*"))]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        pytest.skip("no bzImage: neither the guest image's nor /boot/vmlinuz-*")
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


def test_e820_gives_the_kernel_all_of_512m() -> None:
    """Why a --force boot printed "Memory: 207552K/523896K available" for -m 512M.

    523896K is all of the RAM the e820 map describes (Linux leaves page 0 out):
    the kernel did see the whole 512 MiB. The first figure is nr_free_pages()
    at mem_init time, and Debian's kernel has CONFIG_DEFERRED_STRUCT_PAGE_INIT=y:
    only the low zones and the first section of the last one are freed to the
    page allocator then; the rest follows in page_alloc_init_late ("node 0
    deferred pages initialised"), which a boot under kvm_pvm never reached.
    """
    usable = [e for e in linux.e820_map(512 * MiB) if e.kind == linux.E820_RAM]
    pages = sum(e.size for e in usable) // 4096 - 1  # less page 0
    assert pages * 4 == 523896  # KiB, as the kernel printed


def test_plan_takes_ram_above_the_hole() -> None:
    from vmm_client.kvm.linux_boot import MAX_MEMORY, plan

    image, _, _ = plan(fake_bzimage(), None, "console=ttyS0", 4 << 30)
    assert image.kind == "bzimage"
    with pytest.raises(ValueError, match=r"use -m 15G or less"):
        plan(fake_bzimage(), None, "console=ttyS0", MAX_MEMORY + (1 << 30))
    with pytest.raises(ValueError, match=r"multiple of 4 KiB"):
        plan(fake_bzimage(), None, "console=ttyS0", (512 << 20) + 1)


# -- the framebuffer firmware sets up (firmware.py) and screen_info


class RecordingSession:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> object:
        self.calls.append(("config", device, offset, size, value))
        return []

    def bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None:
        self.calls.append(("bar", device_id, bar, offset, size, value))

    def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int:
        return 0x41


def fb_topology(vram: int = 16 * MiB) -> pb.Topology:
    return pb.Topology(
        devices=[
            pb.DeviceInfo(device_id=1, bus=0, device=1, vendor_id=0x1234, product_id=0x7E57),
            pb.DeviceInfo(
                device_id=7,
                bus=0,
                device=3,
                vendor_id=firmware.FB_VENDOR,
                product_id=firmware.FB_DEVICE,
                bars=[
                    pb.BarInfo(index=0, size=vram, prefetchable=True, shared_memory=True),
                    pb.BarInfo(index=2, size=0x1000),
                ],
            ),
        ]
    )


def test_firmware_places_the_framebuffer_and_sets_a_mode() -> None:
    session = RecordingSession()
    fb = firmware.setup_framebuffer(session, fb_topology())
    assert fb == linux.Framebuffer(0xE000_0000, 1024, 768, 4096, 16 * MiB)
    assert session.calls[:3] == [
        ("config", 3, 0x10, 4, 0xE000_0000),  # VRAM BAR
        ("config", 3, 0x18, 4, 0xE000_0000 + 16 * MiB),  # registers right after it
        ("config", 3, 0x04, 2, 0x2),  # memory decoding on
    ]
    assert session.calls[3:] == [  # DISPI: XRES, YRES, BPP, ENABLE (LFB)
        ("bar", 7, 2, 0x502, 2, 1024),
        ("bar", 7, 2, 0x504, 2, 768),
        ("bar", 7, 2, 0x506, 2, 32),
        ("bar", 7, 2, 0x508, 2, 0x41),
    ]
    small = firmware.setup_framebuffer(RecordingSession(), fb_topology(1 * MiB))
    assert small is not None and (small.width, small.height) == (512, 384)
    assert firmware.setup_framebuffer(RecordingSession(), pb.Topology()) is None


def test_zero_page_screen_info_for_the_framebuffer() -> None:
    """boot_params.screen_info (include/uapi/linux/screen_info.h) as vesafb reads it."""
    fb = firmware.setup_framebuffer(RecordingSession(), fb_topology())
    zp = linux.build_zero_page(linux.BootParams(512 * MiB, 2047, framebuffer=fb))
    si = zp[:0x40]
    assert si[0x0F] == 0x23  # orig_video_isVGA = VIDEO_TYPE_VLFB
    width, height, depth, base, size_64k = struct.unpack_from("<HHHII", si, 0x12)
    assert (width, height, depth) == (1024, 768, 32)  # lfb_width, lfb_height, lfb_depth
    assert base == 0xE000_0000  # lfb_base
    assert size_64k == 16 * MiB >> 16  # lfb_size, in 64 KiB units for vesafb
    assert struct.unpack_from("<H", si, 0x24)[0] == 4096  # lfb_linelength
    # red, green, blue, rsvd: size and position (XRGB8888)
    assert tuple(si[0x26:0x2E]) == (8, 16, 8, 8, 8, 0, 8, 24)
    assert struct.unpack_from("<I", si, 0x36)[0] == 0  # capabilities: 32-bit base
    assert si[0x3A:0x3E] == bytes(4)  # ext_lfb_base


async def test_firmware_against_a_served_framebuffer(tmp_path: Path) -> None:
    """The same against the server's vesa-fb: its BARs decode where firmware put them
    and it shows the mode (a screendump of the right size)."""
    srv = DevServer(
        [parse_device_spec("vesa-fb,vram=4")], Listen(unix_path=tmp_path / "run" / "dev.sock")
    )
    await srv.start()
    try:

        def boot_firmware() -> tuple[linux.Framebuffer | None, pb.ScreendumpReply]:
            with SyncSession(srv.address, FrontendOptions("fw", shared_memory_bars=True)) as s:
                fb = firmware.setup_framebuffer(s, s.topology)
                # While attached (the server resets devices when their frontend leaves).
                with grpc.insecure_channel(srv.address) as channel:
                    stub = devmodel_pb2_grpc.DeviceModelStub(channel)
                    request = pb.ScreendumpRequest(device_id=s.topology.devices[0].device_id)
                    return fb, stub.Screendump(request, timeout=30)

        fb, picture = await asyncio.to_thread(boot_firmware)
        assert fb == linux.Framebuffer(0xE000_0000, 1024, 768, 4096, 4 * MiB)
        assert (picture.mode.width, picture.mode.height, picture.mode.bpp) == (1024, 768, 32)
    finally:
        await srv.stop(0)


@pytest.mark.kvm
@pytest.mark.skipif(kvm_flavour() != "pvm", reason="the --force attempt is for kvm_pvm")
def test_cli_pvm_force_with_a_devserver(tmp_path: Path) -> None:
    """`run --kernel` attached to a device server with a vesa-fb, 2 vCPUs: firmware sets
    the framebuffer up (its screen_info line), the boot starts and stops cleanly."""
    vmlinux, initrd = cached_image()
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sock = run_dir / "dev.sock"
    devices = ["--device", "pci-testdev", "--device", "vesa-fb,slot=3,vram=4"]
    server = subprocess.Popen(
        [sys.executable, "-m", "devserver", "--listen", f"unix:{sock}", *devices],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, "no devserver"
            time.sleep(0.05)
        boot = ["--kernel", str(vmlinux), "--initrd", str(initrd), "-m", "512M", "--smp", "2"]
        boot += ["--force", "--timeout", "8"]
        result = subprocess.run(
            [sys.executable, "-m", "vmm_client", "run", "--devserver", f"unix:{sock}", *boot],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
    finally:
        server.terminate()
        server.wait(10)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "512 MiB, 2 vCPU(s)" in result.stderr
    assert "framebuffer: 1024x768 32 bpp at 0xe0000000 (screen_info, VIDEO_TYPE_VLFB)" in (
        result.stderr
    )
    assert "guest ended:" in result.stderr


@pytest.mark.slow
@pytest.mark.kvm
@pytest.mark.skipif(kvm_flavour() != "pvm", reason="the --force attempt is for kvm_pvm")
def test_linux_takes_ram_above_4g_under_force() -> None:
    """-m 4G: the kernel reads both RAM ranges from the e820 map and allocates in the
    second memslot (NODE_DATA goes to the top of RAM, above 4 GiB). About a minute of
    emulated boot under kvm_pvm."""
    vmlinux, initrd = cached_image()
    boot = ["--kernel", str(vmlinux), "--initrd", str(initrd), "-m", "4G"]
    # Under the 120 s faulthandler_timeout; the lines come within the first minute.
    result = vmm(*boot, "--force", "--timeout", "100", timeout=115)
    assert "BIOS-e820: [mem 0x0000000100000000-0x000000013fffffff] usable" in result.stdout
    assert "BIOS-e820: [mem 0x0000000000100000-0x00000000bfffffff] usable" in result.stdout
    assert "Normal   [mem 0x0000000100000000-0x000000013fffffff]" in result.stdout
