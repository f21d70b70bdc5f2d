"""Boots the test guest under QEMU TCG and returns what its script printed and its exit status.

The machine is the one of shared/design/qemu-vfio-user.md: q35, TCG, guest RAM
in a shared memfd (so a vfio-user server can map it), no default devices, the
serial port on QEMU's stdout, the kernel booted as an ELF through PVH. Extra
QEMU arguments (the vfio-user devices) are passed through; their servers
must be listening before `boot` is called.

`run_in_guest` is the pytest-facing entry: it provisions QEMU and builds the
guest image when they are not cached yet, then boots.
"""

from __future__ import annotations

import codecs
import io
import os
import selectors
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmm_client.guest.console import (
    BEGIN,
    END,
    MAX_CMDLINE_SCRIPT,
    encode_script,
    new_nonce,
    normalize_console,
    parse_console,
)
from vmm_client.guest.cpio import CpioWriter
from vmm_client.guest.image import (
    DEFAULT_MODULES,
    DEFAULT_TOOLS,
    GuestImage,
    GuestTool,
    build_image,
)
from vmm_client.qemu.provision import QemuTree, provision, qemu_command

__all__ = [
    "GuestError",
    "GuestResult",
    "GuestTimeout",
    "boot",
    "kernel_cmdline",
    "qemu_argv",
    "run_in_guest",
]

BASE_APPEND = ("console=ttyS0", "panic=-1", "iomem=relaxed", "quiet")
# After the exit marker the guest only has to sync and power off.
POWEROFF_GRACE = 15.0


class GuestError(RuntimeError):
    """The guest did not run the script to the end; console and QEMU's stderr are attached."""

    def __init__(self, message: str, console: str, qemu_stderr: str) -> None:
        tail = "\n".join(normalize_console(console).splitlines()[-30:])
        super().__init__(
            f"{message}\n--- last console lines ---\n{tail}\n--- QEMU stderr ---\n"
            f"{qemu_stderr.strip()[-3000:]}"
        )
        self.console = console
        self.qemu_stderr = qemu_stderr


class GuestTimeout(GuestError):
    pass


@dataclass(frozen=True)
class GuestResult:
    output: str  # the script's stdout and stderr, exactly (LF line ends)
    exit_status: int
    boot_seconds: float  # QEMU start to the script starting (begin marker seen)
    total_seconds: float  # QEMU start to QEMU exit
    console: str  # the whole serial console
    qemu_stderr: str
    init_errors: tuple[str, ...]  # e.g. "insmod failed: virtio_net"
    dmesg: str | None  # the kernel log after the script, when asked for
    argv: tuple[str, ...]  # the QEMU command line that ran


def kernel_cmdline(
    nonce: str,
    script_word: str | None,
    *,
    kernel_messages: bool = False,
    dmesg: bool = False,
    extra: str = "",
) -> str:
    words = [*BASE_APPEND, f"devmodel.nonce={nonce}"]
    if script_word is not None:
        words.append(f"devmodel.cmd={script_word}")
    if kernel_messages:
        words.append("devmodel.printk=keep")
    if dmesg:
        words.append("devmodel.dmesg=1")
    if extra:
        words += extra.split()
    return " ".join(words)


def qemu_argv(
    qemu: Sequence[str],
    vmlinux: Path,
    initrd: Path,
    append: str,
    *,
    memory_mb: int = 512,
    extra_qemu_args: Sequence[str] = (),
    reboot: bool = False,
) -> list[str]:
    """The full QEMU command line; qemu is the command prefix (qemu_command(tree)).

    reboot: a guest reboot resets the machine in the same QEMU process (no
    -no-reboot), for tests across reboots (vmm_client.qemu.reboot)."""
    return [
        *qemu,
        "-accel",
        "tcg",
        "-machine",
        "q35,memory-backend=mem",
        "-m",
        f"{memory_mb}M",
        # share=on: a vfio-user server gets guest RAM as fds it can mmap.
        "-object",
        f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-nodefaults",
        "-no-user-config",
        "-serial",
        "stdio",
        "-nographic",
        *([] if reboot else ["-no-reboot"]),
        "-kernel",
        str(vmlinux),
        "-initrd",
        str(initrd),
        "-append",
        append,
        *extra_qemu_args,
    ]


def overlay_cpio(files: Mapping[str, bytes]) -> bytes:
    """An uncompressed newc archive of files (mode 0755), to append to the initrd."""
    out = io.BytesIO()
    w = CpioWriter(out)
    for path, data in sorted(files.items()):
        w.add_file(path, data, 0o755)
    w.close()
    return out.getvalue()


def _initrd_with(base: Path, files: Mapping[str, bytes], directory: Path) -> Path:
    """base plus an appended archive; the kernel unpacks concatenated archives in order."""
    blob = base.read_bytes()
    # Each archive must start 4-byte aligned; the kernel skips the NUL padding.
    blob += b"\0" * (-len(blob) % 4)
    path = directory / "initrd.img"
    path.write_bytes(blob + overlay_cpio(files))
    return path


