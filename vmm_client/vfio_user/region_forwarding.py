"""Region accesses onto the device server: config space and BARs, in pieces it takes.

Region 7 (config space) becomes ConfigRead/ConfigWrite at the device's
bus/device/function (1, 2 or 4 bytes each), regions 0..6 BarRead/BarWrite
(up to 8 bytes), every piece naturally aligned. A lost or silent server
reads as all-ones, as a master abort does.
"""

from __future__ import annotations

import errno
from typing import Final

from devmodel.v1 import devmodel_pb2 as pb

from .link import ServerLink
from .protocol import (
    DEFAULT_MAX_DATA_XFER,
    REGION_CONFIG,
    ProtocolError,
    all_ones,
    split_access,
)

_CONFIG_PIECE: Final = 4  # ConfigRead takes 1, 2 or 4 bytes
_BAR_PIECE: Final = 8


def check_count(count: int) -> None:
    """One access moves at most the max_data_xfer_size we offered in VERSION."""
    if count > DEFAULT_MAX_DATA_XFER:
        raise ProtocolError(
            f"access of {count} bytes is over max_data_xfer_size {DEFAULT_MAX_DATA_XFER}",
            errno.E2BIG,
        )


def _max_piece(region: int) -> int:
    return _CONFIG_PIECE if region == REGION_CONFIG else _BAR_PIECE


async def read_region(
    link: ServerLink, info: pb.DeviceInfo, region: int, offset: int, count: int
) -> bytes:
    pieces = split_access(offset, count, _max_piece(region))
    if region == REGION_CONFIG:
        values = await link.config_read(info, pieces)
    else:
        values = await link.bar_read(info.device_id, region, pieces)
    if values is None:
        return all_ones(count)
    return b"".join(
        (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        for (_, size), v in zip(pieces, values, strict=True)
    )


async def write_region(
    link: ServerLink, info: pb.DeviceInfo, region: int, offset: int, data: bytes, *, posted: bool
) -> None:
    pieces = [
        (o, size, int.from_bytes(data[o - offset : o - offset + size], "little"))
        for o, size in split_access(offset, len(data), _max_piece(region))
    ]
    if region == REGION_CONFIG:
        # Config writes are answered: they can move BARs, and everything they
        # cause is applied before the vCPU goes on.
        await link.config_write(info, pieces)
    else:
        link.bar_write(info.device_id, region, pieces)
        if not posted:
            await link.flush()
