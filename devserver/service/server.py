"""Start and stop the gRPC server: listening address, TLS, health, reflection.

Security defaults: a UNIX socket in a 0700 directory under the runtime dir;
TCP only when asked for, and then with TLS (client certificates verified when
a client CA is given) unless --insecure-tcp says otherwise; SO_REUSEPORT off
so a second server cannot silently share a port; explicit message limits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from devmodel.v1 import devmodel_pb2, devmodel_pb2_grpc

from ..config import DeviceSpec
from ..errors import ConfigError
from .metrics import CountersCollector, serve_metrics
from .protocol import MAX_MESSAGE_BYTES, SERVICE_NAME
from .servicer import DeviceModelServicer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # given: clients must present a certificate it signed


@dataclass(frozen=True, slots=True)
class Listen:
    """Where to listen: a UNIX socket path, or a TCP host and port."""

    unix_path: Path | None = None
    host: str = ""
    port: int = 0

    @property
    def target(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def default_socket_path() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/devmodel-{os.getuid()}"
    return Path(runtime) / "devmodel" / "devserver.sock"


def parse_listen(text: str | None) -> Listen:
    """`unix:PATH`, `HOST:PORT` or `[V6]:PORT`; None means the default socket."""
    if text is None:
        return Listen(unix_path=default_socket_path())
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):  # unix:///abs/path, grpc's spelling
            path = path[2:]
        if not path:
            raise ConfigError("--listen unix: needs a path, e.g. unix:/run/devmodel/dev.sock")
        return Listen(unix_path=Path(path).absolute())
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--listen {text!r}: expected unix:PATH or HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--listen {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--listen {text!r}: port {port} is not 0..65535")
    return Listen(host=host, port=port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_socket_dir(path: Path) -> None:
    """Make the socket's directory private (0700, ours), and clear a stale socket."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"{directory} belongs to uid {info.st_uid}, not us; pick another --listen path"
        )
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{directory} is open to other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run `chmod 700 {directory}` or pick another --listen path"
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()  # stale: a live server would still hold it, but grpc cannot tell us


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


class DevServer:
    """The running gRPC server with its servicer."""

    def __init__(
        self,
        specs: Sequence[DeviceSpec],
        listen: Listen,
        tls: TlsFiles | None = None,
        insecure_tcp: bool = False,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        if (
            listen.unix_path is None
            and tls is None
            and not insecure_tcp
            and not is_loopback(listen.host)
        ):
            raise ConfigError(
                f"refusing plain TCP on {listen.host}: anyone who connects can drive the devices "
                "(and their DMA). Give --tls-cert/--tls-key/--tls-client-ca, or --insecure-tcp"
            )
        self.listen = listen
        self.tls = tls
        self.servicer = DeviceModelServicer(specs)
        self.metrics = metrics
        self.metrics_port = 0
        self._metrics_server: WSGIServer | None = None
        self.address = ""
        self.server: grpc.aio.Server | None = None
        self._bound = False  # listen.unix_path is a socket this server made
        self.health = health.aio.HealthServicer()

    async def start(self) -> str:
        """Bind and start; return the address clients should use.

        The grpc.aio server is made here, inside the running loop it belongs to.
        If starting fails, what the server already holds is let go before the
        error propagates: console sockets and pty links, disk images, and the
        socket file if this server bound it (a path it refused is left alone).
        """
        try:
            return await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> str:
        self.server = grpc.aio.server(options=server_options())
        devmodel_pb2_grpc.add_DeviceModelServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                devmodel_pb2.DESCRIPTOR.services_by_name["DeviceModel"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        if self.listen.unix_path is not None:
            prepare_socket_dir(self.listen.unix_path)
        if self.tls is not None:
            creds = grpc.ssl_server_credentials(
                [(self.tls.key.read_bytes(), self.tls.cert.read_bytes())],
                root_certificates=self.tls.client_ca.read_bytes() if self.tls.client_ca else None,
                require_client_auth=self.tls.client_ca is not None,
            )
        else:
            creds = None
        try:
            if creds is not None:
                port = self.server.add_secure_port(self.listen.target, creds)
            else:
                port = self.server.add_insecure_port(self.listen.target)
        except RuntimeError as e:
            raise ConfigError(
                f"cannot listen on {self.listen.target}: {e} (address in use?)"
            ) from None
        self._bound = self.listen.unix_path is not None  # the socket file is ours now
        if self.listen.unix_path is None:
            if port == 0:
                raise ConfigError(f"cannot listen on {self.listen.target} (address in use?)")
            host = f"[{self.listen.host}]" if ":" in self.listen.host else self.listen.host
            self.address = f"{host}:{port}"
        else:
            self.address = self.listen.target
        await self.server.start()
        await self.servicer.start()
        if self.listen.unix_path is not None:
            os.chmod(self.listen.unix_path, 0o600)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.metrics is not None:
            collector = CountersCollector(
                self.servicer.counters,
                lambda: self.servicer.attached,
                self.servicer.device_names,
            )
            try:
                self._metrics_server, self.metrics_port = serve_metrics(*self.metrics, collector)
            except OSError as e:
                await self.stop(0)
                raise ConfigError(
                    f"cannot serve metrics on {self.metrics[0]}:{self.metrics[1]}: {e}"
                ) from None
            log.info("metrics on http://%s:%d/metrics", self.metrics[0], self.metrics_port)
        log.info("devserver listening on %s", self.address)
        return self.address

    async def stop(self, grace: float = 2.0) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self.server is None:
            await self.servicer.aclose()
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.server = None
        await self.servicer.aclose()  # after the streams ended: no device uses a backend
        if self.listen.unix_path is not None and self._bound:
            self._bound = False
            self.listen.unix_path.unlink(missing_ok=True)


async def serve(server: DevServer, ready: asyncio.Event | None = None) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    address = await server.start()
    print(f"devserver: listening on {address}", flush=True)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await server.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
