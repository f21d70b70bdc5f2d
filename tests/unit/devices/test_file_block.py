"""The raw-image BlockBackend and virtio-blk's device spec (the I/O edge of §5.2)."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from devserver.backends import file_block
from devserver.backends.file_block import FileBlockBackend, open_block_backends
from devserver.config import build_bus, parse_device_spec
from devserver.devices.blk import VirtioBlk
from devserver.errors import BackendError, ConfigError
from devserver.virtio.pci_transport import VirtioPciFunction


def image(tmp_path: Path, size: int = 1 << 20, name: str = "disk.img") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\xaa" * size)
    return path


def test_read_write_flush_zeroes_discard(tmp_path: Path) -> None:
    backend = FileBlockBackend(str(image(tmp_path)))
    try:
        assert (backend.size, backend.read_only) == (1 << 20, False)
        backend.write(4096, b"hello" * 100)
        assert backend.read(4096, 500) == b"hello" * 100
        backend.flush()
        backend.write_zeroes(8192, 8192, unmap=False)
        assert backend.read(8192, 8192) == bytes(8192)
        assert backend.read(16384, 4) == b"\xaa" * 4
        backend.discard(0, 4096)  # a hint: any content is allowed afterwards
        assert len(backend.read(0, 4096)) == 4096
    finally:
        backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.read(0, 1)
    backend.close()  # twice is fine


def allocated(path: Path) -> int:
    """Bytes the host filesystem holds for the file (st_blocks is in 512-byte units)."""
    return path.stat().st_blocks * 512


def test_discard_and_unmapping_write_zeroes_free_blocks(tmp_path: Path) -> None:
    path = image(tmp_path, 4 << 20)
    backend = FileBlockBackend(str(path))
    try:
        full = allocated(path)
        backend.discard(0, 1 << 20)
        after_discard = allocated(path)
        assert after_discard <= full - (1 << 20)
        backend.write_zeroes(1 << 20, 1 << 20, unmap=True)
        assert allocated(path) <= after_discard - (1 << 20)
        assert backend.read(1 << 20, 1 << 20) == bytes(1 << 20)
        # Without unmap the range reads zeroes but keeps its blocks.
        before = allocated(path)
        backend.write_zeroes(2 << 20, 1 << 20, unmap=False)
        assert backend.read(2 << 20, 1 << 20) == bytes(1 << 20)
        assert allocated(path) == before
        assert backend.read(3 << 20, 4) == b"\xaa" * 4
        assert path.stat().st_size == 4 << 20  # KEEP_SIZE
    finally:
        backend.close()


def test_write_zeroes_without_fallocate_writes_zeroes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(file_block, "fallocate", refuse)
    backend = FileBlockBackend(str(image(tmp_path)))
    try:
        backend.discard(0, 4096)  # a hint: nothing happens, no error
        assert backend.read(0, 4) == b"\xaa" * 4
        backend.write_zeroes(4096, 8192, unmap=True)
        assert backend.read(4096, 8192) == bytes(8192)
        assert backend.read(12288, 4) == b"\xaa" * 4
    finally:
        backend.close()


def test_read_only_image(tmp_path: Path) -> None:
    backend = FileBlockBackend(str(image(tmp_path)), read_only=True)
    try:
        assert backend.read_only
        with pytest.raises(OSError):
            backend.write(0, b"x")
    finally:
        backend.close()


def test_unusable_images_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open disk image"):
        FileBlockBackend(str(tmp_path / "missing.img"))
    with pytest.raises(ConfigError, match="not a multiple of 512"):
        FileBlockBackend(str(image(tmp_path, 1000)))
    with pytest.raises(ConfigError, match="cannot open disk image"):
        FileBlockBackend(str(tmp_path))  # a directory
    with pytest.raises(ConfigError, match="not a regular file"):
        FileBlockBackend("/dev/null", read_only=True)


def test_device_spec_builds_a_virtio_blk(tmp_path: Path) -> None:
    path = image(tmp_path)
    specs = [parse_device_spec(f"virtio-blk,path={path},readonly=on,serial=abc")]
    backends = open_block_backends(specs)
    try:
        assert backends[0].read_only
        (_, function), *_ = [(s, f) for s, f in build_bus(specs, block_backends=backends)]
        assert isinstance(function, VirtioPciFunction)
        assert function.name == "virtio-blk0"
    finally:
        for backend in backends.values():
            backend.close()


def test_device_spec_discard_and_queues(tmp_path: Path) -> None:
    path = image(tmp_path)
    specs = [parse_device_spec(f"virtio-blk,path={path},discard=off,num-queues=4")]
    backends = open_block_backends(specs)
    try:
        (_, function), *_ = [(s, f) for s, f in build_bus(specs, block_backends=backends)]
        assert isinstance(function, VirtioPciFunction)
        assert isinstance(function.device, VirtioBlk)
        assert (function.device.discard, function.num_queues) == (False, 4)
        assert function.msix is not None and function.msix.vectors == 5  # 4 queues + config
    finally:
        for backend in backends.values():
            backend.close()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("virtio-blk", "needs path="),
        ("virtio-blk,path=/nonexistent/x.img", "cannot open disk image"),
        ("virtio-blk,path=IMG,readonly=yes", "readonly=on or readonly=off"),
        ("virtio-blk,path=IMG,serial=" + "s" * 21, "longer than 20"),
        ("virtio-blk,path=IMG,discard=yes", "discard=on or discard=off"),
        ("virtio-blk,path=IMG,num-queues=0", "not 1..16"),
        ("virtio-blk,path=IMG,num-queues=17", "not 1..16"),
        ("virtio-blk,path=IMG,num-queues=two", "not a number"),
    ],
)
def test_bad_device_specs(tmp_path: Path, spec: str, match: str) -> None:
    spec = spec.replace("IMG", str(image(tmp_path)))
    with pytest.raises(ConfigError, match=match):
        open_block_backends([parse_device_spec(spec)])


def test_a_failing_spec_closes_the_images_opened_before_it(tmp_path: Path) -> None:
    good = image(tmp_path)
    specs = [
        parse_device_spec(f"virtio-blk,path={good}"),
        parse_device_spec(f"virtio-blk,path={image(tmp_path, 1000, 'bad.img')}"),
    ]
    with pytest.raises(ConfigError, match="multiple of 512"):
        open_block_backends(specs)


def test_build_without_a_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match="not opened"):
        build_bus([parse_device_spec("virtio-blk,path=/x.img")])


# -- cache=none / directsync: O_DIRECT through the bounce buffer


def direct_or_skip(tmp_path: Path) -> None:
    """Skip, saying why, where tmp_path's filesystem refuses O_DIRECT."""
    probe = image(tmp_path, 4096, "probe.img")
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        reason = f"{tmp_path} refuses O_DIRECT ({e.strerror}): the direct path is untested here"
        print(reason)
        pytest.skip(reason)
    os.close(fd)


