"""Kernel module selection: modules.dep parsing, dependency closure and load order."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from tests.guest.elfmaker import make_module
from vmm_client.guest.elf import ElfError, modinfo
from vmm_client.guest.modules import (
    ModuleError,
    decompress_module,
    load_order,
    module_name,
    parse_modules_dep,
    read_module,
    resolve_modules,
)

# The shape of 6.1's virtio/scsi part of modules.dep (depmod lists a module's
# transitive deps, the one to load first last).
FAKE_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/block/t10-pi.ko.xz: kernel/lib/crc-t10dif.ko
kernel/lib/crc-t10dif.ko:
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/block/t10-pi.ko.xz \
kernel/drivers/scsi/scsi_common.ko kernel/lib/crc-t10dif.ko
"""


def before(order: list[str], a: str, b: str) -> bool:
    names = [module_name(p) for p in order]
    return names.index(a) < names.index(b)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("kernel/fs/9p/9p.ko", "9p"),
        ("kernel/block/t10-pi.ko.xz", "t10_pi"),
        ("crc-t10dif.ko.zst", "crc_t10dif"),
        ("x/virtio_blk.ko.gz", "virtio_blk"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


def test_module_name_rejects_other_files() -> None:
    with pytest.raises(ModuleError):
        module_name("modules.dep")


def test_parse_modules_dep_handles_empty_deps() -> None:
    deps = parse_modules_dep(FAKE_DEP.replace("\\\n", ""))
    assert deps["kernel/drivers/virtio/virtio_ring.ko"] == []
    assert deps["kernel/drivers/scsi/scsi_mod.ko"] == ["kernel/drivers/scsi/scsi_common.ko"]
    assert len(deps) == 10


def test_parse_modules_dep_rejects_lines_without_colon() -> None:
    with pytest.raises(ModuleError, match="line 2"):
        parse_modules_dep("a.ko:\nb.ko c.ko\n")


def test_load_order_puts_every_dependency_first() -> None:
    deps = parse_modules_dep(FAKE_DEP.replace("\\\n", ""))
    order = load_order(deps, ["virtio_pci", "virtio_blk", "sd_mod"])
    names = [module_name(p) for p in order]
    assert names == [
        "virtio_pci_modern_dev",
        "virtio_ring",
        "virtio",
        "virtio_pci",
        "virtio_blk",
        "scsi_common",
        "scsi_mod",
        "crc_t10dif",
        "t10_pi",
        "sd_mod",
    ]
    for path in order:
        for dep in deps[path]:
            assert before(order, module_name(dep), module_name(path))


def test_load_order_is_the_same_whatever_the_listing_order() -> None:
    deps = parse_modules_dep(FAKE_DEP.replace("\\\n", ""))
    reversed_deps = {k: list(reversed(v)) for k, v in reversed(list(deps.items()))}
    order = load_order(reversed_deps, ["sd_mod"])
    for path in order:
        for dep in deps[path]:
            assert before(order, module_name(dep), module_name(path))
    assert load_order(deps, ["sd_mod"]) == load_order(deps, ["sd_mod"])


def test_load_order_matches_dashes_and_underscores_and_skips_builtins() -> None:
    deps = parse_modules_dep(FAKE_DEP.replace("\\\n", ""))
    order = load_order(deps, ["t10_pi", "scsi-mod"], builtin=["crc_t10dif", "scsi-common"])
    assert [module_name(p) for p in order] == ["t10_pi", "scsi_mod"]


def test_load_order_reports_missing_modules_and_cycles() -> None:
    deps = parse_modules_dep(FAKE_DEP.replace("\\\n", ""))
    with pytest.raises(ModuleError, match="nope"):
        load_order(deps, ["virtio", "nope"])
    with pytest.raises(ModuleError, match=r"cycle: a\.ko -> b\.ko -> a\.ko"):
        load_order({"a.ko": ["b.ko"], "b.ko": ["a.ko"]}, ["a"])
    with pytest.raises(ModuleError, match=r"not in modules\.dep"):
        load_order({"a.ko": ["gone.ko"]}, ["a"])


def test_resolve_modules_uses_modules_dep_when_present(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(FAKE_DEP.replace("\\\n", ""))
    (tmp_path / "modules.builtin").write_text("kernel/lib/crc-t10dif.ko\n")
    mods = resolve_modules(tmp_path, ["sd_mod"])
    assert [m.name for m in mods] == ["scsi_common", "scsi_mod", "t10_pi", "sd_mod"]
    assert mods[-1].depends == ["scsi_mod", "t10_pi", "scsi_common"]


def write_module(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(data) if rel.endswith(".xz") else data)


def test_resolve_modules_from_modinfo_with_softdeps(tmp_path: Path) -> None:
    # Debian's package has no modules.dep: deps come from .modinfo.
    write_module(tmp_path, "kernel/drivers/scsi/sd_mod.ko", make_module(["scsi_mod", "t10-pi"]))
    write_module(tmp_path, "kernel/drivers/scsi/scsi_mod.ko", make_module(["scsi_common"]))
    write_module(tmp_path, "kernel/drivers/scsi/scsi_common.ko", make_module())
    write_module(tmp_path, "kernel/block/t10-pi.ko.xz", make_module(["crc-t10dif"]))
    write_module(
        tmp_path,
        "kernel/lib/crc-t10dif.ko",
        make_module(["crct10dif_common"], softdep="pre: crct10dif post: nothing"),
    )
    write_module(tmp_path, "kernel/crypto/crct10dif_common.ko", make_module())
    # Two providers of the algorithm: the generic one is preferred.
    write_module(
        tmp_path,
        "kernel/crypto/crct10dif_generic.ko",
        make_module(["crct10dif_common"], aliases=["crypto-crct10dif", "crct10dif"]),
    )
    write_module(tmp_path, "kernel/crypto/crct10dif_zz_fast.ko", make_module(aliases=["crct10dif"]))
    (tmp_path / "modules.builtin").write_text("kernel/drivers/scsi/scsi_common.ko\n")
    mods = resolve_modules(tmp_path, ["sd_mod"])
    names = [m.name for m in mods]
    assert names == [
        "scsi_mod",
        "crct10dif_common",
        "crct10dif_generic",
        "crc_t10dif",
        "t10_pi",
        "sd_mod",
    ]
    by_name = {m.name: m for m in mods}
    assert by_name["crc_t10dif"].depends == ["crct10dif_common", "crct10dif_generic"]
    assert by_name["t10_pi"].path == "kernel/block/t10-pi.ko.xz"


def test_resolve_modules_reports_what_is_missing(tmp_path: Path) -> None:
    write_module(tmp_path, "kernel/a.ko", make_module(["b"]))
    with pytest.raises(ModuleError, match="needs b"):
        resolve_modules(tmp_path, ["a"])
    with pytest.raises(ModuleError, match="zzz"):
        resolve_modules(tmp_path, ["zzz"])


def test_read_module_and_decompression() -> None:
    ko = make_module(
        ["virtio", "virtio_ring"], softdep="pre: crc32c post: x", aliases=["virtio:d*"]
    )
    mod = read_module(decompress_module(lzma.compress(ko), "m.ko.xz"), "kernel/m.ko.xz")
    assert mod.name == "m"
    assert mod.depends == ["virtio", "virtio_ring"]
    assert mod.softdeps_pre == ["crc32c"]
    assert mod.aliases == ["virtio:d*"]
    with pytest.raises(ModuleError, match="zstd"):
        decompress_module(b"", "m.ko.zst")
    with pytest.raises(ModuleError):
        read_module(b"not elf", "x.ko")


def test_modinfo_needs_the_section() -> None:
    from tests.guest.elfmaker import make_elf

    with pytest.raises(ElfError, match="modinfo"):
        modinfo(make_elf({".text": b"\x90"}))
