"""Builds the test guest: Debian 12's kernel as a PVH-bootable vmlinux, and a busybox initramfs.

Recipe: shared/design/qemu-vfio-user.md section 2. Everything comes from
Debian packages fetched on the host with `apt-get download` (nothing is
installed on the host, and no root is needed unless apt's lists must be
updated):

- linux-image-6.1.0-N-amd64 (the newest ABI apt knows): the bzImage's xz
  payload is unpacked into the uncompressed vmlinux ELF, which QEMU boots
  through its PVH entry point; that skips ~5.5 s of xz decompression under
  TCG. Its virtio, 9p, SCSI and uio modules go into the initramfs and /init
  loads them in dependency order (all of them are modules in Debian 12).
- busybox-static for the shell and coreutils, with its applet links.
- Tools (`GuestTool`): lspci from pciutils now; tests can ask for more
  (e2fsprogs, fio, sg3-utils, iproute2, ...). Their shared libraries are
  found from DT_NEEDED and placed in /lib/x86_64-linux-gnu with ld.so at
  /lib64, so the programs run as they do on Debian.

The initramfs is a gzip'd newc cpio written in pure Python (vmm_client.guest.cpio).
/init speaks the marker protocol of vmm_client.guest.console.

Cache: `<cache root>/guest-<kernel version>/` holds vmlinux and one
`initrd-<hash>.cpio.gz` per content spec (kernel, modules, tools, /init), with
an `image-<hash>.json` manifest written last, so a half-built image is never
used. Downloaded .deb files are kept in `<cache root>/debs/`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vmm_client.guest.console import BEGIN, DMESG_BEGIN, DMESG_END, END, EXIT, INIT_ERROR
from vmm_client.guest.cpio import CpioWriter
from vmm_client.guest.debs import DebCache, collect_tool_files
from vmm_client.guest.elf import read_elf
from vmm_client.guest.modules import KernelModule, decompress_module, resolve_modules
from vmm_client.qemu.hostutil import (
    HostError,
    Log,
    Steps,
    cache_root,
    default_log,
    file_lock,
    safe_rmtree,
    tool_env,
)

__all__ = [
    "ALL_TOOLS",
    "BENCH_TOOLS",
    "DEFAULT_MODULES",
    "DEFAULT_TOOLS",
    "DISPLAY_MODULES",
    "NETWORK_TOOLS",
    "STORAGE_TOOLS",
    "GuestImage",
    "GuestTool",
    "ImageError",
    "build_image",
    "extract_vmlinux",
    "latest_kernel_version",
    "load_image",
    "render_init",
]

IMAGE_FORMAT = 1  # bump when the builder changes what goes into an image
KERNEL_SERIES = "6.1.0"
KERNEL_FLAVOUR = "amd64"
KERNEL_ENV = "DEVMODEL_GUEST_KERNEL"
BUSYBOX_PACKAGE = "busybox-static"
GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class GuestTool:
    """A Debian package whose programs go into the guest, with their libraries.

    binaries are program names, looked up in the package's bin and sbin
    directories and installed at the same path; data are absolute paths of
    files needed at run time, looked up in the package and its dependencies.
    Examples: GuestTool("e2fsprogs", ("mke2fs", "e2fsck")),
    GuestTool("fio", ("fio",)), GuestTool("sg3-utils", ("sg_inq", "sg_readcap")),
    GuestTool("iproute2", ("ip",)).
    """

    package: str
    binaries: tuple[str, ...]
    data: tuple[str, ...] = ()


DEFAULT_TOOLS: tuple[GuestTool, ...] = (
    GuestTool("pciutils", ("lspci", "setpci"), ("/usr/share/misc/pci.ids",)),
)

# What device tests add on top, by need; each set costs image size and boot
# time (fio alone brings 79 packages), so a test asks only for what it uses.
STORAGE_TOOLS: tuple[GuestTool, ...] = (
    GuestTool("e2fsprogs", ("mke2fs", "mkfs.ext4", "e2fsck", "fsck.ext4")),
    GuestTool("sg3-utils", ("sg_inq", "sg_readcap", "sg_unmap")),
)
NETWORK_TOOLS: tuple[GuestTool, ...] = (GuestTool("iproute2", ("ip",)),)
BENCH_TOOLS: tuple[GuestTool, ...] = (GuestTool("fio", ("fio",)),)
ALL_TOOLS: tuple[GuestTool, ...] = DEFAULT_TOOLS + STORAGE_TOOLS + NETWORK_TOOLS + BENCH_TOOLS

# Dependencies (virtio, virtio_ring, scsi_common, 9pnet, netfs, fscache,
# t10-pi, ...) are added by resolve_modules.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_scsi",
    "virtio_balloon",
    "9pnet_virtio",
    "9p",
    "scsi_mod",
    "sd_mod",
    "uio",
    "uio_pci_generic",
)
# The vesa-fb's driver (drm/tiny/bochs; drm, drm_kms_helper, ttm and the VRAM
# helpers come as its dependencies); /dev/fb0 is its fbdev emulation.
DISPLAY_MODULES: tuple[str, ...] = ("bochs",)


class ImageError(HostError):
    pass


@dataclass(frozen=True)
class GuestImage:
    kernel_version: str  # e.g. 6.1.0-56-amd64
    vmlinux: Path
    initrd: Path
    manifest: Path
    modules: tuple[str, ...]  # names, in /init's load order
    tools: tuple[GuestTool, ...]


# -- /init --------------------------------------------------------------------------

INIT_TEMPLATE = r"""#!/bin/sh
# /init of the devmodel test guest, generated by vmm_client.guest.image.
# Protocol (markers, command line): vmm_client/guest/console.py.
export PATH=@PATH@ HOME=/root TERM=dumb
# SeaBIOS leaves "Booting from ROM.." without a line end; start a fresh line.
echo
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
nonce=none cmd= printk=quiet want_dmesg=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        devmodel.nonce=*) nonce="${arg#devmodel.nonce=}" ;;
        devmodel.cmd=*) cmd="${arg#devmodel.cmd=}" ;;
        devmodel.printk=*) printk="${arg#devmodel.printk=}" ;;
        devmodel.dmesg=*) want_dmesg="${arg#devmodel.dmesg=}" ;;
    esac
