"""Shared-memory BARs (a vesa-fb's VRAM) QEMU may map instead of forwarding accesses.

When the device server is on this host, the topology names the file behind
such a BAR (BarInfo.backing, /proc/<server pid>/fd/<n>). The bridge opens it,
offers the region with VFIO_REGION_INFO_FLAG_MMAP and passes the fd with the
GET_REGION_INFO reply (SCM_RIGHTS). QEMU maps it into the guest's BAR, so
pixel stores land in the server's memory with no message at all; QEMU's own
region accesses still come as REGION_READ/WRITE and are forwarded like any
BAR's. A BAR the bridge cannot open or that is not whole pages is served by
messages instead.
"""

from __future__ import annotations

import logging
import os

from devmodel.v1 import devmodel_pb2 as pb

from .protocol import PAGE_SIZE, REGION_BAR5

log = logging.getLogger(__name__)


def open_shared_bars(info: pb.DeviceInfo) -> dict[int, int]:
    """An fd per BAR of `info` backed by shared memory we can open and that
    is large enough; a BAR we cannot map is served by messages (logged)."""
    fds: dict[int, int] = {}
    for bar in info.bars:
        if not bar.HasField("backing") or not 0 <= bar.index <= REGION_BAR5:
            continue
        backing = bar.backing
        try:
            fd = os.open(backing.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            log.warning(
                "%s BAR%d: cannot open %s (%s); not mmappable",
                info.name,
                bar.index,
                backing.path,
                e,
            )
            continue
        try:
            size = os.fstat(fd).st_size
        except OSError:
            size = -1
        if (
            backing.size != bar.size
            or bar.size % PAGE_SIZE
            or backing.file_offset != 0  # the region's mmap offset is 0
            or (size < backing.file_offset + backing.size)
        ):
            log.warning(
                "%s BAR%d: %s does not hold [%#x +%#x); not mmappable",
                info.name,
                bar.index,
                backing.path,
                backing.file_offset,
                backing.size,
            )
            os.close(fd)
            continue
        fds[bar.index] = fd
    return fds