@pytest.fixture(params=["probed", 4096])
def direct_block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | int:
    """The filesystem's own direct-I/O block, or 4096 forced (a 4Kn disk's), so
    the read-modify-write of partial blocks is exercised on any filesystem."""
    block: str | int = request.param
    if block == 4096:
        monkeypatch.setattr(file_block, "_direct_block", lambda *args: 4096)
    return block


def flags(backend: FileBlockBackend) -> int:
    fd = backend._fd
    assert fd is not None
    return fcntl.fcntl(fd, fcntl.F_GETFL)


@pytest.mark.parametrize("cache", ["none", "directsync"])
def test_direct_io_matches_a_byte_model(
    tmp_path: Path, cache: str, direct_block: str | int
) -> None:
    direct_or_skip(tmp_path)
    size = 4 << 20
    rng = random.Random(12)
    model = bytearray(rng.randbytes(size))
    path = tmp_path / "disk.img"
    path.write_bytes(model)
    backend = FileBlockBackend(str(path), cache=cache)
    try:
        assert flags(backend) & os.O_DIRECT
        assert bool(flags(backend) & os.O_DSYNC) == (cache == "directsync")
        block = backend.block_size
        assert block in (512, 4096) and (direct_block == "probed" or block == 4096)
        # Aligned, sector-aligned but not block-aligned, byte-misaligned, one
        # block's inside, and longer than the bounce buffer (several steps).
        cases = [
            (0, 4096),
            (512, 1024),
            (4096 + 512, 3 * 512),
            (100, 700),
            (4095, 2),
            (8192 + 1, 4096 * 3),
            (512, file_block.BOUNCE_SIZE + 8192 + 512),
            (size - 512, 512),
            (size - 4096 - 7, 4096 + 7),
        ]
        for offset, length in cases:
            data = rng.randbytes(length)
            backend.write(offset, data)
            model[offset : offset + length] = data
            assert backend.read(offset, length) == data
            lo, hi = max(0, offset - 5000), min(size, offset + length + 5000)
            assert backend.read(lo, hi - lo) == bytes(model[lo:hi]), (offset, length)
        assert backend.read(0, size) == bytes(model)
        backend.flush()
        assert path.stat().st_size == size  # never grown by a widened write
    finally:
        backend.close()
    assert backend._bounce is None
    assert path.read_bytes() == bytes(model)  # what a buffered reader sees


