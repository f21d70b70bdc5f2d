"""Package metadata parsing and the tool collector (DT_NEEDED closure over a fake apt)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from tests.guest.elfmaker import make_elf
from vmm_client.guest.debs import DebCache, PackageInfo, collect_tool_files, parse_control_stanzas
from vmm_client.qemu.hostutil import HostError, Steps

APT_SHOW = """\
Package: libpci3
Version: 1:3.9.0-4
Architecture: amd64
Depends: libc6 (>= 2.34), libudev1 (>= 196), zlib1g (>= 1:1.1.4),
 pci.ids (>= 0.0~2019.11.10-2)
Description: PCI utilities (shared library)

Package: foo
Version: 2.0
Architecture: all
Pre-Depends: dpkg (>= 1.15)
Depends: python3:any, mawk | awk, libc6 (>= 2.34)

Package: foo
Version: 1.0
Architecture: all
"""


def test_parse_control_stanzas() -> None:
    info = parse_control_stanzas(APT_SHOW)
    assert info["libpci3"] == PackageInfo(
        "libpci3", "1:3.9.0-4", "amd64", ("libc6", "libudev1", "zlib1g", "pci.ids")
    )
    # Pre-Depends first, ":any" dropped, the first alternative taken, first stanza wins.
    assert info["foo"].depends == ("dpkg", "python3", "mawk", "libc6")
    assert info["foo"].version == "2.0"


class FakeApt(DebCache):
    """A DebCache whose packages are directories made by the test."""

    def __init__(self, root: Path, packages: dict[str, tuple[tuple[str, ...], dict[str, bytes]]]):
        self.root = root
        self.packages = packages
        self.downloads: list[list[str]] = []

    def info(self, names: Iterable[str]) -> dict[str, PackageInfo]:
        return {
            n: PackageInfo(n, "1:1.0", "amd64", self.packages[n][0])
            for n in names
            if n in self.packages
        }

    def download(self, names: Sequence[str]) -> dict[str, Path]:
        self.downloads.append(sorted(names))
        return {n: self.root / f"{n}.deb" for n in names}

    def unpack(self, deb: Path, dest: Path) -> Path:
        name = deb.name.removesuffix(".deb")
        for rel, content in self.packages[name][1].items():
            path = dest / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if content.startswith(b"->"):
                os.symlink(content[2:].decode(), path)
            else:
                path.write_bytes(content)
        return dest


LD = "/lib64/ld-linux-x86-64.so.2"


def fake_world(tmp_path: Path) -> FakeApt:
    return FakeApt(
        tmp_path,
        {
            "pciutils": (
                ("libc6", "libpci3", "some-virtual"),
                {
                    "usr/bin/lspci": make_elf(interp=LD, needed=["libpci.so.3", "libc.so.6"]),
                    "usr/sbin/helper.sh": b"#!/bin/sh\necho hi\n",
                },
            ),
            "libpci3": (
                ("libc6", "zlib1g", "pci.ids"),
                {
                    "usr/lib/x86_64-linux-gnu/libpci.so.3": b"->libpci.so.3.9.0",
                    "usr/lib/x86_64-linux-gnu/libpci.so.3.9.0": make_elf(
                        needed=["libz.so.1", "libc.so.6"], soname="libpci.so.3"
                    ),
                },
            ),
            "libc6": (
                ("libgcc-s1",),
                {
                    "lib/x86_64-linux-gnu/libc.so.6": make_elf(needed=["ld-linux-x86-64.so.2"]),
                    "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": make_elf(),
                    # Absolute inside the package: must not resolve to the host's file.
                    "lib64/ld-linux-x86-64.so.2": b"->/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                },
            ),
            "zlib1g": (("libc6",), {"lib/x86_64-linux-gnu/libz.so.1": make_elf()}),
            "pci.ids": ((), {"usr/share/misc/pci.ids": b"8086  Intel Corporation\n"}),
            "libgcc-s1": (("gcc-12-base",), {"lib/x86_64-linux-gnu/libgcc_s.so.1": make_elf()}),
            "gcc-12-base": ((), {}),
        },
    )


def test_collects_binaries_libraries_interpreter_and_data(tmp_path: Path) -> None:
    apt = fake_world(tmp_path)
    got = collect_tool_files(
        apt, tmp_path / "x", "pciutils", ["lspci", "helper.sh"], ["/usr/share/misc/pci.ids"]
    )
    assert sorted(got.files) == [
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libpci.so.3",
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/lib64/ld-linux-x86-64.so.2",
        "/usr/bin/lspci",
        "/usr/sbin/helper.sh",
        "/usr/share/misc/pci.ids",
    ]
    # The soname link was followed to the real file inside the package.
    assert got.files["/lib/x86_64-linux-gnu/libpci.so.3"].name == "libpci.so.3.9.0"
    assert str(got.files["/lib64/ld-linux-x86-64.so.2"]).startswith(str(tmp_path))
    assert got.modes["/usr/bin/lspci"] == 0o755
    assert got.modes["/usr/share/misc/pci.ids"] == 0o644
    # Breadth-first, level by level, stopping once everything is found:
    # gcc-12-base (a level further) was never fetched; the virtual name never asked for.
    assert apt.downloads == [
        ["pciutils"],
        ["libc6", "libpci3"],
        ["libgcc-s1", "pci.ids", "zlib1g"],
    ]
    assert got.packages["libpci3"] == "1:1.0"


def test_missing_program_or_library_is_reported(tmp_path: Path) -> None:
    apt = fake_world(tmp_path)
    with pytest.raises(HostError, match="no program 'setpci'"):
        collect_tool_files(apt, tmp_path / "a", "pciutils", ["setpci"])
    apt.packages["zlib1g"] = (("libc6",), {})
    with pytest.raises(HostError, match=r"cannot find libz\.so\.1"):
        collect_tool_files(apt, tmp_path / "b", "pciutils", ["lspci"])


def test_deb_file_name_matches_apt_get_download(tmp_path: Path) -> None:
    with Steps("t", tmp_path / "log", lambda s: None) as steps:
        cache = DebCache(tmp_path / "debs", steps)
        info = PackageInfo("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64", ())
        assert cache.path_for(info).name == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