done
kver=$(uname -r)
# name path, in dependency order; a module some earlier load pulled in is skipped.
while read -r name path; do
    [ -n "$name" ] || continue
    [ -d "/sys/module/$name" ] && continue
    insmod "/lib/modules/$kver/$path" || echo "@INIT_ERROR@insmod failed: $name"
done < /etc/devmodel/modules
if [ -n "$cmd" ]; then
    echo "$cmd" | base64 -d > /tmp/devmodel-cmd.sh || echo "@INIT_ERROR@bad devmodel.cmd"
elif [ -f /devmodel/cmd.sh ]; then
    cp /devmodel/cmd.sh /tmp/devmodel-cmd.sh
else
    printf 'lspci -nn\necho DEVMODEL-DEFAULT-OK\n' > /tmp/devmodel-cmd.sh
fi
# Keep kernel messages from interleaving with the script's output.
[ "$printk" = keep ] || dmesg -n 1
cd /root
# A newline first, in case a kernel message left its line open.
printf '\n@BEGIN@ %s\n' "$nonce"
# Sourced after tools.sh: Debian's static busybox prefers its own applets
# to PATH (FEATURE_SH_STANDALONE), so real tools (ip, mke2fs, ...) are
# shell functions that name their full path.
sh -c '. /etc/devmodel/tools.sh; . /tmp/devmodel-cmd.sh' devmodel-script </dev/null 2>&1
status=$?
printf '\n@END@ %s\n' "$nonce"
echo "@EXIT@$status"
if [ "$want_dmesg" = 1 ]; then
    echo "@DMESG_BEGIN@ $nonce"
    dmesg
    printf '\n@DMESG_END@ %s\n' "$nonce"
