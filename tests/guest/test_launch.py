"""boot() against a stand-in for QEMU: argv, script transport, parsing, timeouts and failures.

The stand-in is a Python script that reads -append and -initrd like the
guest's /init would and prints the console protocol, so these tests run in
milliseconds and need neither QEMU nor a guest image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vmm_client.guest.console import MAX_CMDLINE_SCRIPT
from vmm_client.guest.cpio import read_cpio
from vmm_client.guest.image import GuestImage
from vmm_client.qemu.launch import GuestError, GuestTimeout, boot, overlay_cpio, qemu_argv

FAKE_QEMU = r"""
import base64, gzip, sys, time
args = sys.argv[1:]
append = args[args.index("-append") + 1]
params = dict(w.split("=", 1) for w in append.split() if "=" in w)
mode = args[args.index("-fake") + 1] if "-fake" in args else "ok"
if mode == "fail":
    print("qemu-system-x86_64: -device nope: 'nope' is not a valid device", file=sys.stderr)
    sys.exit(1)
out = sys.stdout
out.write("SeaBIOS (version 1.17.0)\r\nBooting from ROM..")
if mode == "panic":
    out.write("[    1.0] Kernel panic - not syncing: Attempted to kill init!\r\n")
    sys.exit(0)
if "devmodel.cmd" in params:
    script = base64.b64decode(params["devmodel.cmd"]).decode()
else:
    # The long-script path: find /devmodel/cmd.sh in the appended archive.
    blob = open(args[args.index("-initrd") + 1], "rb").read()
    i = blob.index(b"devmodel/cmd.sh\0")
    if (i - 110) % 4:
        sys.exit("appended archive is not 4-byte aligned")
    start = i + len("devmodel/cmd.sh\0")
    start += -(start - (i - 110)) % 4
    size = int(blob[i - 110 + 54 : i - 110 + 62], 16)
    script = blob[start : start + size].decode()
nonce = params["devmodel.nonce"]
out.write("\r\ndevmodel-init: insmod failed: virtio_net\r\n")
out.write(f"\r\nDEVMODEL-BEGIN {nonce}\r\n")
out.flush()
if mode == "hang":
    time.sleep(60)
text = f"ran {len(script)} bytes: {script[:20]!r}"
out.write(text.replace("\n", "\r\n"))
out.write(f"\r\nDEVMODEL-END {nonce}\r\nDEVMODEL-EXIT=7\r\n")
out.write("[    3.0] reboot: Power down\r\n")
"""


@pytest.fixture
def fake(tmp_path: Path) -> tuple[GuestImage, list[str]]:
    script = tmp_path / "fake_qemu.py"
    script.write_text(FAKE_QEMU)
    image = GuestImage(
        "6.1.0-0-amd64",
        tmp_path / "vmlinux",
        tmp_path / "initrd.gz",
        tmp_path / "image.json",
        ("virtio",),
        (),
    )
    image.initrd.write_bytes(b"\x1f\x8b" + b"g" * 21)  # 23 bytes: the overlay needs padding
    return image, [sys.executable, str(script)]


def test_qemu_argv_matches_the_recipe() -> None:
    argv = qemu_argv(
        ["qemu"], Path("/v"), Path("/i"), "console=ttyS0", extra_qemu_args=["-device", "x"]
    )
    joined = " ".join(argv)
    assert argv[0] == "qemu"
    assert "-accel tcg -machine q35,memory-backend=mem -m 512M" in joined
    assert "-object memory-backend-memfd,id=mem,size=512M,share=on" in joined
    assert "-nodefaults" in argv
    assert "-serial stdio -nographic -no-reboot -kernel /v -initrd /i" in joined
    assert argv[-2:] == ["-device", "x"]
    assert argv[argv.index("-append") + 1] == "console=ttyS0"


def test_boot_parses_output_and_status(fake: tuple[GuestImage, list[str]]) -> None:
    image, qemu = fake
    seen: list[str] = []
    r = boot(image, qemu, "echo hi", on_output=seen.append)
    assert r.output == "ran 7 bytes: 'echo hi'"
    assert r.exit_status == 7
    assert r.init_errors == ("insmod failed: virtio_net",)
    assert 0 < r.boot_seconds <= r.total_seconds
    assert "DEVMODEL-BEGIN" in "".join(seen)
    assert r.argv[: len(qemu)] == tuple(qemu)
    assert r.argv[r.argv.index("-initrd") + 1] == str(image.initrd)  # no overlay needed


def test_long_scripts_and_extra_files_go_in_an_appended_archive(
    fake: tuple[GuestImage, list[str]],
) -> None:
    image, qemu = fake
    script = "echo " + "x" * (MAX_CMDLINE_SCRIPT * 2)
    r = boot(image, qemu, script, extra_files={"/opt/t": b"data"})
    assert r.output.startswith(f"ran {len(script)} bytes: 'echo xxxx")
    append = r.argv[r.argv.index("-append") + 1]
    assert "devmodel.cmd=" not in append


def test_overlay_is_a_plain_cpio_with_executable_files() -> None:
    entries = {e.name: e for e in read_cpio(overlay_cpio({"/devmodel/cmd.sh": b"true"}))}
    assert entries["devmodel/cmd.sh"].data == b"true"
    assert entries["devmodel/cmd.sh"].mode & 0o777 == 0o755
    assert entries["devmodel"].is_dir


def test_timeout_kills_qemu_and_keeps_the_console(fake: tuple[GuestImage, list[str]]) -> None:
    image, qemu = fake
    with pytest.raises(GuestTimeout) as info:
        boot(image, qemu, "sleep 100", extra_qemu_args=["-fake", "hang"], timeout=2)
    assert "DEVMODEL-BEGIN" in info.value.console
    assert "not done after 2 s" in str(info.value)


def test_qemu_failure_and_guest_panic_are_errors(fake: tuple[GuestImage, list[str]]) -> None:
    image, qemu = fake
    with pytest.raises(GuestError, match="QEMU exited with status 1") as info:
        boot(image, qemu, "true", extra_qemu_args=["-fake", "fail"])
    assert "not a valid device" in info.value.qemu_stderr
    with pytest.raises(GuestError, match="without reporting an exit status") as info:
        boot(image, qemu, "true", extra_qemu_args=["-fake", "panic"])
    assert "Kernel panic" in str(info.value)
