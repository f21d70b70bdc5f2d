"""Linux's virtio_console driver on our device (virtio 1.2 §5.3): QEMU + vfio-user
bridge + device server, guest RAM shared. The guest writes to /dev/hvc0 and a
client on the console's UNIX socket reads it; the client answers and the guest
reads the answer from /dev/hvc0.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

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


async def test_hvc0_talks_to_the_host_socket(tmp_path: Path) -> None:
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
        )
        seen = await asyncio.wait_for(host, 30)
    finally:
        await srv.stop(0)
    assert result.exit_status == 0, result.console
    assert GREETING in seen
    assert value(result.output, "got") == ANSWER.decode().strip()
