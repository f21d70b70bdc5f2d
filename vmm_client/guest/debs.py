"""Debian packages for the guest: fetched with apt-get download, unpacked with dpkg -x.

Nothing is installed on the host: the .deb files are kept in a cache
directory and unpacked into scratch directories, one per package, so a file's
origin stays known. Tools (lspci and friends) are collected with the shared
libraries they need, found by reading DT_NEEDED from the unpacked ELF files;
the packages holding those libraries are found by walking the tool package's
Depends breadth-first, one level at a time, until every library and data
file is found, so only what is needed is downloaded.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmm_client.guest.elf import ElfError, read_elf
from vmm_client.qemu.hostutil import HostError, Steps, is_root, resolve_in_root, tool_env

__all__ = [
    "BIN_DIRS",
    "LIB_DIRS",
    "DebCache",
    "PackageInfo",
    "ResolvedFiles",
    "collect_tool_files",
    "parse_control_stanzas",
]

# Where a package keeps programs and libraries (bookworm packages are not
# all merged-/usr yet, so both halves are searched).
BIN_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin")
LIB_DIRS = (
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
)
GUEST_LIB_DIR = "/lib/x86_64-linux-gnu"
MAX_DEPTH = 8


@dataclass(frozen=True)
class PackageInfo:
    name: str
    version: str
    architecture: str
    depends: tuple[str, ...]  # first alternative of each Depends/Pre-Depends entry
    section: str = ""

    @property
    def is_library(self) -> bool:
        return self.section.rsplit("/", 1)[-1] in ("libs", "oldlibs")


_DEP_NAME = re.compile(r"^\s*([a-z0-9][a-z0-9+.-]*)")


def _first_alternatives(field_value: str) -> list[str]:
    names: list[str] = []
    for entry in field_value.split(","):
        first = entry.split("|")[0]
        m = _DEP_NAME.match(first)
        if m:
            names.append(m[1])  # ":any" and "(>= v)" are dropped by the regex
    return names


def parse_control_stanzas(text: str) -> dict[str, PackageInfo]:
    """`apt-cache show` output -> {package: info}; the first stanza of a package wins."""
    out: dict[str, PackageInfo] = {}
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        name = fields.get("Package")
        if not name or name in out:
            continue
        deps = _first_alternatives(fields.get("Pre-Depends", ""))
        deps += _first_alternatives(fields.get("Depends", ""))
        out[name] = PackageInfo(
            name=name,
            version=fields.get("Version", ""),
            architecture=fields.get("Architecture", ""),
            depends=tuple(dict.fromkeys(deps)),
            section=fields.get("Section", ""),
        )
    return out


class DebCache:
    """Downloads .deb files into one directory and unpacks them on demand."""

    def __init__(self, directory: Path, steps: Steps) -> None:
        self.dir = directory
        self.steps = steps
        self._info: dict[str, PackageInfo | None] = {}
        self._updated = False
        directory.mkdir(parents=True, exist_ok=True)

    def info(self, names: Iterable[str]) -> dict[str, PackageInfo]:
        """Candidate versions; names apt does not know as real packages (virtual) are left out."""
        want = [n for n in dict.fromkeys(names) if n not in self._info]
        if want:
            proc = subprocess.run(
                ["apt-cache", "show", "--no-all-versions", *want],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=tool_env(),
                check=False,
            )
            # Exit status 100 when some name is virtual; the stanzas found are still printed.
            found = parse_control_stanzas(proc.stdout)
            for n in want:
                self._info[n] = found.get(n)
        return {n: i for n in names if (i := self._info.get(n)) is not None}

    def path_for(self, info: PackageInfo) -> Path:
        # apt-get download's naming: name_version_arch.deb with ':' as %3a.
        version = info.version.replace(":", "%3a")
        return self.dir / f"{info.name}_{version}_{info.architecture}.deb"

    def download(self, names: Sequence[str]) -> dict[str, Path]:
        infos = self.info(names)
        unknown = [n for n in names if n not in infos]
        if unknown:
            raise HostError(f"apt knows no package {', '.join(unknown)} (run apt-get update?)")
        missing = [infos[n] for n in names if not self.path_for(infos[n]).is_file()]
        if missing:
            argv = ["apt-get", "download"]
            if is_root():
                # apt drops to the _apt user to download, which cannot write a
                # root-owned cache; downloading as root is what it falls back to anyway.
                argv += ["-o", "APT::Sandbox::User=root"]
            argv += [f"{i.name}={i.version}" for i in missing]
            try:
                self.steps.run(argv, cwd=self.dir)
            except HostError:
                if not is_root() or self._updated:
                    raise
                # The lists may name a version the mirror no longer has.
                self._updated = True
                self.steps.run(["apt-get", "update"])
                self._info.clear()
                return self.download(names)
        out: dict[str, Path] = {}
        for n in names:
            p = self.path_for(infos[n])
            if not p.is_file():
                raise HostError(f"apt-get download did not produce {p}")
            out[n] = p
        return out

    def unpack(self, deb: Path, dest: Path) -> Path:
        """dpkg -x deb dest (once; dest is reused when it exists)."""
        done = dest / ".unpacked"
        if not done.exists():
            dest.mkdir(parents=True, exist_ok=True)
            self.steps.run(["dpkg", "-x", str(deb), str(dest)])
            done.touch()
        return dest


@dataclass
class ResolvedFiles:
    """Guest path -> host file to copy, its mode, and the package versions used."""

    files: dict[str, Path] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)  # name -> version used


def _find_binary(root: Path, name: str) -> tuple[str, Path] | None:
    for d in BIN_DIRS:
        guest = f"/{d}/{name}"
        host = resolve_in_root(root, guest)
        if host.is_file():
            return guest, host
    return None


def _find_library(roots: Iterable[Path], soname: str, dirs: Iterable[str]) -> Path | None:
    for root in roots:
        for d in dirs:
            host = resolve_in_root(root, f"{d}/{soname}")
            if host.is_file():
                return host
    return None


def _origin(host: Path, roots: Iterable[Path]) -> str:
    """The directory of host as the guest sees it (what $ORIGIN expands to)."""
    for root in roots:
        if host.is_relative_to(root):
            return "/" + str(host.parent.relative_to(root))
    return "/"


def _elf_or_none(path: Path) -> bytes | None:
    with path.open("rb") as f:
        if f.read(4) != b"\x7fELF":
            return None
    return path.read_bytes()


def collect_tool_files(
    cache: DebCache,
    scratch: Path,
    package: str,
    binaries: Sequence[str],
    data: Sequence[str] = (),
) -> ResolvedFiles:
    """Files for the guest: the binaries from package, their libraries and interpreter, data files.

    Binaries are given by name and searched in the package's bin directories;
    libraries are placed in /lib/x86_64-linux-gnu of the guest (a system
    search directory of Debian's ld.so, so no ld.so.cache is needed); data
    files keep their paths.
    """
    out = ResolvedFiles()
    roots: dict[str, Path] = {}

    def fetch(names: Sequence[str]) -> None:
        debs = cache.download(names)
        for n, deb in debs.items():
            info = cache.info([n])[n]
            roots[n] = cache.unpack(deb, scratch / f"{n}_{info.version.replace(':', '%3a')}")
            out.packages[n] = info.version

    fetch([package])
    pending_elves: list[Path] = []
    for name in binaries:
        found = _find_binary(roots[package], name)
        if found is None:
            raise HostError(f"package {package} has no program {name!r} in {', '.join(BIN_DIRS)}")
        guest, host = found
        out.files[guest] = host
        out.modes[guest] = 0o755
        pending_elves.append(host)
    wanted_libs: set[str] = set()
    wanted_interp: set[str] = set()
    seen_elves: set[Path] = set()
    wanted_data = list(data)
    # Standard directories, then DT_RUNPATH ones (e.g. fio's librados looks in
    # .../ceph); in the guest every library lands in a standard directory.
    search_dirs: dict[str, None] = {f"/{d}": None for d in LIB_DIRS}
    depth = 0
    while True:
        # Close over DT_NEEDED with what is unpacked so far.
        progress = True
        while progress:
            progress = False
            while pending_elves:
                host = pending_elves.pop()
                if host in seen_elves:
                    continue
                seen_elves.add(host)
                blob = _elf_or_none(host)
                if blob is None:
                    continue  # a script: nothing to resolve
                try:
                    info = read_elf(blob)
                except ElfError as e:
                    raise HostError(f"{host}: {e}") from e
                wanted_libs.update(info.needed)
                for d in info.runpath:
                    origin = _origin(host, roots.values())
                    expanded = d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
                    search_dirs.setdefault(os.path.normpath(expanded), None)
                if info.interp:
                    wanted_interp.add(info.interp)
            for soname in sorted(wanted_libs):
                guest = f"{GUEST_LIB_DIR}/{soname}"
                if guest in out.files:
                    continue
                lib = _find_library(roots.values(), soname, search_dirs)
                if lib is not None:
                    out.files[guest] = lib
                    out.modes[guest] = 0o755
                    pending_elves.append(lib)
                    progress = True
        for interp in sorted(wanted_interp):
            if interp in out.files:
                continue
            for root in roots.values():
                host = resolve_in_root(root, interp)
                if host.is_file():
                    out.files[interp] = host
                    out.modes[interp] = 0o755
                    break
        for path in wanted_data:
            if path in out.files:
                continue
            for root in roots.values():
                host = resolve_in_root(root, path)
                if host.is_file():
                    out.files[path] = host
                    out.modes[path] = 0o644
                    break
        unresolved = [s for s in sorted(wanted_libs) if f"{GUEST_LIB_DIR}/{s}" not in out.files]
        unresolved += [p for p in sorted(wanted_interp) + wanted_data if p not in out.files]
        if not unresolved:
            return out
        depth += 1
        frontier = sorted({d for n in list(roots) for d in cache.info([n])[n].depends} - set(roots))
        # Virtual names (no candidate of their own) cannot be downloaded.
        infos = cache.info(frontier)
        frontier = [n for n in frontier if n in infos]
        # Libraries live in library packages: try those first, so a tool's
        # perl or python3 dependency is not fetched only to look for a .so.
        if not any(p in wanted_data for p in unresolved):
            libs = [n for n in frontier if infos[n].is_library]
            frontier = libs or frontier
        if depth > MAX_DEPTH or not frontier:
            raise HostError(
                f"{package}: cannot find {', '.join(unresolved)} in its dependencies "
                f"({', '.join(sorted(roots))})"
            )
        fetch(frontier)
