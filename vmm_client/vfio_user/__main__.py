"""`python -m vmm_client.vfio_user`: serve the device server's devices to QEMU.

    python -m vmm_client.vfio_user --devserver unix:/run/devmodel/devserver.sock \\
        --socket-dir /run/devmodel/vfio-user --print-qemu-args

opens one vfio-user socket per device (DIR/NAME.sock), prints the `-device
vfio-user-pci,...` arguments for QEMU once they listen, and runs until
SIGINT or SIGTERM. Start it before QEMU: QEMU connects at realize time.

Device DMA reaches guest RAM as `--memory-mode` says: `shared` hands QEMU's
memfds on to the server (give QEMU -object memory-backend-memfd,share=on),
`messages` carries every transfer over the stream (a remote server, or RAM
QEMU cannot share); `auto` picks shared for a unix: server address.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from devserver.errors import ConfigError
from devserver.service.server import default_socket_path

from ..client import ClientError, TlsClientFiles
from .bridge import DMA_LAYOUTS, VfioUserBridge, run_bridge
from .link import ACCESS_TIMEOUT, MEMORY_MODES


def default_socket_dir() -> Path:
    return default_socket_path().parent / "vfio-user"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vmm_client.vfio_user",
        description="Serve the device server's PCI devices to QEMU over vfio-user.",
    )
    parser.add_argument(
        "--devserver",
        metavar="ADDR",
        default=f"unix:{default_socket_path()}",
        help="device server address: unix:PATH or HOST:PORT (default: %(default)s)",
    )
    parser.add_argument(
        "--socket-dir",
        type=Path,
        default=default_socket_dir(),
        help="directory (made 0700) for the per-device sockets (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=ACCESS_TIMEOUT,
        help="seconds to wait for the device server before a read returns all-ones "
        "(keep it under QEMU's x-msg-timeout; default: %(default)s)",
    )
    parser.add_argument(
        "--memory-mode",
        choices=MEMORY_MODES,
        default="auto",
        help="how device DMA reaches guest RAM: shared (the server maps QEMU's memfds; "
        "same host), messages (DmaRequest over the stream, served from QEMU's memfds or "
        "vfio-user DMA_READ/DMA_WRITE), auto: shared for a unix: address (default: %(default)s)",
    )
    parser.add_argument(
        "--dma-layout",
        choices=sorted(DMA_LAYOUTS),
        default="spec",
        help="where vfio-user DMA_READ/DMA_WRITE data sits: spec (offset 16, u64 count; "
        "QEMU 11.1) or u32-count (offset 12, the first-merged QEMU source) "
        "(default: %(default)s)",
    )
    parser.add_argument("--tls-ca", type=Path, help="CA (PEM) the server certificate chains to")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mTLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM)")
    parser.add_argument(
        "--print-qemu-args",
        action="store_true",
        help="print the QEMU -device arguments on one line once the sockets listen",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    return parser


def _tls(args: argparse.Namespace) -> TlsClientFiles | None:
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise ConfigError("--tls-cert/--tls-key need --tls-ca")
        return None
    return TlsClientFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def ready(bridge: VfioUserBridge) -> None:
        for name, path in bridge.sockets.items():
            print(f"vfio-user: {name} on {path}", flush=True)
        if args.print_qemu_args:
            print(shlex.join(bridge.qemu_args()), flush=True)

    try:
        await run_bridge(
            args.devserver,
            args.socket_dir,
            tls=_tls(args),
            access_timeout=args.timeout,
            ready=ready,
            stop=stop,
            memory_mode=args.memory_mode,
            dma_layout=args.dma_layout,
        )
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # Sockets and the directory are created private; keep it so for anything else.
    os.umask(0o077)
    try:
        asyncio.run(_main(args))
    except (ClientError, ConfigError, ValueError, OSError) as e:
        print(f"vfio-user bridge: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
