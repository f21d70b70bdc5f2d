"""The driver build's logic without a kernel tree: names, cache key, Makefile fix-up, checks.

One test runs the whole of build_driver with a stand-in `make` that drops a
hand-made module where kbuild would, so the cache and its commit point are
covered too; tests/guest/test_driver.py builds and boots the real thing.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import pytest

from devserver.devices import testdev
from tests.guest.elfmaker import make_elf
from vmm_client.guest import driver as drv
from vmm_client.guest.debs import DebCache
from vmm_client.guest.driver import (
    GUEST_MODULE_PATH,
    MODULE_NAME,
    SOURCE_DIR,
    DriverBuildError,
    HeaderPackages,
    build_driver,
    check_module,
    config_value,
    driver_files,
    header_packages,
    insmod_command,
    point_makefile_at,
    source_hash,
)
from vmm_client.qemu.hostutil import HostError

KVER = "6.1.0-56-amd64"
# What Debian's linux-headers-6.1.0-56-amd64 ships as its Makefile.
DEBIAN_MAKEFILE = """\
include /usr/src/linux-headers-6.1.0-56-common/Makefile
override ARCH = x86
override KERNELRELEASE = 6.1.0-56-amd64
CCACHE = ccache
CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-12
"""


def module(vermagic: str = f"{KVER} SMP preempt mod_unload modversions ", **extra: str) -> bytes:
    fields = {"license": "GPL", "vermagic": vermagic, **extra}
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in fields.items())
    return make_elf({".modinfo": info})


def test_header_packages_follow_debians_names() -> None:
    assert header_packages(KVER) == HeaderPackages(
        image="linux-image-6.1.0-56-amd64",
        headers="linux-headers-6.1.0-56-amd64",
        common="linux-headers-6.1.0-56-common",
        kbuild="linux-kbuild-6.1",
    )
    cloud = header_packages("6.12.9-2-cloud-amd64")
    assert cloud.headers == "linux-headers-6.12.9-2-cloud-amd64"
    assert cloud.common == "linux-headers-6.12.9-2-common"
    assert cloud.kbuild == "linux-kbuild-6.12"
    for bad in ("6.1.0", "linux-6.1.0-56-amd64", "6.1.0-56-amd64 ", "6.1.0-56-", ""):
        with pytest.raises(DriverBuildError, match="not a Debian kernel version"):
            header_packages(bad)


def test_the_cache_key_is_the_source(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(SOURCE_DIR, copy)
    assert source_hash(copy) == source_hash(SOURCE_DIR) == source_hash()
    assert re.fullmatch(r"[0-9a-f]{12}", source_hash())
    c = copy / f"{MODULE_NAME}.c"
    c.write_text(c.read_text() + "\n/* changed */\n")
    assert source_hash(copy) != source_hash()
    # The Makefile is for building by hand: not part of what the build uses.
    shutil.copyfile(SOURCE_DIR / f"{MODULE_NAME}.c", c)
    (copy / "Makefile").write_text("# edited\n")
    assert source_hash(copy) == source_hash()
    (copy / "Kbuild").unlink()
    with pytest.raises(DriverBuildError, match="driver source missing"):
        source_hash(copy)


def test_the_headers_makefile_is_pointed_at_the_unpacked_common_tree(tmp_path: Path) -> None:
    src = tmp_path / "headers" / "usr" / "src"
    fixed = point_makefile_at(DEBIAN_MAKEFILE, src)
    assert fixed.splitlines()[0] == f"include {src}/linux-headers-6.1.0-56-common/Makefile"
    assert fixed.splitlines()[1:] == DEBIAN_MAKEFILE.splitlines()[1:]
    assert point_makefile_at(fixed, src) == fixed
    # A cache directory that moved is pointed at its new place.
    moved = tmp_path / "elsewhere"
    assert point_makefile_at(fixed, moved) == point_makefile_at(DEBIAN_MAKEFILE, moved)
    with pytest.raises(DriverBuildError, match="no `include"):
        point_makefile_at("obj-m := x.o\n", src)


def test_config_values() -> None:
    config = (
        "# comment\n"
        'CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"\n'
        "CONFIG_GCC_VERSION=120200\n"
    )
    assert (
        config_value(config, "CONFIG_CC_VERSION_TEXT") == "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
    )
    assert config_value(config, "CONFIG_GCC_VERSION") is None  # not a string
    assert config_value(config, "CONFIG_CC_VERSION") is None


def test_check_module() -> None:
    info = check_module(module(alias="pci:v00001234d00007E57sv*sd*bc*sc*i*"), KVER)
    assert info["alias"].startswith("pci:v00001234d00007E57")
    with pytest.raises(
        DriverBuildError, match=re.escape("vermagic '6.1.0-55-amd64 SMP' is not for")
    ):
        check_module(module("6.1.0-55-amd64 SMP"), KVER)
    with pytest.raises(DriverBuildError, match="vermagic"):
        check_module(module(f"{KVER}x SMP"), KVER)
    with pytest.raises(DriverBuildError, match="license is 'MIT'"):
        check_module(module(license="MIT"), KVER)
    with pytest.raises(DriverBuildError, match="not a kernel module"):
        check_module(make_elf({".text": b"\x90"}), KVER)


def test_guest_files_and_insmod_line(tmp_path: Path) -> None:
    ko = tmp_path / "m.ko"
    ko.write_bytes(b"module bytes")
    assert driver_files(ko) == {"/lib/modules/extra/devmodel_testdev.ko": b"module bytes"}
    assert insmod_command() == f"insmod {GUEST_MODULE_PATH}"
    assert insmod_command({"use_msix": 0}) == f"insmod {GUEST_MODULE_PATH} use_msix=0"


def test_kbuild_builds_the_module() -> None:
    kbuild = (SOURCE_DIR / "Kbuild").read_text()
    assert re.search(rf"^obj-m\s*:=\s*{MODULE_NAME}\.o$", kbuild, re.MULTILINE)


def c_defines() -> dict[str, int]:
    text = (SOURCE_DIR / f"{MODULE_NAME}.c").read_text()
    found = {}
    for name, value in re.findall(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$", text, re.M):
        found[name] = int(value, 0)
    for name, bit in re.findall(r"^#define\s+(\w+)\s+BIT\((\d+)\)\s*$", text, re.M):
        found[name] = 1 << int(bit)
    return found


def test_the_drivers_register_map_is_the_devices() -> None:
    defines = c_defines()
    same = {
        "TESTDEV_VENDOR_ID": testdev.VENDOR_ID,
        "TESTDEV_DEVICE_ID": testdev.DEVICE_ID,
        "TESTDEV_ID_VALUE": testdev.ID_VALUE,
        "TESTDEV_MEM_BAR": testdev.MEM_BAR,
        "RAM_OFFSET": testdev.RAM_OFFSET,
        "RAM_SIZE": testdev.RAM_SIZE,
        "MAX_VECTORS": testdev.MSIX_VECTORS,
    }
    # Every register and DMA constant the device model names, by the same name.
    for name in dir(testdev):
        if name.startswith(("REG_", "DMA_")) and name in defines:
            same[name] = getattr(testdev, name)
    for name in ("REG_ID", "REG_SCRATCH", "REG_DOORBELL", "REG_IRQ_STATUS", "REG_BAR_INDEX"):
        assert name in same
    if hasattr(testdev, "REG_DMA_CMD"):
        for name in ("REG_DMA_CMD", "REG_DMA_STATUS", "DMA_CMD_FROM_GUEST", "DMA_VECTOR"):
            assert name in same, f"the driver has no {name}"
    assert {name: defines.get(name) for name in same} == same


# -- build_driver, with stand-ins for the host's tools and Debian's packages --------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DEVMODEL_CACHE", str(root))
    return root


def executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_cached_module_is_returned_without_building(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_tools() -> tuple[str, str]:
        raise AssertionError("nothing should be built")

    monkeypatch.setattr(drv, "_host_tools", no_tools)
    d = cache / f"guest-{KVER}"
    d.mkdir(parents=True)
    ko = d / f"{MODULE_NAME}-{source_hash()}.ko"
    ko.write_bytes(module())
    # Without its .json (the commit point) a .ko is a leftover, not a cache hit.
    with pytest.raises(AssertionError, match="nothing should be built"):
        build_driver(KVER, log=lambda _: None)
    ko.with_suffix(".json").write_text("{}")
    assert build_driver(KVER, log=lambda _: None) == ko


def test_missing_host_tools_are_named(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drv, "which", lambda name: None if name == "gcc-12" else f"/bin/{name}")
    with pytest.raises(DriverBuildError, match=r"needs gcc-12 on the host.*apt-get install"):
        build_driver(KVER, log=lambda _: None)


def test_unavailable_headers_give_a_clear_error(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drv, "_host_tools", lambda: ("/usr/bin/make", "/usr/bin/gcc-12"))

    def offline(self: object, names: object) -> object:
        raise HostError("apt knows no package linux-headers-6.1.0-999-amd64 (run apt-get update?)")

    monkeypatch.setattr(DebCache, "info", offline)
    monkeypatch.setattr(drv, "is_root", lambda: False)
    with pytest.raises(DriverBuildError) as e:
        build_driver("6.1.0-999-amd64", log=lambda _: None)
    message = str(e.value)
    assert "cannot get Debian's kernel headers for 6.1.0-999-amd64" in message
    assert "linux-headers-6.1.0-999-common" in message and "linux-kbuild-6.1" in message
    assert "apt-get update" in message


def test_build_driver_end_to_end_with_a_stand_in_make(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = tmp_path / "built.ko"
    built.write_bytes(module())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # kbuild leaves the module in the M= directory.
    make = executable(
        bin_dir / "make",
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        f'for a; do case "$a" in M=*) cp {built} "${{a#M=}}/{MODULE_NAME}.ko";; esac; done\n',
    )
    cc = executable(
        bin_dir / "gcc-12", "#!/bin/sh\necho 'gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0'\n"
    )
    monkeypatch.setattr(drv, "_host_tools", lambda: (make, cc))
    monkeypatch.setattr(drv, "which", lambda name: None)  # no strip: the stand-in is no real ELF
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / ".config").write_text(
        'CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"\n'
    )
    monkeypatch.setattr(
        drv, "_headers_tree", lambda kver, d, steps: drv._HeadersTree(tree, "6.1.192-2", "unpacked")
    )
    lines: list[str] = []
    ko = build_driver(KVER, log=lines.append)
    assert ko == cache / f"guest-{KVER}" / f"{MODULE_NAME}-{source_hash()}.ko"
    assert ko.read_bytes() == built.read_bytes()
    meta = json.loads(ko.with_suffix(".json").read_text())
    assert meta["kernel_version"] == KVER and meta["source_hash"] == source_hash()
    assert meta["headers_version"] == "6.1.192-2"
    assert meta["host_compiler"] == meta["kernel_compiler"]
    args = calls.read_text().split()
    assert args[:2] == ["-C", str(tree)] and args[-1] == "modules"
    assert not any("compiler" in line for line in lines)  # the compilers match: no note
    # The scratch build directory is gone; a second call builds nothing.
    assert not any((cache / "tmp").glob("driver-*"))
    assert build_driver(KVER, log=lines.append) == ko
    assert len(calls.read_text().splitlines()) == 1
    # A module for another kernel is refused and does not replace the cached one.
    built.write_bytes(module("6.1.0-55-amd64 SMP"))
    with pytest.raises(DriverBuildError, match="vermagic"):
        build_driver(KVER, force=True, log=lines.append)
    assert check_module(ko.read_bytes(), KVER)
