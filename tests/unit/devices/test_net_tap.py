"""The tap host end of virtio-net (backends/net_tap.py): names checked, clear
errors, and bounded read-ahead (reliability.md: the host end stops reading at
RX_FRAMES frames and resumes once the device takes one). The tap tests need
root and /dev/net/tun, and skip saying why otherwise."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest

from devserver.backends.net_tap import RX_FRAMES, TapPort, check_tap_name
from devserver.errors import ConfigError
from tests.netns_tap import GUEST_ADDRESS, HostNet, host, tap_name, why_not

__all__ = ["host"]  # the fixture, from tests/netns_tap.py


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b", "a:b", "a b", ".", ".."])
def test_bad_interface_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        check_tap_name(name)


def test_good_interface_name() -> None:
    assert check_tap_name("tap-vm0") == "tap-vm0"


@pytest.mark.root
def test_an_interface_that_is_no_tap_is_refused() -> None:
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(ConfigError, match="not a free tap"):
        TapPort("lo")


@pytest.mark.root
def test_without_privilege_the_error_says_what_to_do() -> None:
    setpriv = shutil.which("setpriv")
    if why_not() is not None or setpriv is None:
        pytest.skip("needs root (to drop it) and setpriv")
    code = (
        "from devserver.backends.net_tap import TapPort\n"
        "from devserver.errors import ConfigError\n"
        "try:\n    TapPort('dmt-noroot')\n"
        "except ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=os.getcwd(),
        timeout=60,
    )
    assert "run as root" in out.stdout, out.stdout + out.stderr


@pytest.mark.root
async def test_read_ahead_is_bounded_and_resumes(host: HostNet) -> None:
    name = tap_name()
    tap = TapPort(name)
    try:
        await tap.start()
        woken: list[int] = []
        tap.on_readable = lambda: woken.append(1)
        # A neighbour entry for a guest that never answers: the namespace sends
        # datagrams straight into the tap, as many as the test likes.
        await asyncio.to_thread(host.take_tap, name, bytes.fromhex("525400aa0003"))
        sender = await asyncio.to_thread(host.udp_socket, 9999)
        with sender:
            for i in range(RX_FRAMES * 2):
                sender.sendto(b"frame %d" % i, (GUEST_ADDRESS, 9))
            for _ in range(200):
                await asyncio.sleep(0.02)
                if len(tap._incoming) >= RX_FRAMES:
                    break
            assert len(tap._incoming) == RX_FRAMES  # no more than the bound
            assert woken
            assert not tap._reading  # the reader is off: back-pressure
            # The device takes one: reading resumes (on the loop) and refills.
            assert tap.receive() is not None
            for _ in range(200):
                await asyncio.sleep(0.02)
                if len(tap._incoming) == RX_FRAMES:
                    break
            assert len(tap._incoming) == RX_FRAMES
        # Drain everything (the rest of the datagrams, and whatever else the
        # namespace sent: IPv6 neighbour discovery...): reading goes on.
        for _ in range(100):
            while tap.pending():
                frame = tap.receive()
                assert frame is not None and len(frame) >= 14
            await asyncio.sleep(0.05)
            if not tap.pending():
                break
        assert tap.receive() is None
        assert tap._reading  # room again: reading
        assert tap.send(b"\xff" * 6 + b"\x52\x54\x00\xaa\x00\x03" + b"\x08\x06" + bytes(28))
    finally:
        tap.close()
