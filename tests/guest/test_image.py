"""Guest image pieces that need no download: vmlinux extraction, the ELF reader, the cache key."""

from __future__ import annotations

import gzip
import lzma
import struct
import sys
from pathlib import Path

import pytest

from tests.guest.elfmaker import make_elf
from vmm_client.guest import image as img
from vmm_client.guest.cpio import read_cpio
from vmm_client.guest.elf import ElfError, elf_section, read_elf
from vmm_client.guest.image import GuestTool, ImageError, extract_vmlinux

VMLINUX = make_elf({".text": b"\x90" * 1000})


def bzimage(payload: bytes, *, setup_sects: int = 3, offset: int = 0x40) -> bytes:
    """A bzImage-shaped blob: setup sectors with the boot header, then the payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<I", setup, 0x248, offset)
    # Decompressor code before the payload, with a decoy-free gap.
    return bytes(setup) + b"\x00" * offset + payload + struct.pack("<I", len(VMLINUX))


def xz(data: bytes) -> bytes:
    # The kernel's own settings: crc32 check, x86 BCJ filter.
    return lzma.compress(
        data,
        format=lzma.FORMAT_XZ,
        check=lzma.CHECK_CRC32,
        filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}],
    )


def test_extract_vmlinux_from_the_header_offset() -> None:
    assert extract_vmlinux(bzimage(xz(VMLINUX))) == VMLINUX


def test_extract_vmlinux_falls_back_to_the_magic() -> None:
    blob = bzimage(xz(VMLINUX))
    blob = blob[:0x248] + struct.pack("<I", 7) + blob[0x24C:]  # header points elsewhere
    assert extract_vmlinux(blob) == VMLINUX


def test_extract_vmlinux_errors() -> None:
    with pytest.raises(ImageError, match="no xz payload"):
        extract_vmlinux(bzimage(gzip.compress(VMLINUX)))
    with pytest.raises(ImageError, match="not an ELF"):
        extract_vmlinux(bzimage(xz(b"MZ not elf")))
    with pytest.raises(ImageError, match="does not decompress"):
        extract_vmlinux(bzimage(xz(VMLINUX)[:-40] + b"\xff" * 40))


def test_read_elf_of_a_real_host_program() -> None:
    info = read_elf(Path(sys.executable).resolve().read_bytes())
    assert info.machine == 62
    assert info.interp is not None
    assert info.interp.startswith("/lib")
    assert "libc.so.6" in info.needed or any(n.startswith("libpython") for n in info.needed)


def test_read_elf_errors() -> None:
    with pytest.raises(ElfError, match="not an ELF"):
        read_elf(b"#!/bin/sh\n")
    with pytest.raises(ElfError, match="64-bit"):
        read_elf(b"\x7fELF\x01\x01" + b"\0" * 60)
    assert elf_section(make_elf({".a": b"xy"}), ".a") == b"xy"
    assert elf_section(make_elf({".a": b"xy"}), ".b") is None


def test_the_cache_key_follows_the_spec() -> None:
    tools = img.DEFAULT_TOOLS
    base = img._spec_hash("6.1.0-56-amd64", img.DEFAULT_MODULES, tools)
    assert base == img._spec_hash("6.1.0-56-amd64", img.DEFAULT_MODULES, tools)
    assert base != img._spec_hash("6.1.0-57-amd64", img.DEFAULT_MODULES, tools)
    assert base != img._spec_hash("6.1.0-56-amd64", ["virtio_pci"], tools)
    more = (*tools, GuestTool("e2fsprogs", ("mke2fs",)))
    assert base != img._spec_hash("6.1.0-56-amd64", img.DEFAULT_MODULES, more)


def test_load_image_finds_only_complete_images(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEVMODEL_CACHE", str(tmp_path))
    kver = "6.1.0-99-amd64"
    assert img.load_image(kver) is None
    d = tmp_path / f"guest-{kver}"
    d.mkdir()
    h = img._spec_hash(kver, img.DEFAULT_MODULES, img.DEFAULT_TOOLS)
    (d / "vmlinux").write_bytes(VMLINUX)
    (d / f"initrd-{h}.cpio.gz").write_bytes(b"")
    assert img.load_image(kver) is None  # no manifest: the build did not finish
    (d / f"image-{h}.json").write_text('{"module_order": ["virtio", "virtio_pci"]}')
    found = img.load_image(kver)
    assert found is not None
    assert found.modules == ("virtio", "virtio_pci")
    assert found.initrd == d / f"initrd-{h}.cpio.gz"
    # Without apt's answer, the newest cached kernel is used.
    monkeypatch.setattr(img, "latest_kernel_version", _no_apt)
    monkeypatch.delenv(img.KERNEL_ENV, raising=False)
    assert img.resolve_kernel_version() == kver
    monkeypatch.setenv(img.KERNEL_ENV, "6.1.0-1-amd64")
    assert img.resolve_kernel_version() == "6.1.0-1-amd64"
    assert img.resolve_kernel_version("6.1.0-2-amd64") == "6.1.0-2-amd64"


def _no_apt() -> str:
    raise ImageError("no apt here")


def test_tree_orders_dirs_first_and_real_programs_win() -> None:
    tree = img._Tree()
    tree.file("usr/bin/lspci", b"real", 0o755)
    tree.symlink("sbin/lspci", "/bin/busybox")
    tree.symlink("bin/ls", "/bin/busybox")
    tree.dir("tmp", 0o1777)
    tree.chardev("dev/console", 5, 1)
    tree.remove_program("lspci")
    entries = read_cpio(gzip.decompress(tree.cpio_gz()))
    names = [e.name for e in entries]
    assert names == [
        "bin",
        "bin/ls",
        "dev",
        "dev/console",
        "tmp",
        "usr",
        "usr/bin",
        "usr/bin/lspci",
    ]
    assert entries[4].mode & 0o7777 == 0o1777
    assert tree.cpio_gz() == tree.cpio_gz()  # reproducible, gzip header included


def test_modules_dep_for_busybox_modprobe() -> None:
    from vmm_client.guest.modules import KernelModule

    mods = [
        KernelModule("kernel/virtio_ring.ko", "virtio_ring"),
        KernelModule("kernel/virtio.ko.xz", "virtio", ["virtio_ring"]),
        KernelModule("kernel/virtio_pci.ko", "virtio_pci", ["virtio", "virtio_ring"]),
    ]
    assert img._modules_dep_text(mods).splitlines() == [
        "kernel/virtio_ring.ko:",
        "kernel/virtio.ko: kernel/virtio_ring.ko",
        "kernel/virtio_pci.ko: kernel/virtio.ko kernel/virtio_ring.ko",
    ]
