"""The vesa-fb VRAM memfd: a second mapping of its /proc path sees the same bytes."""

from __future__ import annotations

import mmap
import os

import pytest

from devserver.backends.framebuffer_memfd import MemfdFramebuffer, open_framebuffers
from devserver.config import parse_device_spec
from devserver.errors import ConfigError

MIB = 1 << 20


def test_memfd_is_shared_through_its_proc_path() -> None:
    vram = MemfdFramebuffer(MIB)
    try:
        backing = vram.backing
        assert backing.size == MIB
        assert backing.path == f"/proc/{os.getpid()}/fd/{vram.fd}"
        assert len(vram.view) == MIB
        fd = os.open(backing.path, os.O_RDWR)
        try:
            other = mmap.mmap(fd, MIB, mmap.MAP_SHARED)
            other[100:104] = b"ping"
            assert bytes(vram.view[100:104]) == b"ping"
            vram.view[MIB - 4 :] = b"pong"
            assert other[MIB - 4 :] == b"pong"
            other.close()
        finally:
            os.close(fd)
    finally:
        vram.close()
    vram.close()  # twice is fine


def test_open_framebuffers_one_per_vesa_spec() -> None:
    specs = [
        parse_device_spec("pci-testdev"),
        parse_device_spec("vesa-fb,vram=2"),
        parse_device_spec("vesa-fb"),
    ]
    opened = open_framebuffers(specs)
    try:
        assert sorted(opened) == [1, 2]
        assert opened[1].backing.size == 2 * MIB
        assert opened[2].backing.size == 16 * MIB
    finally:
        for vram in opened.values():
            vram.close()


def test_bad_vram_fails_before_creating_anything() -> None:
    with pytest.raises(ConfigError, match="power of two"):
        open_framebuffers([parse_device_spec("vesa-fb,vram=5")])
