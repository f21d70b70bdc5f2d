"""One device of the device server's topology as the bridge serves it to QEMU."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from devmodel.v1 import devmodel_pb2 as pb

from .protocol import REGION_ROM, BarLayout, DeviceLayout

if TYPE_CHECKING:
    from .handler import DeviceHandler

SAFE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(eq=False)
class Device:
    """One device of the topology: its layout, its socket, its current connection."""

    info: pb.DeviceInfo
    layout: DeviceLayout
    socket_path: Path
    intx_level: bool = False  # the line as the server last reported it
    msix_table: tuple[int, int] | None = None  # (BAR, offset), found on first use
    msix_table_known: bool = False
    handler: DeviceHandler | None = None
    # Region index -> an fd of the shared memory behind it (a vesa-fb's VRAM),
    # handed to the client with GET_REGION_INFO so guest accesses never leave
    # QEMU. The bridge opens and closes them.
    mmap_fds: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name


def device_layout(info: pb.DeviceInfo, mappable: frozenset[int] = frozenset()) -> DeviceLayout:
    """The regions QEMU sees; BARs in `mappable` (we hold an fd of their
    shared memory) are offered for mmap."""
    bars = [
        BarLayout(bar.index, bar.size, bar.kind == pb.BAR_KIND_MEM64, bar.index in mappable)
        for bar in info.bars
        if 0 <= bar.index <= REGION_ROM
    ]
    return DeviceLayout.build(
        bars, interrupt_pin=info.interrupt_pin, msix_vectors=info.msix_vectors
    )


def socket_name(info: pb.DeviceInfo) -> str:
    """A file name for the device's socket: its name when that is safe as one."""
    if SAFE_NAME.fullmatch(info.name):
        return f"{info.name}.sock"
    return f"device{info.device_id}.sock"
