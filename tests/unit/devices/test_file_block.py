"""The raw-image BlockBackend and virtio-blk's device spec (the I/O edge of §5.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    import errno

    from devserver.backends import file_block

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
