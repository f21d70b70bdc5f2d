"""`python -m devserver.service.screendump ADDR DEVICE_ID out.ppm`: save what a
vesa-fb shows as a PPM (P6) image; `screendump()` is the same for programs.

A picture larger than one reply (MAX_SCREENDUMP_BYTES of RGB) comes in row
windows; the guest may draw between them, as it may while any screen is
captured. If it changes the mode meanwhile, the capture starts over.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc

from .protocol import MAX_MESSAGE_BYTES

_ATTEMPTS = 3
_TIMEOUT_S = 10.0


class ScreendumpError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Picture:
    """`height` rows of `width` RGB triples; `mode` as the server reported it."""

    width: int
    height: int
    rgb: bytes
    mode: pb.DisplayMode

    def ppm(self) -> bytes:
        return b"P6\n%d %d\n255\n" % (self.width, self.height) + self.rgb


def _same_mode(a: pb.DisplayMode, b: pb.DisplayMode) -> bool:
    return bool(a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True))


async def screendump(channel: grpc.aio.Channel, device_id: int) -> Picture | None:
    """The whole picture device `device_id` shows; None when it shows nothing."""
    stub = devmodel_pb2_grpc.DeviceModelStub(channel)
    for _ in range(_ATTEMPTS):
        first = await stub.Screendump(pb.ScreendumpRequest(device_id=device_id), timeout=_TIMEOUT_S)
        if not first.HasField("mode"):
            return None
        mode = first.mode
        chunks = [first.rgb]
        have = first.rows
        while have < mode.height:
            reply = await stub.Screendump(
                pb.ScreendumpRequest(device_id=device_id, first_row=have), timeout=_TIMEOUT_S
            )
            if not reply.HasField("mode") or not _same_mode(reply.mode, mode) or not reply.rows:
                break
            chunks.append(reply.rgb)
            have += reply.rows
        else:
            rgb = b"".join(chunks)
            if len(rgb) != mode.width * mode.height * 3:
                raise ScreendumpError(
                    f"the server sent {len(rgb)} bytes for a {mode.width}x{mode.height} picture"
                )
            return Picture(mode.width, mode.height, rgb, mode)
    raise ScreendumpError(f"device {device_id} kept changing its mode during the capture")


async def _capture(target: str, device_id: int) -> Picture | None:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        return await screendump(channel, device_id)


def _save(target: str, device_id: int, out: Path) -> int:
    picture = asyncio.run(_capture(target, device_id))
    if picture is None:
        print(f"device {device_id} shows nothing (display off)", file=sys.stderr)
        return 1
    out.write_bytes(picture.ppm())
    mode = picture.mode
    print(f"{out}: {mode.width}x{mode.height}, guest mode {mode.bpp} bpp, stride {mode.stride}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[1].isdigit():
        print(
            "usage: python -m devserver.service.screendump unix:PATH|HOST:PORT DEVICE_ID OUT.ppm",
            file=sys.stderr,
        )
        return 2
    try:
        return _save(argv[0], int(argv[1]), Path(argv[2]))
    except grpc.aio.AioRpcError as e:
        print(f"screendump failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except ScreendumpError as e:
        print(f"screendump failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
