"""A network namespace for a virtio-net test's tap (root only, via pyroute2).

The device server opens (creates) the tap in its own namespace; `HostNet`
then moves it into a private namespace `dm-test-<pid>-<n>` and gives it
HOST_ADDRESS, so the test's packets never touch the machine's own network.
Work inside the namespace runs in a short-lived thread that has entered it
(setns acts on the calling thread only), so nothing forks while gRPC runs.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Final, TypeVar

import pytest
from pyroute2 import IPRoute

NETNS_DIR: Final = "/run/netns"
CLONE_NEWNET: Final = 0x40000000
HOST_ADDRESS: Final = "10.0.77.1"
GUEST_ADDRESS: Final = "10.0.77.2"
PREFIX: Final = 24
TUN: Final = "/dev/net/tun"

T = TypeVar("T")
_names = itertools.count()


def why_not() -> str | None:
    """Why these tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "virtio-net tap tests need root (CAP_NET_ADMIN for the tap and the netns)"
    if not os.path.exists(TUN):
        return f"virtio-net tap tests need {TUN} (modprobe tun)"
    if shutil.which("ip") is None:
        return "virtio-net tap tests need iproute2's ip to make a network namespace"
    return None


def tap_name() -> str:
    return f"dmt{os.getpid() % 100000}{next(_names)}"[:15]


def in_netns(name: str, work: Callable[[], T]) -> T:
    """Run `work` in a fresh thread that has entered namespace `name`."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"{NETNS_DIR}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            out.append(work())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, name=f"netns-{name}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


class HostNet:
    """A namespace holding the tap `tap` at HOST_ADDRESS/PREFIX; `close()` removes it."""

    def __init__(self) -> None:
        self.netns = f"dm-test-{os.getpid()}-{next(_names)}"
        # `ip netns add` (fork + exec, no Python fork) makes and mounts it.
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        self.tap: str | None = None

    def take_tap(self, tap: str, guest_mac: bytes | None = None) -> None:
        """Move the server's tap here, address it, bring it up; a static
        neighbour entry for GUEST_ADDRESS when the guest will not answer ARP."""
        with IPRoute() as ip:
            index = ip.link_lookup(ifname=tap)[0]
            fd = os.open(f"{NETNS_DIR}/{self.netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                ip.link("set", index=index, net_ns_fd=fd)
            finally:
                os.close(fd)
        self.tap = tap

        def configure() -> None:
            with IPRoute() as ip:
                index = ip.link_lookup(ifname=tap)[0]
                ip.addr("add", index=index, address=HOST_ADDRESS, prefixlen=PREFIX)
                ip.link("set", index=index, state="up")
                if guest_mac is not None:
                    ip.neigh(
                        "add",
                        dst=GUEST_ADDRESS,
                        lladdr=":".join(f"{b:02x}" for b in guest_mac),
                        ifindex=index,
                        state=0x80,  # NUD_PERMANENT
                    )

        in_netns(self.netns, configure)

    def tap_mac(self) -> bytes:
        tap = self.tap
        assert tap is not None

        def read() -> bytes:
            with IPRoute() as ip:
                link = ip.get_links(ip.link_lookup(ifname=tap)[0])[0]
                return bytes.fromhex(str(link.get_attr("IFLA_ADDRESS")).replace(":", ""))

        return in_netns(self.netns, read)

    def link_stats(self) -> dict[str, int]:
        """The tap's counters as the namespace sees them (rx: from the guest)."""
        tap = self.tap
        assert tap is not None

        def read() -> dict[str, int]:
            with IPRoute() as ip:
                link = ip.get_links(ip.link_lookup(ifname=tap)[0])[0]
                stats = link.get_attr("IFLA_STATS64")
                return {k: int(stats[k]) for k in ("rx_packets", "tx_packets")}

        return in_netns(self.netns, read)

    def udp_socket(self, port: int) -> socket.socket:
        """A UDP socket in the namespace bound to HOST_ADDRESS:port."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((HOST_ADDRESS, port))
            return sock

        return in_netns(self.netns, make)

    def tcp_listener(self, port: int) -> socket.socket:
        """A TCP socket in the namespace listening on HOST_ADDRESS:port."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST_ADDRESS, port))
            sock.listen(1)
            return sock

        return in_netns(self.netns, make)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)


@pytest.fixture
def host() -> Iterator[HostNet]:
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    net = HostNet()
    try:
        yield net
    finally:
        net.close()
