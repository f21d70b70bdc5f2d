"""Linux's virtio_console driver on our device (virtio 1.2 §5.3): QEMU + vfio-user
bridge + device server, guest RAM shared.

- hvc0 round trip: the guest writes to /dev/hvc0 and a client on the console's
  UNIX socket reads it; the client answers and the guest reads the answer.
- A named port (multiport, virtio-serial): /dev/vport0p1 with its name in
  sysfs carries data both ways to a client on the port's socket.
- Console size: hvc0 on a pty has the configured size, and a resize of the pty
  reaches the guest's tty (a configuration change interrupt).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from devserver.backends.console_fd import set_terminal_size
from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.qemu.frontend import boot_served_guest

pytestmark = pytest.mark.usefixtures("qemu_ready")

GREETING = b"hello-from-guest"
ANSWER = b"from-the-host\n"  # 14 bytes


def value(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key}= not in guest output:\n{output}")


async def host_end(path: Path) -> bytes:
    """Wait for the guest's greeting, answer it; returns what the guest sent."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        seen = b""
        async with asyncio.timeout(240):
            while GREETING not in seen:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                seen += chunk
        writer.write(ANSWER)
        await writer.drain()
        return seen
    finally:
        writer.close()
        await writer.wait_closed()


# The bridge's memory mode: the server maps guest RAM ("shared") or asks the
# bridge for every ring and buffer access by DmaRequest ("messages").
@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_hvc0_talks_to_the_host_socket(tmp_path: Path, memory_mode: str) -> None:
    sock = tmp_path / "console.sock"
    srv = DevServer(
        [parse_device_spec(f"virtio-console,socket={sock}")],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
    )
    await srv.start()
    try:
        host = asyncio.create_task(host_end(sock))
        result = await boot_served_guest(
            srv.address,
            f"""
set -e
i=0
while [ ! -e /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
test -e /dev/hvc0
exec 3<>/dev/hvc0
stty raw -echo <&3
printf '{GREETING.decode()}\\n' >&3
echo got=$(head -c {len(ANSWER)} <&3)
""",
            timeout=300,
            memory_mode=memory_mode,
        )
        seen = await asyncio.wait_for(host, 30)
    finally:
        await srv.stop(0)
    assert result.exit_status == 0, result.console
    assert GREETING in seen
    assert value(result.output, "got") == ANSWER.decode().strip()


WAIT_FOR = """
wait_for() {
    i=0; while [ ! -e "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; test -e "$1"
}
"""


async def talk(path: Path, greeting: bytes, answer: bytes, release: asyncio.Event) -> bytes:
    """A client on `path` (connected before the guest boots): waits for
    `greeting`, answers, stays until `release` (a client that leaves is a
    host end that closed: the guest's reads would see EOF); returns what it saw."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        seen = b""
        async with asyncio.timeout(240):
            while greeting not in seen:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                seen += chunk
        writer.write(answer)
        await writer.drain()
        await release.wait()
        return seen
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_named_port_carries_data_both_ways(tmp_path: Path, memory_mode: str) -> None:
    console, agent = tmp_path / "console.sock", tmp_path / "agent.sock"
    srv = DevServer(
        [
            parse_device_spec(
                f"virtio-console,socket={console},cols=100,rows=30,"
                f"port=org.test.agent:socket:{agent}"
            )
        ],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
    )
    await srv.start()
    try:
        release = asyncio.Event()
        host = asyncio.create_task(talk(agent, b"agent-hello", b"agent-answer\n", release))
        result = await boot_served_guest(
            srv.address,
            WAIT_FOR
            + """
set -e
wait_for /dev/hvc0
wait_for /dev/vport0p1
echo name=$(cat /sys/class/virtio-ports/vport0p1/name)
exec 4<>/dev/vport0p1
printf 'agent-hello\\n' >&4
echo got=$(head -c 13 <&4)
exec 3<>/dev/hvc0
echo size=$(stty size <&3)
""",
            timeout=300,
            memory_mode=memory_mode,
        )
        release.set()
        seen = await asyncio.wait_for(host, 30)
    finally:
        await srv.stop(0)
    assert result.exit_status == 0, result.console
    assert value(result.output, "name") == "org.test.agent"
    assert b"agent-hello" in seen
    assert value(result.output, "got") == "agent-answer"
    # Port 0's size came as a RESIZE control message (cols, rows in the spec's
    # order; Linux before 6.14's fix, unless backported, reads them swapped).
    assert value(result.output, "size") == "30 100"


async def test_console_size_on_a_pty_and_its_resize(tmp_path: Path) -> None:
    link = tmp_path / "hvc0.pty"
    srv = DevServer(
        [parse_device_spec(f"virtio-console,chardev=pty,pty-link={link},cols=100,rows=30")],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
    )
    await srv.start()
    try:
        assert link.is_symlink() and os.readlink(link).startswith("/dev/pts/")
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

        async def resize_after_first_size() -> bytes:
            seen = b""
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(240):
                while b"size1=" not in seen:
                    await asyncio.sleep(0.2)
                    try:
                        seen += await loop.run_in_executor(None, _read_some, fd)
                    except BlockingIOError:
                        continue
            set_terminal_size(fd, 123, 45)
            return seen

        host = asyncio.create_task(resize_after_first_size())
        result = await boot_served_guest(
            srv.address,
            WAIT_FOR
            + """
set -e
wait_for /dev/hvc0
exec 3<>/dev/hvc0
stty raw -echo <&3
printf 'hello\\n' >&3
i=0; while [ "$(stty size <&3)" != "30 100" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo size1=$(stty size <&3)
printf 'size1=\\n' >&3
i=0; while [ "$(stty size <&3)" != "45 123" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo size2=$(stty size <&3)
""",
            timeout=300,
        )
        seen = await asyncio.wait_for(host, 30)
        os.close(fd)
    finally:
        await srv.stop(0)
    assert result.exit_status == 0, result.console
    assert b"hello" in seen
    assert value(result.output, "size1") == "30 100"
    assert value(result.output, "size2") == "45 123"
    assert not link.exists()  # the link goes with the server


def _read_some(fd: int) -> bytes:
    return os.read(fd, 4096)
