"""`python -m devserver.service.balloon ADDR DEVICE_ID [--target MiB]`: set a
virtio-balloon's target (MiB the guest should give back; 0 deflates it) and
print what the guest holds and its latest statistics; `balloon()` is the same
for programs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc

from .protocol import MAX_MESSAGE_BYTES

_TIMEOUT_S = 10.0
MIB = 1 << 20


async def balloon(
    channel: grpc.aio.Channel, device_id: int, target_bytes: int | None = None
) -> pb.BalloonReply:
    """The Balloon RPC: a new target when `target_bytes` is given, and the state."""
    stub = devmodel_pb2_grpc.DeviceModelStub(channel)
    request = pb.BalloonRequest(device_id=device_id)
    if target_bytes is not None:
        request.target_bytes = target_bytes
    reply: pb.BalloonReply = await stub.Balloon(request, timeout=_TIMEOUT_S)
    return reply


async def _call(target: str, device_id: int, target_bytes: int | None) -> pb.BalloonReply:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        return await balloon(channel, device_id, target_bytes)


def describe(reply: pb.BalloonReply) -> str:
    lines = [
        f"target {reply.target_bytes / MIB:g} MiB, guest holds {reply.actual_bytes / MIB:g} MiB"
        + ("" if reply.driver_ok else " (no driver running)"),
        f"pages freed in guest RAM: {reply.pages_freed}, PFNs ignored: {reply.pfns_ignored}",
    ]
    lines += [f"  {name}: {value}" for name, value in sorted(reply.stats.items())]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devserver.service.balloon",
        description="Set a virtio-balloon's target and show what the guest holds.",
    )
    parser.add_argument("address", help="the device server: unix:PATH or HOST:PORT")
    parser.add_argument("device_id", type=int, help="the balloon's device id (see the topology)")
    parser.add_argument(
        "--target", type=int, metavar="MiB", help="MiB the guest should give back (0: deflate)"
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.target is not None and args.target < 0:
        print("balloon: --target is MiB, 0 or more", file=sys.stderr)
        return 2
    target_bytes = None if args.target is None else args.target * MIB
    try:
        reply = asyncio.run(_call(args.address, args.device_id, target_bytes))
    except grpc.aio.AioRpcError as e:
        print(f"balloon failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(describe(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
