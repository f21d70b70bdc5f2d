"""virtio-9p driven like Linux's 9pnet_virtio (virtio 1.2 §5.11): the mount tag,
Tversion, requests through the ring to a real exported directory, and hostile
chains (a size field past the chain, no room for a reply, no writable buffer):
every popped head comes back (reliability.md C9, C10)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from devserver.backends.p9_fs import DirectoryExport
from devserver.devices import p9_protocol as p9
from devserver.devices.p9 import MAX_TAG_BYTES, VIRTIO_9P_MOUNT_TAG, Virtio9p
from devserver.errors import ConfigError
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET, VirtioPciFunction
from devserver.virtio.spec import DeviceStatus, VirtioDeviceId, feature_bit
from tests.unit.virtio.driver import RAM_SIZE, FakeVirtioDriver


def s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


def msg(type_: int, body: bytes, tag: int = 1) -> bytes:
    return struct.pack("<IBH", 7 + len(body), type_, tag) + body


class P9:
    def __init__(self, root: Path, tag: str = "share") -> None:
        self.export = DirectoryExport(str(root))
        self.dev = Virtio9p(self.export, tag=tag)
        self.mem = BytearrayMemory(RAM_SIZE)
        self.fn = VirtioPciFunction(self.dev, presentation=Presentation(), memory=self.mem)
        self.fn.device_id = 7
        self.drv = FakeVirtioDriver(self.fn, self.mem)
        self.drv.start(1)

    def chain(self, buffers: list[tuple[bytes | int, bool]]) -> tuple[int, list[int]]:
        """Post one chain of (data or size, writable) buffers; (used len, gpas)."""
        parts: list[tuple[int, int, bool]] = []
        gpas: list[int] = []
        for data, writable in buffers:
            size = data if isinstance(data, int) else len(data)
            gpa = self.drv.alloc(max(size, 1))
            if isinstance(data, bytes):
                self.drv.put(gpa, data)
            parts.append((gpa, size, writable))
            gpas.append(gpa)
        head = self.drv.add_chain(0, parts)
        self.drv.publish(0, head)
        self.drv.kick(0)
        used = self.drv.used(0)
        assert used and used[-1][0] == head, "every popped head is returned (C9)"
        return used[-1][1], gpas

    def request(self, data: bytes, room: int = 4096) -> bytes:
        length, gpas = self.chain([(data, False), (room, True)])
        return self.drv.get(gpas[1], length)


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[P9]:
    (tmp_path / "hello.txt").write_text("hello\n")
    d = P9(tmp_path)
    yield d
    d.export.close()


def test_config_is_the_mount_tag(dev: P9) -> None:
    assert dev.drv.device_features() & feature_bit(VIRTIO_9P_MOUNT_TAG)
    raw = bytes(dev.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(2 + len("share")))
    assert raw == b"\x05\x00share"
    assert dev.dev.device_type == VirtioDeviceId.P9


@pytest.mark.parametrize("tag", ["", "a b", "a,b", "x" * (MAX_TAG_BYTES + 1)])
def test_bad_tags_are_refused(tmp_path: Path, tag: str) -> None:
    with pytest.raises(ConfigError):
        Virtio9p(DirectoryExport(str(tmp_path)), tag=tag)


def test_version_attach_walk_open_read(dev: P9) -> None:
    reply = dev.request(msg(p9.TVERSION, struct.pack("<I", 1 << 30) + s("9P2000.L"), 0xFFFF))
    assert reply == msg(p9.TVERSION + 1, struct.pack("<I", p9.MAX_MSIZE) + s("9P2000.L"), 0xFFFF)
    assert (
        dev.request(msg(p9.TATTACH, struct.pack("<II", 0, p9.NOFID) + s("u") + s("") + b"\0" * 4))[
            4
        ]
        == p9.TATTACH + 1
    )
    walk = struct.pack("<IIH", 0, 1, 1) + s("hello.txt")
    assert dev.request(msg(p9.TWALK, walk))[4] == p9.TWALK + 1
    assert dev.request(msg(p9.TLOPEN, struct.pack("<II", 1, 0)))[4] == p9.TLOPEN + 1
    reply = dev.request(msg(p9.TREAD, struct.pack("<IQI", 1, 0, 100)))
    assert reply[4] == p9.TREAD + 1 and reply[11:] == b"hello\n"


def test_msize_is_negotiated_down_and_bounds_requests(dev: P9) -> None:
    reply = dev.request(msg(p9.TVERSION, struct.pack("<I", 4096) + s("9P2000.L")))
    assert struct.unpack_from("<I", reply, 7)[0] == 4096
    big = msg(p9.TWRITE, struct.pack("<IQI", 1, 0, 5000) + b"x" * 5000, tag=9)
    reply = dev.request(big)
    assert reply == p9.rlerror(9, errno.EINVAL)
    too_small = dev.request(msg(p9.TVERSION, struct.pack("<I", 100) + s("9P2000.L"), 3))
    assert too_small == p9.rlerror(3, errno.EINVAL)


def test_unknown_version_is_answered_unknown(dev: P9) -> None:
    reply = dev.request(msg(p9.TVERSION, struct.pack("<I", 8192) + s("9P2000.u")))
    assert reply.endswith(s("unknown"))


def test_size_field_past_the_chain_is_einval(dev: P9) -> None:
    data = struct.pack("<IBH", 0xFFFFFFFF, p9.TCLUNK, 4) + b"\0" * 4
    assert dev.request(data) == p9.rlerror(4, errno.EINVAL)
    data = struct.pack("<IBH", 3, p9.TCLUNK, 5) + b"\0" * 4  # smaller than a header
    assert dev.request(data) == p9.rlerror(5, errno.EINVAL)
    assert dev.dev.errors == 2


def test_garbage_body_is_einval_and_unknown_type_eopnotsupp(dev: P9) -> None:
    assert dev.request(msg(p9.TWALK, b"\x01", tag=6)) == p9.rlerror(6, errno.EINVAL)
    assert dev.request(msg(p9.TMKNOD, b"", tag=7)) == p9.rlerror(7, errno.EOPNOTSUPP)
    assert dev.request(msg(p9.TFLUSH, b"\x01\x00", tag=8)) == msg(p9.TFLUSH + 1, b"", 8)


def test_chains_without_room_come_back_empty(dev: P9) -> None:
    # No writable buffer, a header cut short, a reply buffer too small for Rlerror.
    assert dev.chain([(msg(p9.TCLUNK, b"\0" * 4), False)])[0] == 0
    assert dev.chain([(b"\x0b\x00", False), (64, True)])[0] == 0
    assert dev.chain([(msg(p9.TCLUNK, b"\0" * 4), False), (10, True)])[0] == 0
    assert dev.chain([(64, True)])[0] == 0  # nothing readable at all


def test_reads_fit_the_writable_room(dev: P9, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"y" * 10_000)
    dev.request(msg(p9.TATTACH, struct.pack("<II", 0, p9.NOFID) + s("") + s("") + b"\0" * 4))
    dev.request(msg(p9.TWALK, struct.pack("<IIH", 0, 1, 1) + s("big")))
    dev.request(msg(p9.TLOPEN, struct.pack("<II", 1, 0)))
    reply = dev.request(msg(p9.TREAD, struct.pack("<IQI", 1, 0, 0xFFFFFFFF)), room=300)
    assert len(reply) == 300 and struct.unpack_from("<I", reply, 7)[0] == 300 - 11


def test_device_reset_forgets_fids(dev: P9) -> None:
    dev.request(msg(p9.TATTACH, struct.pack("<II", 0, p9.NOFID) + s("") + s("") + b"\0" * 4))
    dev.drv.set_status(0)
    assert not dev.drv.status & DeviceStatus.DRIVER_OK
    assert dev.export.serve(2, p9.Tgetattr(0, 0), 100) == p9.rlerror(2, errno.EBADF)