@pytest.mark.parametrize("punch", [True, False])
def test_direct_io_discard_and_write_zeroes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, punch: bool, direct_block: str | int
) -> None:
    direct_or_skip(tmp_path)
    if not punch:  # no fallocate: WRITE_ZEROES writes zeroes through the bounce buffer

        def refuse(fd: int, mode: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "not here")

        monkeypatch.setattr(file_block, "fallocate", refuse)
    backend = FileBlockBackend(str(image(tmp_path, 4 << 20)), cache="none")
    try:
        backend.discard(0, 1 << 20)
        backend.write_zeroes(1 << 20, 1 << 20, unmap=True)
        backend.write_zeroes((2 << 20) + 512, 3 * 512, unmap=False)
        assert backend.read(1 << 20, 1 << 20) == bytes(1 << 20)
        assert backend.read(2 << 20, 512) == b"\xaa" * 512
        assert backend.read((2 << 20) + 512, 3 * 512) == bytes(3 * 512)
        assert backend.read((2 << 20) + 2048, 8) == b"\xaa" * 8
    finally:
        backend.close()


def test_direct_read_only_and_spec(tmp_path: Path) -> None:
    direct_or_skip(tmp_path)
    path = image(tmp_path)
    specs = [parse_device_spec(f"virtio-blk,path={path},readonly=on,cache=directsync")]
    backends = open_block_backends(specs)
    try:
        backend = backends[0]
        assert (backend.cache, backend.read_only) == ("directsync", True)
        assert backend.read(512, 4) == b"\xaa" * 4
        with pytest.raises(OSError):
            backend.write(0, b"x" * 512)
        (_, function), *_ = [(s, f) for s, f in build_bus(specs, block_backends=backends)]
        assert isinstance(function, VirtioPciFunction)
        assert isinstance(function.device, VirtioBlk)
        assert not function.device.write_cache  # directsync: write-through, no FLUSH
    finally:
        for backend in backends.values():
            backend.close()


def test_a_filesystem_without_o_direct_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # open(2) says EINVAL: "The filesystem does not support the O_DIRECT flag"
    # (tmpfs before Linux 6.6, some FUSE and network filesystems).
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    path = image(tmp_path)
    with pytest.raises(ConfigError, match=r"does not support O_DIRECT.*use cache=writeback"):
        FileBlockBackend(str(path), cache="none")
    FileBlockBackend(str(path)).close()  # writeback still opens it


def test_tmpfs_either_takes_o_direct_or_is_refused_clearly() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    path = shm / f"devmodel-test-{os.getpid()}.img"
    path.write_bytes(bytes(8192))
    try:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
        except OSError:
            with pytest.raises(ConfigError, match=r"does not support O_DIRECT.*cache=writeback"):
                FileBlockBackend(str(path), cache="none")
            return
        # Linux >= 6.6 tmpfs takes O_DIRECT (its page cache is the file itself).
        print("this kernel's tmpfs accepts O_DIRECT; cache=none works on it")
        backend = FileBlockBackend(str(path), cache="none")
        try:
            backend.write(512, b"t" * 512)
            assert backend.read(0, 1024) == bytes(512) + b"t" * 512
        finally:
            backend.close()
    finally:
        path.unlink()


