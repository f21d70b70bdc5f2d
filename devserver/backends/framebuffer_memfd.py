"""The VESA framebuffer's VRAM as a memfd (ports.SharedFramebuffer).

The server creates the memfd once, at start, maps it, and names it to
frontends as /proc/<our pid>/fd/<fd>: a frontend of the same user opens that
path and maps the same pages (a KVM memslot, or QEMU's BAR mmap through the
vfio-user bridge), so the guest's pixel stores land here with no exit. Every
session's device is built on the same memfd, so a picture survives a
frontend reconnecting.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

from ..config import DeviceSpec, framebuffer_options
from ..effects import SharedMemory


class MemfdFramebuffer:
    """`size` bytes of zeroed, shareable memory."""

    def __init__(self, size: int, name: str = "devmodel-vesa-fb") -> None:
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)
        self._backing = SharedMemory(f"/proc/{os.getpid()}/fd/{self._fd}", 0, size)

    @property
    def backing(self) -> SharedMemory:
        return self._backing

    @property
    def view(self) -> memoryview:
        return self._view

    @property
    def fd(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd < 0:
            return
        self._view.release()
        self._map.close()
        os.close(self._fd)
        self._fd = -1


def open_framebuffers(specs: Sequence[DeviceSpec]) -> dict[int, MemfdFramebuffer]:
    """A memfd per vesa-fb spec, keyed by the spec's index (raises ConfigError
    for a bad vram= before anything is created)."""
    sizes = {
        i: framebuffer_options(spec.options).vram_size
        for i, spec in enumerate(specs)
        if spec.type == "vesa-fb"
    }
    opened: dict[int, MemfdFramebuffer] = {}
    try:
        for i, size in sizes.items():
            opened[i] = MemfdFramebuffer(size, f"devmodel-vesa-fb{i}")
    except BaseException:
        for framebuffer in opened.values():
            framebuffer.close()
        raise
    return opened