def boot(
    image: GuestImage,
    qemu: QemuTree | Path | Sequence[str],
    script: str | None = None,
    *,
    extra_qemu_args: Sequence[str] = (),
    extra_files: Mapping[str, bytes] | None = None,
    extra_append: str = "",
    memory_mb: int = 512,
    timeout: float = 120.0,
    kernel_messages: bool = False,
    dmesg: bool = False,
    on_output: Callable[[str], None] | None = None,
    reboot: bool = False,
) -> GuestResult:
    """Boots image under QEMU, runs script (None: `lspci -nn`) in it, and waits for power-off.

    qemu is a tree or a command prefix. extra_files are put into the guest
    (absolute paths, mode 0755) through an archive appended to the initrd.
    on_output gets console text as it arrives (for live logs). reboot lets
    the guest reboot within this QEMU (the script's own business then: see
    vmm_client.qemu.reboot). Raises
    GuestTimeout when the guest is not done within timeout seconds, and
    GuestError when QEMU fails or the guest stops without an exit status.
    """
    prefix = list(qemu) if isinstance(qemu, Sequence) else qemu_command(qemu)
    nonce = new_nonce()
    files = dict(extra_files or {})
    script_word: str | None = None
    if script is not None:
        word = encode_script(script)
        if len(word) <= MAX_CMDLINE_SCRIPT:
            script_word = word
        else:
            files["/devmodel/cmd.sh"] = script.encode()
    append = kernel_cmdline(
        nonce, script_word, kernel_messages=kernel_messages, dmesg=dmesg, extra=extra_append
    )
    with tempfile.TemporaryDirectory(prefix="devmodel-boot-") as tmp:
        initrd = _initrd_with(image.initrd, files, Path(tmp)) if files else image.initrd
        argv = qemu_argv(
            prefix,
            image.vmlinux,
            initrd,
            append,
            memory_mb=memory_mb,
            extra_qemu_args=extra_qemu_args,
            reboot=reboot,
        )
        console, stderr, rc, boot_s, total_s, timed_out = _run(argv, nonce, timeout, on_output)
    parsed = parse_console(console, nonce)
    if parsed.output is not None and parsed.exit_status is not None:
        return GuestResult(
            output=parsed.output,
            exit_status=parsed.exit_status,
            boot_seconds=boot_s if boot_s is not None else total_s,
            total_seconds=total_s,
            console=console,
            qemu_stderr=stderr,
            init_errors=parsed.init_errors,
            dmesg=parsed.dmesg,
            argv=tuple(argv),
        )
    cmd = shlex.join(argv)
    if timed_out:
        raise GuestTimeout(f"guest not done after {timeout:.0f} s: {cmd}", console, stderr)
    if rc != 0:
        raise GuestError(f"QEMU exited with status {rc}: {cmd}", console, stderr)
    raise GuestError(f"the guest stopped without reporting an exit status: {cmd}", console, stderr)


def _run(
    argv: list[str],
    nonce: str,
    timeout: float,
    on_output: Callable[[str], None] | None,
) -> tuple[str, str, int | None, float | None, float, bool]:
    """Runs QEMU, collecting stdout (the serial console) and stderr until it exits or times out."""
    begin = f"{BEGIN} {nonce}".encode()
    # The end marker carries the nonce, so a script cannot start the grace timer early.
    end = f"{END} {nonce}".encode()
    scanned = 0
    # Incremental, so a UTF-8 character split across two reads streams intact.
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out = bytearray()
    err = bytearray()
    t0 = time.monotonic()
    deadline = t0 + timeout
    boot_s: float | None = None
    exit_seen_at: float | None = None
    timed_out = False
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    try:
        while sel.get_map():
            now = time.monotonic()
            limit = deadline
            if exit_seen_at is not None:
                limit = min(limit, exit_seen_at + POWEROFF_GRACE)
            if now >= limit:
                timed_out = exit_seen_at is None
                break
            for key, _ in sel.select(timeout=min(0.5, limit - now)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf: bytearray = key.data
                buf += chunk
                if buf is out:
                    if on_output is not None:
                        on_output(decoder.decode(chunk))
                    # Scan only the new bytes (plus a marker's length of overlap).
                    start = max(0, scanned - len(begin) - len(end))
                    scanned = len(out)
                    if boot_s is None and out.find(begin, start) >= 0:
                        boot_s = time.monotonic() - t0
                    if exit_seen_at is None and boot_s is not None and out.find(end, start) >= 0:
                        exit_seen_at = time.monotonic()
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    total = time.monotonic() - t0
    return (
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        None if timed_out else rc,
        boot_s,
        total,
        timed_out,
    )


def run_in_guest(
    script: str,
    extra_qemu_args: Sequence[str] = (),
    *,
    timeout: float = 120.0,
    tools: Sequence[GuestTool] = DEFAULT_TOOLS,
    modules: Sequence[str] = DEFAULT_MODULES,
    extra_files: Mapping[str, bytes] | None = None,
    extra_append: str = "",
    memory_mb: int = 512,
    kernel_messages: bool = False,
    dmesg: bool = False,
    on_output: Callable[[str], None] | None = None,
    reboot: bool = False,
) -> GuestResult:
    """Runs a shell script in a fresh guest; provisions QEMU and builds the image if not cached.

    Raises vmm_client.qemu.hostutil.NeedsRootError when QEMU is not installed
    and the caller is not root (tests skip on it).
    """
    tree = provision()
    image = build_image(tools=tools, modules=modules)
    return boot(
        image,
        tree,
        script,
        extra_qemu_args=extra_qemu_args,
        extra_files=extra_files,
        extra_append=extra_append,
        memory_mb=memory_mb,
        timeout=timeout,
        kernel_messages=kernel_messages,
        dmesg=dmesg,
        on_output=on_output,
        reboot=reboot,
    )