def test_direct_block_probe_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct_or_skip(tmp_path)
    real_preadv = os.preadv
    refused: list[int] = []

    def only_4k(fd: int, buffers: list[memoryview], offset: int) -> int:
        if (offset | sum(len(b) for b in buffers)) % 4096:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", only_4k)
    backend = FileBlockBackend(str(image(tmp_path, 1 << 20)), cache="none")
    try:
        assert backend.block_size == 4096 and refused == [0]
        backend.write(512, b"z" * 512)  # a partial block: read-modify-write, all 4 KiB
        assert backend.read(0, 1536) == b"\xaa" * 512 + b"z" * 512 + b"\xaa" * 512
    finally:
        backend.close()
    with pytest.raises(ConfigError, match=r"not a multiple of the 4096-byte block.*writeback"):
        FileBlockBackend(str(image(tmp_path, 4096 + 512, "odd.img")), cache="none")

    def never(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "preadv", never)
    with pytest.raises(ConfigError, match=r"refuses O_DIRECT.*use cache=writeback"):
        FileBlockBackend(str(image(tmp_path)), cache="directsync")


def test_bad_cache_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="writeback, none, directsync"):
        parse_device_spec_and_open(f"virtio-blk,path={image(tmp_path)},cache=unsafe")
    with pytest.raises(ConfigError, match="writeback, none, directsync"):
        FileBlockBackend(str(image(tmp_path)), cache="unsafe")


def parse_device_spec_and_open(spec: str) -> None:
    for backend in open_block_backends([parse_device_spec(spec)]).values():
        backend.close()


@pytest.mark.root
def test_a_4k_sector_block_device_gives_4k_blocks(tmp_path: Path) -> None:
    """A block device says its logical sector size (BLKSSZGET): a 4Kn loop
    device gives 4 KiB blocks, partial ones written by read-modify-write, and
    the device offers blk_size=4096."""
    losetup = shutil.which("losetup")
    if os.geteuid() != 0 or losetup is None:
        pytest.skip("needs root and losetup for a loop device")
    backing = image(tmp_path, 1 << 20, "loop.img")
    made = subprocess.run(
        [losetup, "--find", "--show", "--sector-size", "4096", str(backing)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        reason = f"no loop device here: {made.stderr.strip()}"
        print(reason)
        pytest.skip(reason)
    device = made.stdout.strip()
    try:
        backend = FileBlockBackend(device, cache="none")
        try:
            assert (backend.size, backend.block_size) == (1 << 20, 4096)
            backend.write(512, b"k" * 512)
            assert backend.read(0, 1536) == b"\xaa" * 512 + b"k" * 512 + b"\xaa" * 512
            blk = VirtioBlk(backend)
            assert blk.block_size == 4096 and blk.capacity == (1 << 20) // 512
        finally:
            backend.close()
    finally:
        subprocess.run([losetup, "-d", device], check=False)


def test_direct_io_after_the_bounce_buffer_went_is_a_backend_error(tmp_path: Path) -> None:
    # A worker still in a request while the server stops and closes the disk.
    direct_or_skip(tmp_path)
    backend = FileBlockBackend(str(image(tmp_path)), cache="none")
    try:
        bounce = backend._bounce
        assert bounce is not None
        bounce.close()
        with pytest.raises(BackendError, match="closed"):
            backend.read(0, 512)
        with pytest.raises(BackendError, match="closed"):
            backend.write(0, b"x" * 512)
    finally:
        backend.close()
    held = FileBlockBackend(str(image(tmp_path, name="held.img")), cache="none")
    assert held._bounce is not None
    view = memoryview(held._bounce)
    held.close()  # no BufferError: the mapping goes with the view
    view.release()


def test_close_waits_for_the_transfer_in_progress(tmp_path: Path) -> None:
    """The descriptor is closed only after a worker's pread/pwrite on it ends: a
    number closed under it could be reused by another open and take its write."""
    backend = FileBlockBackend(str(image(tmp_path)))
    closed = threading.Event()

    def close() -> None:
        backend.close()
        closed.set()

    with backend._io:  # a worker inside a transfer
        closer = threading.Thread(target=close)
        closer.start()
        assert not closed.wait(0.2)
        assert backend._fd is not None
    closer.join(10)
    assert closed.is_set() and backend._fd is None
    with pytest.raises(BackendError, match="closed"):
        backend.read(0, 512)
