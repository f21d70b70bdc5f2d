"""Installs QEMU >= 10.1 (for vfio-user-pci) from Debian trixie-backports into a cached chroot.

Debian 12's own QEMU (7.2) has no vfio-user client, and trixie's 10.0 has none
either; trixie-backports has 11.x. The recipe is shared/design/qemu-vfio-user.md
section 1: debootstrap a minbase trixie, add the backports suite, install
qemu-system-x86 with apt inside the chroot.

Root is needed only to build the tree. QEMU then runs without chroot and
without root through the tree's own dynamic loader (`qemu_command`).

Crash safety: the tree is built in a hidden sibling directory and renamed into
place only after QEMU in it has been run and checked, with a marker file
recording its version, so an interrupted install is never taken for a finished
one. The chroot's bind mounts are always undone before anything else, and no
directory is ever deleted while something is mounted inside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from vmm_client.qemu.hostutil import (
    HostError,
    Log,
    NeedsRootError,
    Steps,
    cache_root,
    default_log,
    dir_size,
    file_lock,
    is_root,
    resolve_in_root,
    safe_rmtree,
    terminate_raises,
    unmount_all_under,
    which,
)

__all__ = [
    "MIN_VERSION",
    "Mirrors",
    "QemuTree",
    "QemuVersion",
    "check_qemu",
    "default_tree_path",
    "host_mirrors",
    "load_tree",
    "parse_qemu_version",
    "provision",
    "qemu_command",
    "qemu_version",
]

SUITE = "trixie"
BACKPORTS = "trixie-backports"
PACKAGE = "qemu-system-x86"
MARKER = ".devmodel-qemu.json"
MARKER_FORMAT = 1
MIN_VERSION = (10, 1)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
# Inside the tree; trixie is merged-/usr, so these are the real locations.
LOADER = "/lib64/ld-linux-x86-64.so.2"
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu")
MODULE_DIR = "/usr/lib/x86_64-linux-gnu/qemu"
DATA_DIRS = ("/usr/share/qemu", "/usr/share/seabios")


class ProvisionError(HostError):
    """Installing or checking the QEMU tree failed."""


@dataclass(frozen=True, order=True)
class QemuVersion:
    major: int
    minor: int
    micro: int
    text: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


@dataclass(frozen=True)
class QemuTree:
    """A finished trixie tree with a checked QEMU in it."""

    path: Path
    version: QemuVersion
    package_version: str

    def command(self) -> list[str]:
        return qemu_command(self.path)


@dataclass(frozen=True)
class Mirrors:
    debian: str
    security: str


def default_tree_path() -> Path:
    return cache_root() / "qemu-trixie"


# -- running QEMU from the tree ---------------------------------------------------


def qemu_command(tree: Path | QemuTree) -> list[str]:
    """argv prefix that runs the tree's QEMU on the host, without chroot or root.

    The tree's own ld.so with --library-path loads trixie's libraries instead
    of the host's older ones; QEMU_MODULE_DIR points module loading at the
    tree (the compiled-in path is the host's); -L adds the firmware and
    option-ROM directories, which QEMU would otherwise look for relative to
    its executable (here: the loader). `env` sets the variable so the list
    is self-contained for subprocess.
    """
    root = tree.path if isinstance(tree, QemuTree) else tree
    root = root.absolute()
    loader = resolve_in_root(root, LOADER)
    libs = ":".join(str(root / d.lstrip("/")) for d in LIB_DIRS)
    argv = [
        which("env") or "/usr/bin/env",
        f"QEMU_MODULE_DIR={root / MODULE_DIR.lstrip('/')}",
        str(loader),
        "--library-path",
        libs,
        str(root / QEMU_BINARY.lstrip("/")),
    ]
    for d in DATA_DIRS:
        argv += ["-L", str(root / d.lstrip("/"))]
    return argv


_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


def parse_qemu_version(text: str) -> QemuVersion:
    m = _VERSION_RE.search(text)
    if m is None:
        raise ProvisionError(f"cannot find a QEMU version in: {text.strip()[:200]!r}")
    first_line = text.strip().splitlines()[0]
    return QemuVersion(int(m[1]), int(m[2]), int(m[3] or 0), first_line)


def _run_qemu(tree: Path | QemuTree, args: list[str], timeout: float = 60) -> str:
    argv = qemu_command(tree) + args
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ProvisionError(f"running QEMU failed: {' '.join(argv)}: {e}") from e
    if proc.returncode != 0:
        raise ProvisionError(
            f"QEMU exited with status {proc.returncode}: {' '.join(argv)}\n"
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc.stdout + proc.stderr


def qemu_version(tree: Path | QemuTree) -> QemuVersion:
    """Runs `qemu-system-x86_64 --version` from the tree."""
    return parse_qemu_version(_run_qemu(tree, ["--version"]))


def check_qemu(tree: Path | QemuTree) -> QemuVersion:
    """Checks the tree's QEMU is new enough and has the vfio-user-pci device; returns its version.

    `-device help` would enumerate (and try to load) every module and hit a
    missing ui-opengl module outside the chroot; asking about the one device
    loads nothing.
    """
    version = qemu_version(tree)
    if (version.major, version.minor) < MIN_VERSION:
        raise ProvisionError(
            f"QEMU {version} is older than {MIN_VERSION[0]}.{MIN_VERSION[1]} and has no vfio-user"
        )
    props = _run_qemu(tree, ["-device", "vfio-user-pci,help"])
    if "socket" not in props:
        raise ProvisionError(f"QEMU {version} has no usable vfio-user-pci device:\n{props}")
    return version


def load_tree(path: Path | None = None) -> QemuTree | None:
    """The finished tree at path (default: the cache's), or None when absent or incomplete.

    Reads only the marker and checks that the binaries it names exist; it does
    not run QEMU (use check_qemu for that).
    """
    path = path or default_tree_path()
    try:
        meta = json.loads((path / MARKER).read_text(encoding="utf-8"))
        if meta.get("format") != MARKER_FORMAT:
            return None
        version = parse_qemu_version(str(meta["qemu_version_text"]))
        package_version = str(meta["package_version"])
    except (OSError, ValueError, KeyError, ProvisionError):
        return None
    if not (path / QEMU_BINARY.lstrip("/")).is_file():
        return None
    if not resolve_in_root(path, LOADER).is_file():
        return None
    return QemuTree(path, version, package_version)


# -- the host's mirror --------------------------------------------------------------


def _uris_from_sources_list(text: str) -> list[str]:
    uris: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = line.split()[1:]
        # Options come in brackets: deb [arch=amd64 signed-by=...] URI suite ...
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if words:
            uris.append(words[0])
    return uris


def _uris_from_deb822(text: str) -> list[str]:
    uris: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        uris += fields.get("uris", "").split()
    return uris


def host_mirrors(etc_apt: Path = Path("/etc/apt")) -> Mirrors:
    """The Debian mirror the host's apt uses (so the chroot goes where the host may go).

    A URI whose path ends in /debian is the archive; one ending in
    /debian-security the security archive. Falls back to deb.debian.org.
    """
    uris: list[str] = []
    with contextlib.suppress(OSError):
        uris += _uris_from_sources_list((etc_apt / "sources.list").read_text(encoding="utf-8"))
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        for f in sorted(d.iterdir()):
            try:
                text = f.read_text(encoding="utf-8")
            except OSError:
                continue
            if f.suffix == ".sources":
                uris += _uris_from_deb822(text)
            elif f.suffix == ".list":
                uris += _uris_from_sources_list(text)
    debian: str | None = None
    security: str | None = None
    for uri in uris:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https"):
            continue
        path = parts.path.rstrip("/")
        if path.endswith("/debian-security") and security is None:
            security = uri.rstrip("/")
        elif path.endswith("/debian") and debian is None:
            debian = uri.rstrip("/")
    if debian is None:
        return Mirrors(DEFAULT_MIRROR, security or DEFAULT_SECURITY)
    if security is None:
        p = urlsplit(debian)
        security = f"{p.scheme}://{p.netloc}/debian-security"
    return Mirrors(debian, security)


def sources_list(mirrors: Mirrors) -> str:
    return (
        f"deb {mirrors.debian} {SUITE} main\n"
        f"deb {mirrors.debian} {SUITE}-updates main\n"
        f"deb {mirrors.security} {SUITE}-security main\n"
        f"deb {mirrors.debian} {BACKPORTS} main\n"
    )


# -- installing -------------------------------------------------------------------


def _ensure_debootstrap(steps: Steps) -> str:
    found = which("debootstrap")
    if found:
        return found
    with steps.step("apt-get install debootstrap (host)"):
        try:
            steps.run(["apt-get", "install", "-y", "debootstrap"])
        except HostError:
            # Stale or missing package lists are the usual cause.
            steps.run(["apt-get", "update"])
            steps.run(["apt-get", "install", "-y", "debootstrap"])
    found = which("debootstrap")
    if not found:
        raise ProvisionError("debootstrap is still missing after installing it")
    return found


def _discard(path: Path, log: Log) -> None:
    """Removes a leftover tree: unmount whatever is left in it first, never delete through."""
    if not path.exists():
        return
    left = unmount_all_under(path, log)
    if left:
        raise ProvisionError(f"cannot remove {path}: still mounted: {', '.join(left)}")
    log(f"[qemu] removing leftover {path}")
    safe_rmtree(path)


def _install_into(partial: Path, steps: Steps, log: Log) -> None:
    debootstrap = _ensure_debootstrap(steps)
    mirrors = host_mirrors()
    steps.note(f"mirror {mirrors.debian}, security {mirrors.security}")
    chroot = which("chroot") or "chroot"
    mount = which("mount") or "mount"
    try:
        with steps.step(f"debootstrap --variant=minbase {SUITE} (~1 min)"):
            extra = ["--include=ca-certificates"] if mirrors.debian.startswith("https:") else []
            steps.run(
                [debootstrap, "--variant=minbase", *extra, SUITE, str(partial), mirrors.debian]
            )
        etc = partial / "etc"
        (etc / "apt" / "sources.list").write_text(sources_list(mirrors), encoding="utf-8")
        # Keep maintainer scripts from starting services inside the chroot.
        policy = partial / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n", encoding="utf-8")
        policy.chmod(0o755)
        if Path("/etc/resolv.conf").is_file():
            # apt inside the chroot resolves the mirror's name with the host's resolver.
            (etc / "resolv.conf").unlink(missing_ok=True)
            shutil.copyfile("/etc/resolv.conf", etc / "resolv.conf")
        steps.run([mount, "-t", "proc", "proc", str(partial / "proc")])
        steps.run([mount, "--bind", "/dev", str(partial / "dev")])
        steps.run([mount, "--bind", "/dev/pts", str(partial / "dev" / "pts")])
        steps.run([mount, "-t", "sysfs", "sys", str(partial / "sys")])
        in_chroot = [chroot, str(partial)]
        with steps.step("apt-get update (in the chroot)"):
            steps.run([*in_chroot, "apt-get", "update"])
        with steps.step(f"apt-get install -t {BACKPORTS} {PACKAGE}"):
            steps.run(
                [
                    *in_chroot,
                    "apt-get",
                    "install",
                    "-y",
                    "--no-install-recommends",
                    "-t",
                    BACKPORTS,
                    PACKAGE,
                ]
            )
        steps.run([*in_chroot, "apt-get", "clean"])
    finally:
        # Before anything else, whether the steps above worked or not:
        # debootstrap itself mounts proc and sys, and a failed step leaves ours.
        left = unmount_all_under(partial, lambda m: log(f"[qemu] {m}"))
        if left:
            log(f"[qemu] WARNING: still mounted in {partial}: {', '.join(left)}; NOT deleting it")


def provision(
    tree: Path | None = None,
    *,
    force: bool = False,
    log: Log = default_log,
) -> QemuTree:
    """Returns the cached QEMU tree, installing it first when absent (needs root then).

    With force, a new tree is built and replaces the old one only when it is
    complete. Raises NeedsRootError when the tree is missing and the caller
    is not root, ProvisionError when installing or checking fails.
    """
    path = (tree or default_tree_path()).absolute()
    existing = load_tree(path)
    if existing is not None and not force:
        return existing
    if not is_root():
        tree_arg = f" --tree {shlex.quote(str(path))}" if tree is not None else ""
        raise NeedsRootError(
            f"no QEMU tree at {path}, and installing it needs root. Run once:\n"
            f"  sudo env DEVMODEL_CACHE={shlex.quote(str(cache_root()))} "
            f"{shlex.quote(sys.executable)} -m vmm_client.qemu provision{tree_arg}"
        )
    lock = path.parent / f".{path.name}.lock"
    with terminate_raises(), file_lock(lock, log):
        existing = load_tree(path)
        if existing is not None and not force:
            return existing  # another process finished it while we waited
        partial = path.parent / f".{path.name}.partial"
        old = path.parent / f".{path.name}.old"
        _discard(partial, log)
        _discard(old, log)
        log_path = cache_root() / "logs" / f"{path.name}.log"
        with Steps("qemu", log_path, log) as steps:
            steps.note(f"installing QEMU from {BACKPORTS} into {path} (log: {log_path})")
            partial.mkdir(parents=True)
            _install_into(partial, steps, log)
            with steps.step("checking QEMU (--version, -device vfio-user-pci,help)"):
                version = check_qemu(partial)
                package_version = _package_version(partial, steps)
            size = dir_size(partial)
            meta = {
                "format": MARKER_FORMAT,
                "qemu_version": str(version),
                "qemu_version_text": version.text,
                "package": PACKAGE,
                "package_version": package_version,
                "suite": BACKPORTS,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "install_seconds": round(steps.total(), 1),
                "disk_bytes": size,
            }
            (partial / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            # The rename is the commit point; the old tree goes only after it.
            if path.exists():
                _discard_mounts_or_fail(path)
                os.rename(path, old)
            os.rename(partial, path)
            _discard(old, log)
            steps.note(
                f"QEMU {version} ({package_version}) ready in {path}: "
                f"{size / 1e6:.0f} MB, {steps.total():.0f} s"
            )
    done = load_tree(path)
    if done is None:
        raise ProvisionError(f"{path} is incomplete right after installing it")
    return done


def _package_version(tree: Path, steps: Steps) -> str:
    # The host's dpkg-query reads the tree's database; no chroot needed.
    admindir = tree / "var" / "lib" / "dpkg"
    argv = ["dpkg-query", f"--admindir={admindir}", "-W", "-f", "${Version}", PACKAGE]
    return steps.capture(argv).strip()


def _discard_mounts_or_fail(path: Path) -> None:
    left = unmount_all_under(path)
    if left:
        raise ProvisionError(f"cannot replace {path}: still mounted: {', '.join(left)}")
