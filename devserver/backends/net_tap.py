"""A virtio-net device's wire: a Linux tap device, as a PacketPort (ports.py;
virtio 1.2 §5.1 Network Device).

The tap is opened at server start: /dev/net/tun, TUNSETIFF with IFF_TAP |
IFF_NO_PI (whole Ethernet frames, no packet-information prefix, and no
IFF_VNET_HDR: the device offers no offloads, so there is no header to pass),
non-blocking. An interface of that name is created, or an existing tap
attached to (one made beforehand, e.g. by `ip tuntap add`, perhaps owned by
another user). Needs CAP_NET_ADMIN unless the tap already exists and is ours.

Receive (host → guest): the tap is read on the event loop (loop.add_reader)
while fewer than RX_FRAMES frames wait for the device; at the limit the reader
is removed, and the kernel's own queue for the tap (its txqueuelen) takes the
back-pressure and drops, as a real NIC's ring would. The reader comes back once
the device has taken a frame (which it does only into buffers the guest
posted). A frame longer than MAX_FRAME is dropped and counted.

Transmit (guest → host): one write() per frame, from the device's worker
thread (a tap write never blocks: the kernel queues the frame or drops it); an
error (the interface is down: EIO) drops the frame and counts it.

`on_readable` is called on the loop whenever a frame arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Final

from ..devices.net import MAX_FRAME
from ..errors import ConfigError

TUN_PATH: Final = "/dev/net/tun"
TUNSETIFF: Final = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFNAMSIZ: Final = 16
# struct ifreq: char ifr_name[16]; short ifr_flags; (padding to 40 bytes)
IFREQ: Final = struct.Struct("16sH22x")

# Frames read ahead of the device, at most (each at most MAX_FRAME bytes).
RX_FRAMES: Final = 64


def check_tap_name(name: str) -> str:
    """A Linux interface name: 1..15 bytes, no '/', ':', whitespace or NUL."""
    raw = name.encode()
    if not 0 < len(raw) < IFNAMSIZ or name in (".", ".."):
        raise ConfigError(f"virtio-net tap={name!r}: an interface name is 1..15 bytes")
    if any(c in name for c in "/: \t\n\0"):
        raise ConfigError(f"virtio-net tap={name!r}: no '/', ':', whitespace or NUL in it")
    return name


class TapPort:
    """An open tap device; `start()` reads it on the running loop, `close()` lets it go."""

    def __init__(self, name: str) -> None:
        check_tap_name(name)
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(
                f"virtio-net tap={name}: {TUN_PATH} does not exist (load the tun module: "
                "modprobe tun)"
            ) from None
        except PermissionError:
            raise ConfigError(
                f"virtio-net tap={name}: no permission to open {TUN_PATH} (run as root, or "
                "give the server CAP_NET_ADMIN)"
            ) from None
        except OSError as e:
            raise ConfigError(f"virtio-net tap={name}: cannot open {TUN_PATH}: {e}") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EPERM:
                raise ConfigError(
                    f"virtio-net tap={name}: not permitted to create or attach the tap (run "
                    "as root or with CAP_NET_ADMIN, or create it for this user first: "
                    f"ip tuntap add {name} mode tap user $USER)"
                ) from None
            if e.errno in (errno.EINVAL, errno.EBUSY):
                raise ConfigError(
                    f"virtio-net tap={name}: an interface of that name exists and is not a "
                    f"free tap without packet information ({e.strerror})"
                ) from None
            raise ConfigError(f"virtio-net tap={name}: TUNSETIFF failed: {e}") from None
        self.name = name
        self._fd: int | None = fd
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._incoming: deque[bytes] = deque()
        self._reading = False
        self.on_readable: Callable[[], None] | None = None
        self.rx_frames = 0  # read from the tap
        self.rx_oversize = 0  # read from the tap, longer than MAX_FRAME: dropped
        self.tx_frames = 0  # written to the tap
        self.tx_errors = 0  # refused by the tap (down, gone)
        self.read_error: str | None = None  # why reading stopped for good

    # -- lifecycle (on the loop)

    async def start(self) -> None:
        if self._fd is None or self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._read_more()

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        loop = self._loop
        if self._reading and loop is not None and not loop.is_closed():
            loop.remove_reader(fd)
        self._reading = False
        os.close(fd)

    # -- reading (on the loop)

    def _read_more(self) -> None:
        """Read while there is room; add or remove the reader to match."""
        fd = self._fd
        loop = self._loop
        if fd is None or loop is None:
            return
        got = False
        while True:
            with self._lock:
                room = len(self._incoming) < RX_FRAMES
            if not room:
                break
            try:
                # One more byte than a frame may have, to see an oversized one.
                frame = os.read(fd, MAX_FRAME + 1)
            except BlockingIOError:
                break
            except OSError as e:
                # Not a frame, not "none waiting": the tap is broken (an fd
                # that stays readable and fails would spin the loop). Stop.
                self.read_error = str(e)
                break
            if not frame:
                break
            self.rx_frames += 1
            if len(frame) > MAX_FRAME:
                self.rx_oversize += 1
                continue
            with self._lock:
                self._incoming.append(frame)
            got = True
        with self._lock:
            want = len(self._incoming) < RX_FRAMES and self.read_error is None
        if want and not self._reading:
            loop.add_reader(fd, self._read_more)
            self._reading = True
        elif not want and self._reading:
            loop.remove_reader(fd)
            self._reading = False
        if got and self.on_readable is not None:
            self.on_readable()

    def _resume(self) -> None:
        if not self._reading:
            self._read_more()

    # -- PacketPort (any thread)

    def pending(self) -> bool:
        with self._lock:
            return bool(self._incoming)

    def receive(self) -> bytes | None:
        with self._lock:
            if not self._incoming:
                return None
            frame = self._incoming.popleft()
            resume = len(self._incoming) == RX_FRAMES - 1
        if resume:
            self._call(self._resume)
        return frame

    def send(self, frame: bytes) -> bool:
        fd = self._fd
        if fd is None:
            self.tx_errors += 1
            return False
        try:
            written = os.write(fd, frame)
        except OSError:
            self.tx_errors += 1
            return False
        if written != len(frame):
            self.tx_errors += 1
            return False
        self.tx_frames += 1
        return True

    def _call(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(callback)