fi
cd /
sync
poweroff -f
"""


def render_init() -> str:
    text = INIT_TEMPLATE
    for key, value in {
        "PATH": GUEST_PATH,
        "INIT_ERROR": INIT_ERROR,
        "BEGIN": BEGIN,
        "END": END,
        "EXIT": EXIT,
        "DMESG_BEGIN": DMESG_BEGIN,
        "DMESG_END": DMESG_END,
    }.items():
        text = text.replace(f"@{key}@", value)
    return text


# -- kernel -------------------------------------------------------------------------

XZ_MAGIC = b"\xfd7zXZ\0"


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed vmlinux ELF inside an x86 bzImage whose payload is xz.

    The payload starts at (setup_sects + 1) * 512 + payload_offset (boot
    protocol >= 2.08); when the header does not point at xz data, the first xz
    magic is used, which is where it is for Debian's kernels anyway.
    """
    start = -1
    if len(bzimage) > 0x250 and bzimage[0x202:0x206] == b"HdrS":
        setup_sects = bzimage[0x1F1] or 4
        (payload_offset,) = struct.unpack_from("<I", bzimage, 0x248)
        candidate = (setup_sects + 1) * 512 + payload_offset
        if bzimage[candidate : candidate + 6] == XZ_MAGIC:
            start = candidate
    if start < 0:
        start = bzimage.find(XZ_MAGIC)
    if start < 0:
        raise ImageError("no xz payload in the kernel image (CONFIG_KERNEL_XZ is needed)")
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError as e:
        raise ImageError(f"the kernel's xz payload does not decompress: {e}") from e
    if elf[:4] != b"\x7fELF":
        raise ImageError("the kernel's payload is not an ELF file")
    return elf


_ABI_RE = re.compile(rf"^linux-image-({re.escape(KERNEL_SERIES)}-(\d+)-{KERNEL_FLAVOUR})\s")


