"""The small protocols the core's devices reach the host through (architecture.md
"Backends behind small protocols"): the I/O edge, swappable in tests and for
fault injection. Implementations live in devserver/backends/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .effects import SharedMemory

if TYPE_CHECKING:  # a type only: the codec imports nothing of ports
    from .devices.p9_protocol import TMessage


class BlockBackend(Protocol):
    """A disk image addressed in bytes (virtio 1.2 §5.2 Block Device's backing).

    Every method may raise OSError or BackendError; the device turns either into
    VIRTIO_BLK_S_IOERR. Offsets and lengths are already checked against `size`.
    """

    @property
    def size(self) -> int:
        """Bytes in the image (a multiple of 512)."""

    @property
    def read_only(self) -> bool: ...

    @property
    def block_size(self) -> int:
        """The alignment (bytes, a power of two, 512..4096, dividing `size`) of
        offsets and lengths that go straight to the image: 512 for buffered
        I/O, the O_DIRECT block with cache=none. Other sector-aligned requests
        still work (read-modify-write); the device offers it as blk_size."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None:
        """The range may read anything afterwards (a hint)."""

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """The range reads zeroes afterwards; `unmap` lets it free the space too."""

    def close(self) -> None: ...


class ByteStream(Protocol):
    """A host byte stream a virtio-console port is joined to (virtio 1.2 §5.3).

    Never blocks: the device calls it from a worker thread while the service's
    event loop moves bytes to and from the host end. Bytes from the host wait
    in a bounded buffer until the device takes them (`read`); when it is full,
    the implementation stops reading from the host (back-pressure).
    """

    def readable(self) -> int:
        """Bytes from the host waiting to be read (0: none)."""

    def read(self, limit: int) -> bytes:
        """Up to `limit` of the waiting bytes (b"" when none wait)."""

    def write(self, data: bytes) -> bool:
        """Send `data` to the host; False: dropped (no peer, or its buffer is full)."""


class SharedFramebuffer(Protocol):
    """Memory a shared-memory BAR's bytes live in (the VESA framebuffer's VRAM).

    The frontend maps the same bytes through `backing` (guest stores land there
    directly, no exit); the device reads them (screendumps) and serves the BAR
    accesses a frontend forwards instead of mapping, through `view`.
    """

    @property
    def backing(self) -> SharedMemory:
        """Where a frontend maps these bytes (`backing.size` == len(view))."""

    @property
    def view(self) -> memoryview:
        """The bytes, writable, exactly `backing.size` long."""


class PacketPort(Protocol):
    """The wire a virtio-net device is joined to (virtio 1.2 §5.1): whole
    Ethernet frames, no virtio header (a tap device in the shell).

    Never blocks: the device calls it from a worker thread while the service's
    event loop reads the host end. Frames from the host wait in a bounded
    buffer until the device takes them, which it does only when the guest has
    posted receive buffers; when the buffer is full the implementation stops
    reading from the host (back-pressure: the host's own queue drops).
    """

    def pending(self) -> bool:
        """A frame from the host waits."""

    def receive(self) -> bytes | None:
        """The oldest waiting frame (None when none waits)."""

    def send(self, frame: bytes) -> bool:
        """Send one frame to the host; False: dropped (the host end is down or full)."""


class P9Export(Protocol):
    """The host directory a virtio-9p device exports (virtio 1.2 §5.11 9P
    transport, 9P2000.L): the file-system half of the server (fids, paths,
    opened files), in the shell; the device decodes and frames messages.

    Called synchronously from the device's worker thread, one message at a
    time. Never raises for a message: a failure is its Rlerror.
    """

    def serve(self, tag: int, message: TMessage, limit: int) -> bytes:
        """The encoded reply to `message` (a p9_protocol T-message other than
        Tversion and Tflush), at most `limit` bytes long (Rread and Rreaddir
        carry less data to fit)."""

    def reset(self) -> None:
        """Forget every fid and close every opened file (Tversion, device reset)."""
