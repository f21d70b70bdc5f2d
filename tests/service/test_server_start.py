"""A DevServer that fails to start leaves nothing behind: console sockets and
pty links go, and a socket path it refused to take is not touched."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from devserver.config import parse_device_spec
from devserver.errors import ConfigError
from devserver.service.server import DevServer, Listen


def console_server(tmp_path: Path, listen: Path) -> tuple[DevServer, Path, Path]:
    sock, link = tmp_path / "con.sock", tmp_path / "con.pty"
    specs = [
        parse_device_spec(f"virtio-console,slot=3,socket={sock}"),
        parse_device_spec(f"virtio-console,slot=4,chardev=pty,pty-link={link}"),
    ]
    server = DevServer(specs, Listen(unix_path=listen))
    # The host ends exist from the server's construction on.
    assert sock.exists() and link.is_symlink()
    return server, sock, link


async def test_a_listen_directory_open_to_others_closes_the_consoles(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)  # whatever the umask
    server, sock, link = console_server(tmp_path, run / "dev.sock")
    with pytest.raises(ConfigError, match="open to other users"):
        await server.start()
    assert not sock.exists()
    assert not link.is_symlink()
    assert server.server is None
    await server.stop(0)  # still fine to call


async def test_a_refused_socket_path_is_left_alone(tmp_path: Path) -> None:
    """The path exists and is no socket: the server refuses it and must not
    remove it while cleaning up after itself."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    taken = run / "dev.sock"
    taken.write_text("someone else's")
    server, sock, _ = console_server(tmp_path, taken)
    with pytest.raises(ConfigError, match="not a socket"):
        await server.start()
    assert taken.read_text() == "someone else's"
    assert not sock.exists()


async def test_a_failure_after_binding_removes_the_socket_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    server, sock, link = console_server(tmp_path, run / "dev.sock")

    async def broken() -> None:
        raise OSError("the console host ends could not be served")

    monkeypatch.setattr(server.servicer, "start", broken)
    with pytest.raises(OSError, match="could not be served"):
        await server.start()
    assert not (run / "dev.sock").exists()
    assert not sock.exists() and not link.is_symlink()


async def test_a_started_server_still_cleans_up_on_stop(tmp_path: Path) -> None:
    run = tmp_path / "run"
    server, sock, link = console_server(tmp_path, run / "dev.sock")
    await server.start()
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(str(sock))
    probe.close()
    await server.stop(0)
    assert not (run / "dev.sock").exists()
    assert not sock.exists() and not link.is_symlink()