@functools.cache
def latest_kernel_version() -> str:
    """The newest linux-image-6.1.0-N-amd64 apt knows, as `6.1.0-N-amd64`.

    Cached per process: apt-cache search takes most of a second, and a test
    session boots many guests.
    """
    proc = subprocess.run(
        [
            "apt-cache",
            "search",
            "--names-only",
            rf"^linux-image-{re.escape(KERNEL_SERIES)}-[0-9]+-{KERNEL_FLAVOUR}$",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=tool_env(),
        check=False,
    )
    found = [(int(m[2]), m[1]) for line in proc.stdout.splitlines() if (m := _ABI_RE.match(line))]
    if not found:
        raise ImageError(
            f"apt knows no linux-image-{KERNEL_SERIES}-N-{KERNEL_FLAVOUR} "
            "(not Debian 12, or apt-get update never ran)"
        )
    return max(found)[1]


def _cached_kernel_versions() -> list[str]:
    root = cache_root()
    if not root.is_dir():
        return []
    found: list[tuple[int, str]] = []
    for d in root.iterdir():
        m = re.fullmatch(rf"guest-({re.escape(KERNEL_SERIES)}-(\d+)-{KERNEL_FLAVOUR})", d.name)
        if m and any(d.glob("image-*.json")):
            found.append((int(m[2]), m[1]))
    return [v for _, v in sorted(found, reverse=True)]


def resolve_kernel_version(kernel_version: str | None = None) -> str:
    """Explicit argument, else $DEVMODEL_GUEST_KERNEL, else apt's newest, else the newest cached."""
    if kernel_version:
        return kernel_version
    env = os.environ.get(KERNEL_ENV)
    if env:
        return env
    try:
        return latest_kernel_version()
    except ImageError:
        cached = _cached_kernel_versions()
        if cached:
            return cached[0]
        raise


# -- cache --------------------------------------------------------------------------


def _spec_hash(kernel_version: str, modules: Sequence[str], tools: Sequence[GuestTool]) -> str:
    spec = {
        "format": IMAGE_FORMAT,
        "kernel": kernel_version,
        "modules": list(modules),
        "tools": [asdict(t) for t in tools],
        "init": render_init(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def guest_dir(kernel_version: str) -> Path:
    return cache_root() / f"guest-{kernel_version}"


def load_image(
    kernel_version: str | None = None,
    *,
    modules: Sequence[str] = DEFAULT_MODULES,
    tools: Sequence[GuestTool] = DEFAULT_TOOLS,
) -> GuestImage | None:
    """The cached image for this spec, or None; builds nothing."""
    kver = resolve_kernel_version(kernel_version)
    d = guest_dir(kver)
    h = _spec_hash(kver, modules, tools)
    manifest = d / f"image-{h}.json"
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        order = tuple(str(m) for m in meta["module_order"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    image = GuestImage(
        kver, d / "vmlinux", d / f"initrd-{h}.cpio.gz", manifest, order, tuple(tools)
    )
    if not (image.vmlinux.is_file() and image.initrd.is_file()):
        return None
    return image


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- building -----------------------------------------------------------------------


class _Tree:
    """The initramfs contents before they are written: path -> entry, so later adds override."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, bytes | str | tuple[int, int], int]] = {}

    def dir(self, path: str, mode: int = 0o755) -> None:
        self.entries[path.strip("/")] = ("dir", b"", mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.entries[path.strip("/")] = ("file", data, mode)

    def symlink(self, path: str, target: str) -> None:
        self.entries[path.strip("/")] = ("link", target, 0o777)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.entries[path.strip("/")] = ("chr", (major, minor), mode)

    def remove_program(self, name: str) -> None:
        """Drops busybox applet links called name, so a real program of that name wins on PATH."""
        for path in [p for p, e in self.entries.items() if e[0] == "link"]:
            if path.rsplit("/", 1)[-1] == name:
                del self.entries[path]

    def cpio_gz(self) -> bytes:
        raw = io.BytesIO()
        w = CpioWriter(raw)
        # Sorted paths put every directory before what is in it.
        for path in sorted(self.entries, key=lambda p: p.split("/")):
            kind, payload, mode = self.entries[path]
            if kind == "dir":
                w.add_dir(path, mode)
            elif kind == "file":
                assert isinstance(payload, bytes)
                w.add_file(path, payload, mode)
            elif kind == "link":
                assert isinstance(payload, str)
                w.add_symlink(path, payload)
            else:
                assert isinstance(payload, tuple)
                w.add_char_device(path, payload[0], payload[1], mode)
        w.close()
        # mtime=0 keeps the gzip header (and so the file) reproducible.
        return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def _busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (`bin/ls`, `usr/sbin/...`) from the static busybox itself."""
    try:
        proc = subprocess.run(
            [str(busybox), "--list-full"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise ImageError(f"cannot list busybox applets with {busybox}: {e}") from e
    return [line.strip().lstrip("/") for line in proc.stdout.splitlines() if line.strip()]


def _tools_sh(paths: dict[str, str]) -> str:
    """Shell functions that make a script's bare `ip` run /bin/ip, not busybox's applet."""
    lines = ["# Generated by vmm_client.guest.image: real tools win over busybox applets."]
    for name, path in sorted(paths.items()):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):  # a valid shell function name
            lines.append(f'{name}() {{ {path} "$@"; }}')
    return "\n".join(lines) + "\n"


def _modules_dep_text(mods: Sequence[KernelModule]) -> str:
    """modules.dep for busybox modprobe: transitive deps, the one to load first last (as depmod)."""
    by_name = {m.name: m for m in mods}
    position = {m.name: i for i, m in enumerate(mods)}
    lines = []
    for m in mods:
        closure: set[str] = set()
        stack = list(m.depends)
        while stack:
            n = stack.pop()
            if n in closure or n not in by_name:
                continue
            closure.add(n)
            stack += by_name[n].depends
        deps = sorted(closure, key=lambda n: position[n], reverse=True)
        lines.append(
            f"{_guest_ko(m.path)}:" + "".join(f" {_guest_ko(by_name[n].path)}" for n in deps)
        )
    return "\n".join(lines) + "\n"


def _guest_ko(path: str) -> str:
    # Modules are stored uncompressed in the guest.
    for suffix in (".ko.xz", ".ko.gz", ".ko.zst"):
        if path.endswith(suffix):
            return path[: -len(suffix)] + ".ko"
    return path


def _remove_stale_scratch(tmp: Path, max_age: float = 6 * 3600) -> None:
    """Scratch directories a killed build left behind (a live build's is younger)."""
    for d in tmp.glob("guest-*"):
        try:
            if time.time() - d.stat().st_mtime > max_age:
                safe_rmtree(d)
        except (OSError, HostError):
            continue


def build_image(
    kernel_version: str | None = None,
    *,
    modules: Sequence[str] = DEFAULT_MODULES,
    tools: Sequence[GuestTool] = DEFAULT_TOOLS,
    force: bool = False,
    log: Log = default_log,
) -> GuestImage:
    """Returns the cached guest image for this spec, building it first when absent."""
    kver = resolve_kernel_version(kernel_version)
    if not force:
        found = load_image(kver, modules=modules, tools=tools)
        if found is not None:
            return found
    d = guest_dir(kver)
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".lock", log):
        if not force:
            found = load_image(kver, modules=modules, tools=tools)
            if found is not None:
                return found
        log_path = cache_root() / "logs" / f"guest-{kver}.log"
        with Steps("guest", log_path, log) as steps:
            steps.note(f"building the guest image for {kver} in {d} (log: {log_path})")
            tmp = cache_root() / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            _remove_stale_scratch(tmp)
            scratch = Path(tempfile.mkdtemp(prefix="guest-", dir=tmp))
            try:
                image = _build(kver, d, scratch, modules, tools, steps)
            finally:
                safe_rmtree(scratch)
            steps.note(
                f"guest image ready: {image.vmlinux} ({image.vmlinux.stat().st_size / 1e6:.0f} MB),"
                f" {image.initrd} ({image.initrd.stat().st_size / 1e6:.1f} MB),"
                f" {steps.total():.0f} s"
            )
    return image


def _build(
    kver: str,
    d: Path,
    scratch: Path,
    wanted_modules: Sequence[str],
    tools: Sequence[GuestTool],
    steps: Steps,
) -> GuestImage:
    t0 = time.monotonic()
    debs = DebCache(cache_root() / "debs", steps)
    kernel_pkg = f"linux-image-{kver}"
    with steps.step(f"apt-get download {kernel_pkg} {BUSYBOX_PACKAGE}"):
        got = debs.download([kernel_pkg, BUSYBOX_PACKAGE])
    with steps.step("dpkg -x (kernel, busybox)"):
        kroot = debs.unpack(got[kernel_pkg], scratch / "kernel")
        bbroot = debs.unpack(got[BUSYBOX_PACKAGE], scratch / "busybox")
    vmlinux = d / "vmlinux"
    if not _is_elf(vmlinux):
        with steps.step("extracting vmlinux from the bzImage"):
            elf = extract_vmlinux((kroot / "boot" / f"vmlinuz-{kver}").read_bytes())
            read_elf(elf)  # a sanity check: it parses
            _write_atomic(vmlinux, elf)
            config = kroot / "boot" / f"config-{kver}"
            if config.is_file():
                _write_atomic(d / f"config-{kver}", config.read_bytes())
    bzimage = d / "bzImage"
    if not bzimage.is_file():
        # Kept for frontends that load the 64-bit boot protocol's bzImage (the KVM
        # VMM's --kernel takes either) and for tests of that parser.
        _write_atomic(bzimage, (kroot / "boot" / f"vmlinuz-{kver}").read_bytes())
    moddir = kroot / "lib" / "modules" / kver
    with steps.step("resolving kernel modules"):
        mods = resolve_modules(moddir, wanted_modules)
        steps.note("modules, in load order: " + " ".join(m.name for m in mods))

    tree = _Tree()
    for p in ("dev", "proc", "sys", "run", "mnt", "etc", "etc/devmodel", "devmodel"):
        tree.dir(p)
    tree.dir("tmp", 0o1777)
    tree.dir("root", 0o700)
    # The kernel opens /dev/console for init before /init can mount devtmpfs.
    tree.chardev("dev/console", 5, 1)
    tree.file("init", render_init().encode(), 0o755)
    tree.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.file("etc/group", b"root:x:0:\n")

    busybox = bbroot / "bin" / "busybox"
    tree.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox":
            tree.symlink(applet, "/bin/busybox")

    with steps.step("collecting kernel modules"):
        for m in mods:
            data = decompress_module((moddir / m.path).read_bytes(), m.path)
            tree.file(f"lib/modules/{kver}/{_guest_ko(m.path)}", data)
        tree.file(f"lib/modules/{kver}/modules.dep", _modules_dep_text(mods).encode())
        order = "".join(f"{m.name} {_guest_ko(m.path)}\n" for m in mods)
        tree.file("etc/devmodel/modules", order.encode())

    packages: dict[str, str] = {
        kernel_pkg: debs.info([kernel_pkg])[kernel_pkg].version,
        BUSYBOX_PACKAGE: debs.info([BUSYBOX_PACKAGE])[BUSYBOX_PACKAGE].version,
    }
    tool_paths: dict[str, str] = {}
    for tool in tools:
        with steps.step(
            f"collecting {tool.package} ({', '.join(tool.binaries)}) and its libraries"
        ):
            resolved = collect_tool_files(
                debs, scratch / "pkgs", tool.package, tool.binaries, tool.data
            )
            for guest, host in sorted(resolved.files.items()):
                name = guest.rsplit("/", 1)[-1]
                if name in tool.binaries:
                    tree.remove_program(name)
                    tool_paths[name] = guest
                tree.file(guest, host.read_bytes(), resolved.modes[guest])
            packages.update(resolved.packages)

    h = _spec_hash(kver, wanted_modules, tools)
    initrd = d / f"initrd-{h}.cpio.gz"
    manifest = d / f"image-{h}.json"
    meta = {
        "format": IMAGE_FORMAT,
        "kernel_version": kver,
        "module_order": [m.name for m in mods],
        "tools": [asdict(t) for t in tools],
        "packages": packages,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": 0.0,
        "initrd_bytes": 0,
    }
    # Only the deterministic fields, so the same spec gives the same bytes.
    inside = {k: v for k, v in meta.items() if k not in ("built", "build_seconds", "initrd_bytes")}
    tree.file("etc/devmodel/image.json", json.dumps(inside, indent=2).encode())
    tree.file("etc/devmodel/tools.sh", _tools_sh(tool_paths).encode())
    with steps.step("writing the initramfs (cpio newc, gzip)"):
        blob = tree.cpio_gz()
        _write_atomic(initrd, blob)
    meta["initrd_bytes"] = len(blob)
    meta["build_seconds"] = round(time.monotonic() - t0, 1)
    # The manifest is the commit point: load_image trusts nothing without it.
    _write_atomic(manifest, (json.dumps(meta, indent=2) + "\n").encode())
    return GuestImage(kver, vmlinux, initrd, manifest, tuple(m.name for m in mods), tuple(tools))
