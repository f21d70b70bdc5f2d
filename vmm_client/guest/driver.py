"""Builds devmodel_testdev.ko, the guest's kernel driver for the PCI test device.

The source is vmm_client/guest/driver/ (devmodel_testdev.c and its Kbuild).
It is built out of tree against Debian's headers for the guest kernel, which
come from Debian packages fetched with `apt-get download` and unpacked with
`dpkg -x`, as the image builder does (nothing is installed on the host, and
no root is needed unless apt's lists must be updated):

- linux-headers-<version> (the flavour's .config, Module.symvers, generated
  headers) and linux-headers-<abi>-common (the source headers and the top
  Makefile), from the same source version as the guest's linux-image;
- linux-kbuild-6.1 (fixdep, modpost, objtool, ... built for the host: Debian
  12, like the guest).

The flavour's Makefile includes the common one by its absolute path under
/usr/src; in the unpacked tree that line is pointed at the unpacked copy.
Debian builds the kernel with gcc-12 (the headers' Makefile says CC = gcc-12,
the .config records the exact version), so the host needs gcc-12 and make;
a different gcc-12 build is only noted, since Debian turns the version check
off for out-of-tree modules.

Cache, in the guest's cache directory `<cache root>/guest-<kernel version>/`:
`headers/` (the unpacked packages, reused across driver changes) and
`devmodel_testdev-<hash>.ko` keyed by the driver's source and this recipe,
with a `.json` beside it. A test puts the module into a guest with
`driver_files(ko)` as boot's extra_files and loads it with `insmod_command()`,
so boots without the driver do not carry it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vmm_client.guest.debs import DebCache
from vmm_client.guest.elf import ElfError, modinfo
from vmm_client.guest.image import guest_dir, resolve_kernel_version
from vmm_client.qemu.hostutil import (
    HostError,
    Log,
    Steps,
    cache_root,
    default_log,
    file_lock,
    is_root,
    safe_rmtree,
    tool_env,
    which,
)

__all__ = [
    "GUEST_MODULE_PATH",
    "MODULE_NAME",
    "SOURCE_DIR",
    "DriverBuildError",
    "HeaderPackages",
    "build_driver",
    "check_module",
    "compiler_version_text",
    "driver_files",
    "header_packages",
    "insmod_command",
    "point_makefile_at",
    "source_hash",
]

MODULE_NAME = "devmodel_testdev"
SOURCE_DIR = Path(__file__).resolve().parent / "driver"
SOURCE_FILES = (f"{MODULE_NAME}.c", "Kbuild")
GUEST_MODULE_PATH = f"/lib/modules/extra/{MODULE_NAME}.ko"
DRIVER_FORMAT = 1  # bump when the build recipe changes what a .ko holds
KBUILD_SERIES = "6.1"
COMPILER = "gcc-12"


class DriverBuildError(HostError):
    """The driver cannot be built here; the message says why and what would fix it."""


@dataclass(frozen=True)
class HeaderPackages:
    image: str  # linux-image-6.1.0-56-amd64: its version is the one to match
    headers: str  # linux-headers-6.1.0-56-amd64
    common: str  # linux-headers-6.1.0-56-common
    kbuild: str  # linux-kbuild-6.1

    def build_packages(self) -> tuple[str, str, str]:
        return (self.headers, self.common, self.kbuild)


# 6.1.0-56-amd64, 6.1.0-56-cloud-amd64: upstream version, ABI, flavour.
_KVER_RE = re.compile(r"^((\d+\.\d+)\.\d+-\d+)-([a-z0-9]+(?:-[a-z0-9]+)*)$")


def header_packages(kernel_version: str) -> HeaderPackages:
    """The Debian packages an out-of-tree build for kernel_version (6.1.0-56-amd64) needs."""
    m = _KVER_RE.match(kernel_version)
    if not m:
        raise DriverBuildError(f"not a Debian kernel version: {kernel_version!r}")
    base, series = m[1], m[2]  # 6.1.0-56, 6.1
    return HeaderPackages(
        image=f"linux-image-{kernel_version}",
        headers=f"linux-headers-{kernel_version}",
        common=f"linux-headers-{base}-common",
        kbuild=f"linux-kbuild-{series}",
    )


def source_hash(source_dir: Path = SOURCE_DIR) -> str:
    """The cache key: the driver's source files and the recipe's format."""
    h = hashlib.sha256(f"format {DRIVER_FORMAT}\n".encode())
    for name in SOURCE_FILES:
        try:
            data = (source_dir / name).read_bytes()
        except OSError as e:
            raise DriverBuildError(f"driver source missing: {e}") from e
        h.update(f"{name} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:12]


def driver_files(ko: Path) -> dict[str, bytes]:
    """boot()'s extra_files entry that puts the module into the guest."""
    return {GUEST_MODULE_PATH: ko.read_bytes()}


