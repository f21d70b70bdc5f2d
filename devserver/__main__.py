"""`python -m devserver`: serve PCI device models over gRPC.

python -m devserver --device pci-testdev --device pci-testdev,slot=5,name=t2
python -m devserver --listen 127.0.0.1:7100 --tls-cert s.pem --tls-key s.key --tls-client-ca ca.pem
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import DEVICE_TYPES, DeviceSpec, parse_device_spec
from .errors import ConfigError, DevserverError


def build_parser() -> argparse.ArgumentParser:
    types = "\n".join(f"  {t.name:14} {t.summary}" for t in DEVICE_TYPES.values())
    parser = argparse.ArgumentParser(
        prog="python -m devserver",
        description="Serve PCI device models (config space, BARs, interrupts) over gRPC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"device types:\n{types}\n\ncommon device options: slot=N (1..31), name=TEXT",
    )
    parser.add_argument(
        "--listen",
        metavar="ADDR",
        help="unix:PATH or HOST:PORT (default: unix:$XDG_RUNTIME_DIR/devmodel/devserver.sock, "
        "in a 0700 directory)",
    )
    parser.add_argument(
        "--device",
        metavar="TYPE[,key=value...]",
        action="append",
        default=[],
        help="add a device (repeatable); default: one pci-testdev",
    )
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for TCP")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="CA (PEM) that client certificates must chain to (mTLS)"
    )
    parser.add_argument(
        "--insecure-tcp",
        action="store_true",
        help="allow plain TCP on a non-loopback address (anyone who connects drives the devices)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (off by default)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    return parser


def parse_specs(texts: Sequence[str]) -> list[DeviceSpec]:
    return [parse_device_spec(text) for text in texts or ["pci-testdev"]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Imported late: `--help` and spec errors need no grpc start-up.
    from .service.server import DevServer, TlsFiles, parse_listen, serve

    try:
        specs = parse_specs(args.device)
        listen = parse_listen(args.listen)
        tls = None
        if args.tls_cert or args.tls_key or args.tls_client_ca:
            if not (args.tls_cert and args.tls_key):
                raise ConfigError("TLS needs both --tls-cert and --tls-key")
            if listen.unix_path is not None:
                raise ConfigError("TLS applies to TCP; use --listen HOST:PORT with --tls-*")
            for path in (args.tls_cert, args.tls_key, args.tls_client_ca):
                if path is not None and not path.is_file():
                    raise ConfigError(f"TLS file {path} does not exist")
            tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
        metrics = None
        if args.metrics is not None:
            where = parse_listen(args.metrics)
            if where.unix_path is not None:
                raise ConfigError("--metrics takes HOST:PORT (HTTP), not a unix: path")
            metrics = (where.host, where.port)
        server = DevServer(specs, listen, tls, insecure_tcp=args.insecure_tcp, metrics=metrics)
    except ConfigError as e:
        parser.exit(2, f"devserver: error: {e}\n")

    import uvloop

    try:
        uvloop.run(serve(server))
    except DevserverError as e:
        print(f"devserver: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
