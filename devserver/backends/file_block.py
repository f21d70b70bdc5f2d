"""A raw disk image file as a BlockBackend (ports.py; virtio 1.2 §5.2 Block Device).

Positional I/O only (os.pread/os.pwrite), so no shared file offset exists for
two calls to race on. DISCARD and WRITE_ZEROES with unmap punch holes
(fallocate PUNCH_HOLE|KEEP_SIZE: the blocks go back to the host filesystem and
the range reads zeroes); WRITE_ZEROES without unmap keeps the blocks allocated
(fallocate ZERO_RANGE|KEEP_SIZE, as QEMU's file-posix does). A filesystem that
cannot do either gets zeroes written for WRITE_ZEROES and nothing for DISCARD
(a hint the device may ignore, §5.2.6.2).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence
from typing import Final

from ..config import DeviceSpec, block_options
from ..errors import BackendError, ConfigError

SECTOR_SIZE: Final = 512
_ZERO_CHUNK: Final = 1 << 20
# linux/falloc.h
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10
# What a filesystem without the fallocate mode answers (the mode is then off for good).
_UNSUPPORTED: Final = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    # int fallocate(int fd, int mode, off_t offset, off_t len); Python 3.11's os has none.
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError(ENOSYS) where libc has none."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBlockBackend:
    """An open image file; `close()` releases it."""

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as e:
            mode = "read-only" if read_only else "read-write"
            raise ConfigError(f"cannot open disk image {path!r} {mode}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            else:
                raise ConfigError(f"disk image {path!r} is not a regular file or block device")
            if size % SECTOR_SIZE:
                raise ConfigError(
                    f"disk image {path!r} is {size} bytes, not a multiple of 512; "
                    f"pad it (truncate -s %512 {path})"
                )
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self._fd: int | None = fd
        self._size = size
        self._read_only = read_only
        self._can_punch = True
        self._can_zero_range = True

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _open_fd(self) -> int:
        if self._fd is None:
            raise BackendError(f"disk image {self.path!r} is closed")
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        fd = self._open_fd()
        parts: list[bytes] = []
        done = 0
        while done < length:
            data = os.pread(fd, length - done, offset + done)
            if not data:  # the file shrank under us: the rest reads as zeroes
                parts.append(bytes(length - done))
                break
            parts.append(data)
            done += len(data)
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        fd = self._open_fd()
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def flush(self) -> None:
        os.fsync(self._open_fd())

    def _punch(self, offset: int, length: int) -> bool:
        if not self._can_punch:
            return False
        try:
            fallocate(self._open_fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self._can_punch = False
                return False
            raise
        return True

    def _zero_range(self, offset: int, length: int) -> bool:
        if not self._can_zero_range:
            return False
        try:
            fallocate(self._open_fd(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self._can_zero_range = False
                return False
            raise
        return True

    def discard(self, offset: int, length: int) -> None:
        self._punch(offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        # A punched hole reads zeroes and frees the blocks: what unmap allows.
        if unmap and self._punch(offset, length):
            return
        if self._zero_range(offset, length):
            return
        zeroes = bytes(min(_ZERO_CHUNK, length))
        done = 0
        while done < length:
            take = min(_ZERO_CHUNK, length - done)
            self.write(offset + done, zeroes[:take])
            done += take

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_block_backends(specs: Sequence[DeviceSpec]) -> dict[int, FileBlockBackend]:
    """Open the image of every virtio-blk spec (by spec index), or ConfigError
    with every one opened so far closed again."""
    opened: dict[int, FileBlockBackend] = {}
    try:
        for i, spec in enumerate(specs):
            if spec.type == "virtio-blk":
                options = block_options(spec.options)
                opened[i] = FileBlockBackend(options.path, read_only=options.readonly)
    except BaseException:
        for backend in opened.values():
            backend.close()
        raise
    return opened