def insmod_command(params: Mapping[str, str | int] | None = None) -> str:
    """The guest shell line that loads the module put there by driver_files()."""
    words = ["insmod", GUEST_MODULE_PATH]
    words += [f"{k}={v}" for k, v in (params or {}).items()]
    return shlex.join(words)


_INCLUDE_RE = re.compile(r"^include\s+\S*/(linux-headers-[^/\s]+)/Makefile\s*$", re.MULTILINE)


def point_makefile_at(makefile_text: str, src_root: Path) -> str:
    """The flavour Makefile with its `include /usr/src/<common>/Makefile` under src_root.

    Debian's line names /usr/src; after dpkg -x the common tree is elsewhere.
    Idempotent, and repoints a tree whose cache directory moved. Raises when
    there is no such include (a layout we do not know).
    """
    if not _INCLUDE_RE.search(makefile_text):
        raise DriverBuildError(
            "the headers' Makefile has no `include /usr/src/linux-headers-*/Makefile` line"
        )
    return _INCLUDE_RE.sub(lambda m: f"include {src_root}/{m[1]}/Makefile", makefile_text)


def config_value(config_text: str, key: str) -> str | None:
    """A .config string value (CONFIG_CC_VERSION_TEXT="...") without its quotes."""
    m = re.search(rf'^{re.escape(key)}="(.*)"\s*$', config_text, re.MULTILINE)
    return m[1] if m else None


def compiler_version_text(compiler: str) -> str:
    """The first line of `compiler --version`, as Kconfig records it in CONFIG_CC_VERSION_TEXT."""
    try:
        proc = subprocess.run(
            [compiler, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=tool_env(),
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise DriverBuildError(f"cannot run {compiler} --version: {e}") from e
    return proc.stdout.splitlines()[0].strip() if proc.stdout else ""


def check_module(ko: bytes, kernel_version: str) -> dict[str, str]:
    """The module's modinfo (first value per key), after checking it fits kernel_version."""
    try:
        pairs = modinfo(ko)
    except ElfError as e:
        raise DriverBuildError(f"the built module is not a kernel module: {e}") from e
    info: dict[str, str] = {}
    for k, v in pairs:
        info.setdefault(k, v)
    vermagic = info.get("vermagic", "")
    if vermagic.split(" ", 1)[0] != kernel_version:
        raise DriverBuildError(
            f"the built module's vermagic {vermagic!r} is not for {kernel_version}"
        )
    if info.get("license") != "GPL":
        raise DriverBuildError(f"the built module's license is {info.get('license')!r}, not GPL")
    return info


def _cached(directory: Path, h: str) -> Path | None:
    ko = directory / f"{MODULE_NAME}-{h}.ko"
    meta = directory / f"{MODULE_NAME}-{h}.json"
    # The .json is written last: without it the .ko is not trusted.
    return ko if ko.is_file() and meta.is_file() else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_driver(
    kernel_version: str | None = None,
    *,
    force: bool = False,
    log: Log = default_log,
) -> Path:
    """The cached devmodel_testdev.ko for the guest kernel, building it first when absent.

    Raises DriverBuildError when it cannot be built here: no gcc-12 or make
    on the host, or the header packages cannot be fetched (apt does not know
    them and this is not root, so apt-get update cannot run).
    """
    kver = resolve_kernel_version(kernel_version)
    h = source_hash()
    d = guest_dir(kver)
    if not force and (found := _cached(d, h)) is not None:
        return found
    d.mkdir(parents=True, exist_ok=True)
    with file_lock(d / ".driver.lock", log):
        if not force and (found := _cached(d, h)) is not None:
            return found
        log_path = cache_root() / "logs" / f"driver-{kver}.log"
        with Steps("driver", log_path, log) as steps:
            steps.note(f"building {MODULE_NAME}.ko for {kver} (log: {log_path})")
            make, cc = _host_tools()
            tree = _headers_tree(kver, d, steps)
            tmp = cache_root() / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix="driver-", dir=tmp))
            try:
                ko = _build(kver, tree, scratch, d, h, make, cc, steps)
            finally:
                safe_rmtree(scratch)
            steps.note(f"driver ready: {ko} ({ko.stat().st_size / 1e3:.0f} kB)")
    return ko


def _host_tools() -> tuple[str, str]:
    make = which("make")
    cc = which(COMPILER)
    missing = [name for name, path in (("make", make), (COMPILER, cc)) if path is None]
    if missing or make is None or cc is None:
        raise DriverBuildError(
            f"building the guest driver needs {' and '.join(missing)} on the host "
            f"(Debian's kernel is built with {COMPILER}): apt-get install make {COMPILER}"
        )
    return make, cc


