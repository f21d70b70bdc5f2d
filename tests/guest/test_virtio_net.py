"""Linux's virtio_net driver on our device (virtio 1.2 §5.1) and a real tap:
QEMU + vfio-user bridge + device server, guest RAM shared; root only.

The server's tap is moved into a private network namespace at 10.0.77.1/24.
The guest sets 10.0.77.2/24 on eth0 (the configured MAC and MTU visible in
sysfs), pings 10.0.77.1 (ARP and ICMP both ways), then talks TCP with a
listener in the namespace: its greeting arrives there and the answer comes
back to the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest

from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from tests.netns_tap import GUEST_ADDRESS, HOST_ADDRESS, PREFIX, HostNet, host, tap_name

__all__ = ["host"]  # the fixture, from tests/netns_tap.py
from vmm_client.guest.image import DEFAULT_TOOLS, NETWORK_TOOLS
from vmm_client.qemu.frontend import boot_served_guest

pytestmark = [pytest.mark.usefixtures("qemu_ready"), pytest.mark.root]

MAC = "52:54:00:aa:00:02"
TCP_PORT = 7778
GREETING = b"guest-hello"
ANSWER = b"host-answer\n"


def value(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key}= not in guest output:\n{output}")


def serve_once(listener: socket.socket) -> bytes:
    """Accept the guest's connection, read its greeting, answer, close."""
    with listener:
        listener.settimeout(280)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            seen = b""
            while GREETING not in seen:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                seen += chunk
            conn.sendall(ANSWER)
            return seen


# The bridge's memory mode: the server maps guest RAM ("shared") or asks the
# bridge for every ring and buffer access by DmaRequest ("messages").
@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_guest_pings_and_talks_tcp_with_the_tap(
    tmp_path: Path, host: HostNet, memory_mode: str
) -> None:
    tap = tap_name()
    srv = DevServer(
        [parse_device_spec(f"virtio-net,tap={tap},mac={MAC}")],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
    )
    await srv.start()
    listener: socket.socket | None = None
    peer: asyncio.Task[bytes] | None = None
    stats: dict[str, int] = {}
    try:
        await asyncio.to_thread(host.take_tap, tap)
        listener = await asyncio.to_thread(host.tcp_listener, TCP_PORT)
        peer = asyncio.create_task(asyncio.to_thread(serve_once, listener))
        result = await boot_served_guest(
            srv.address,
            f"""
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo mac=$(cat /sys/class/net/eth0/address)
echo mtu=$(cat /sys/class/net/eth0/mtu)
ip link set eth0 up
ip addr add {GUEST_ADDRESS}/{PREFIX} dev eth0
if ping -c 2 -W 10 {HOST_ADDRESS}; then echo ping=ok; else echo ping=failed; fi
echo got=$(echo {GREETING.decode()} | nc -w 20 {HOST_ADDRESS} {TCP_PORT})
""",
            timeout=300,
            memory_mode=memory_mode,
            tools=DEFAULT_TOOLS + NETWORK_TOOLS,
        )
        seen = await asyncio.wait_for(peer, 60) if result.exit_status == 0 else b""
        # Read while the server holds the tap (it goes away with the server's fd).
        stats = await asyncio.to_thread(host.link_stats)
    finally:
        if listener is not None and peer is not None and not peer.done():
            # A guest that never connected: wake the accept (shutdown does; close does not).
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            await asyncio.gather(peer, return_exceptions=True)
        await srv.stop(0)
    assert result.exit_status == 0, result.console
    assert value(result.output, "mac") == MAC
    assert value(result.output, "mtu") == "1500"
    assert value(result.output, "ping") == "ok", result.output
    assert GREETING in seen
    assert value(result.output, "got") == ANSWER.decode().strip()
    assert stats["rx_packets"] > 0 and stats["tx_packets"] > 0