@dataclass(frozen=True)
class _HeadersTree:
    path: Path  # the flavour's tree: make -C here
    version: str  # the packages' version, "" for a host-installed tree
    origin: str  # "unpacked" or "host"


def _headers_tree(kver: str, d: Path, steps: Steps) -> _HeadersTree:
    """Debian's headers for kver, unpacked under d/headers (or, failing that, the host's)."""
    pkgs = header_packages(kver)
    root = d / "headers"
    ready = root / ".ready"
    flavour = root / "usr" / "src" / pkgs.headers
    if ready.is_file():
        _repoint(flavour / "Makefile", root)
        return _HeadersTree(flavour, ready.read_text(encoding="utf-8").strip(), "unpacked")
    debs = DebCache(cache_root() / "debs", steps)
    try:
        infos = debs.info([pkgs.image, *pkgs.build_packages()])
        want = infos[pkgs.image].version if pkgs.image in infos else ""
        wrong = [
            f"{n} {infos[n].version}"
            for n in pkgs.build_packages()
            if n in infos and want and infos[n].version != want
        ]
        if wrong:
            raise DriverBuildError(
                f"apt's header packages do not match {pkgs.image} {want}: {', '.join(wrong)}"
            )
        with steps.step(f"apt-get download {' '.join(pkgs.build_packages())}"):
            got = debs.download(list(pkgs.build_packages()))
    except HostError as e:
        host = Path("/usr/src") / pkgs.headers
        if (host / "Makefile").is_file() and (host / "scripts").exists():
            steps.note(f"cannot fetch the header packages ({e}); using the host's {host}")
            return _HeadersTree(host, "", "host")
        hint = "" if is_root() else "; as root this would run apt-get update, or install them"
        raise DriverBuildError(
            f"cannot get Debian's kernel headers for {kver} "
            f"({', '.join(pkgs.build_packages())}): {e}{hint}"
        ) from e
    safe_rmtree(root)
    with steps.step("dpkg -x (headers, common headers, kbuild)"):
        for name in pkgs.build_packages():
            # All into one root: the tree's symlinks (scripts, tools) are relative.
            steps.run(["dpkg", "-x", str(got[name]), str(root)])
        _repoint(flavour / "Makefile", root)
    version = debs.info([pkgs.headers])[pkgs.headers].version
    ready.write_text(version + "\n", encoding="utf-8")
    return _HeadersTree(flavour, version, "unpacked")


def _repoint(makefile: Path, root: Path) -> None:
    try:
        text = makefile.read_text(encoding="utf-8")
    except OSError as e:
        raise DriverBuildError(f"the unpacked headers have no Makefile: {e}") from e
    new = point_makefile_at(text, root / "usr" / "src")
    if new != text:
        makefile.write_text(new, encoding="utf-8")


def _build(
    kver: str,
    tree: _HeadersTree,
    scratch: Path,
    d: Path,
    h: str,
    make: str,
    cc: str,
    steps: Steps,
) -> Path:
    t0 = time.monotonic()
    config = (tree.path / ".config").read_text(encoding="utf-8", errors="replace")
    kernel_cc = config_value(config, "CONFIG_CC_VERSION_TEXT") or "?"
    host_cc = compiler_version_text(cc)
    if host_cc != kernel_cc:
        steps.note(
            f"the kernel was built with {kernel_cc!r}, the host has {host_cc!r}; "
            "building anyway (Debian disables the compiler check for modules)"
        )
    build = scratch / "src"
    build.mkdir()
    for name in SOURCE_FILES:
        shutil.copyfile(SOURCE_DIR / name, build / name)
    with steps.step(f"make -C {tree.path} M={build} modules"):
        steps.run([make, "-C", str(tree.path), f"M={build}", "modules"])
    built = build / f"{MODULE_NAME}.ko"
    if not built.is_file():
        raise DriverBuildError(f"make succeeded but left no {built.name} (log: {steps.log_path})")
    # What `make modules_install INSTALL_MOD_STRIP=1` does: drops the debug
    # info (most of the file), keeps the symbols.
    strip = which("strip")
    if strip is not None:
        steps.run([strip, "--strip-debug", str(built)])
    blob = built.read_bytes()
    info = check_module(blob, kver)
    ko = d / f"{MODULE_NAME}-{h}.ko"
    _write_atomic(ko, blob)
    meta = {
        "format": DRIVER_FORMAT,
        "source_hash": h,
        "kernel_version": kver,
        "vermagic": info.get("vermagic", ""),
        "headers": str(tree.path),
        "headers_origin": tree.origin,
        "headers_version": tree.version,
        "kernel_compiler": kernel_cc,
        "host_compiler": host_cc,
        "bytes": len(blob),
        "build_seconds": round(time.monotonic() - t0, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # The commit point: _cached trusts no .ko without its .json.
    _write_atomic(ko.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
    return ko
