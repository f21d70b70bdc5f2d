"""A raw disk image file as a BlockBackend (ports.py; virtio 1.2 §5.2 Block Device).

Positional I/O only (os.pread/os.pwrite), so no shared file offset exists for
two calls to race on. DISCARD and WRITE_ZEROES with unmap punch holes
(fallocate PUNCH_HOLE|KEEP_SIZE: the blocks go back to the host filesystem and
the range reads zeroes); WRITE_ZEROES without unmap keeps the blocks allocated
(fallocate ZERO_RANGE|KEEP_SIZE, as QEMU's file-posix does). A filesystem that
cannot do either gets zeroes written for WRITE_ZEROES and nothing for DISCARD
(a hint the device may ignore, §5.2.6.2).

Cache modes (QEMU's `cache=` meanings, so a comparison with QEMU's built-in
drive is like for like):
- `writeback` (the default): buffered I/O through the host page cache; a write
  is durable after the guest's FLUSH (fsync).
- `none`: O_DIRECT, the host page cache is bypassed; a write still needs the
  guest's FLUSH to be durable (the disk's own cache).
- `directsync`: O_DIRECT|O_DSYNC, every write is durable when it completes.

O_DIRECT wants the file offset, the length and the buffer aligned to the
file's direct-I/O block (512 or 4096 bytes: BLKSSZGET for a block device, a
probe read for a file). Every direct transfer goes through one page-aligned
bounce buffer (an anonymous mmap of BOUNCE_SIZE bytes, made once): the range
is widened to whole blocks, a partial first or last block of a write is read
first (read-modify-write), and a longer request takes several steps, so a
guest's lengths never decide what is allocated. The image's size must be a
multiple of the block, or the last block could not be written without growing
the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Sequence
from typing import Final

from ..config import CACHE_MODES, DeviceSpec, block_options
from ..errors import BackendError, ConfigError

SECTOR_SIZE: Final = 512
_ZERO_CHUNK: Final = 1 << 20
# The largest direct-I/O block we align to (4Kn disks); a larger one is refused.
MAX_DIRECT_BLOCK: Final = 4096
# One request step of the device (blk.CHUNK, 1 MiB) plus a block either side,
# so an aligned or sector-aligned megabyte is one system call.
BOUNCE_SIZE: Final = (1 << 20) + 2 * MAX_DIRECT_BLOCK
BLKSSZGET: Final = 0x1268  # linux/fs.h: a block device's logical sector size
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


def _cache_flags(cache: str) -> int:
    if cache == "writeback":
        return 0
    if cache == "none":
        return os.O_DIRECT
    if cache == "directsync":
        return os.O_DIRECT | os.O_DSYNC
    raise ConfigError(f"virtio-blk cache={cache!r}: use one of {', '.join(CACHE_MODES)}")


def _direct_block(fd: int, path: str, st: os.stat_result, bounce: mmap.mmap) -> int:
    """The alignment O_DIRECT needs on `fd`: a block device says (BLKSSZGET); a
    file is probed with a one-sector read at offset 0 (a filesystem checks the
    alignment before anything else, EINVAL when it is too small)."""
    if stat.S_ISBLK(st.st_mode):
        raw = fcntl.ioctl(fd, BLKSSZGET, bytes(4))
        block = int(struct.unpack("=i", raw)[0])
        if block < SECTOR_SIZE or block > MAX_DIRECT_BLOCK or block & (block - 1):
            raise ConfigError(
                f"disk image {path!r} has {block}-byte sectors; direct I/O here takes "
                f"512..{MAX_DIRECT_BLOCK}; use cache=writeback"
            )
        return block
    view = memoryview(bounce)
    try:
        for block in (SECTOR_SIZE, MAX_DIRECT_BLOCK):
            try:
                os.preadv(fd, [view[:block]], 0)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise ConfigError(f"cannot read disk image {path!r}: {e.strerror}") from None
                continue
            return block
    finally:
        view.release()
    raise ConfigError(
        f"the filesystem holding disk image {path!r} refuses O_DIRECT reads of "
        f"{SECTOR_SIZE} and {MAX_DIRECT_BLOCK} bytes; use cache=writeback"
    )


class FileBlockBackend:
    """An open image file; `close()` releases it.

    `cache` is QEMU's: writeback (buffered), none (O_DIRECT) or directsync
    (O_DIRECT|O_DSYNC); see the module docstring."""

    def __init__(self, path: str, *, read_only: bool = False, cache: str = "writeback") -> None:
        direct = _cache_flags(cache)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | direct
        try:
            fd = os.open(path, flags)
        except OSError as e:
            mode = "read-only" if read_only else "read-write"
            if direct and e.errno == errno.EINVAL:
                # open(2): "The filesystem does not support the O_DIRECT flag."
                raise ConfigError(
                    f"cannot open disk image {path!r} with cache={cache}: its filesystem "
                    "does not support O_DIRECT (host page cache bypass); use cache=writeback"
                ) from None
            raise ConfigError(f"cannot open disk image {path!r} {mode}: {e.strerror}") from None
        bounce: mmap.mmap | None = None
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
            block = SECTOR_SIZE
            if direct:
                bounce = mmap.mmap(-1, BOUNCE_SIZE)  # anonymous: page-aligned, zeroed
                block = _direct_block(fd, path, st, bounce)
                if size % block:
                    raise ConfigError(
                        f"disk image {path!r} is {size} bytes, not a multiple of the "
                        f"{block}-byte block direct I/O needs on it; pad it "
                        f"(truncate -s %{block} {path}) or use cache=writeback"
                    )
        except BaseException:
            if bounce is not None:
                bounce.close()
            os.close(fd)
            raise
        self.path = path
        self.cache = cache
        self._fd: int | None = fd
        self._size = size
        self._read_only = read_only
        self._block = block
        self._bounce = bounce
        self._can_punch = True
        self._can_zero_range = True
        # Held by every transfer and by close(): the descriptor (and the bounce
        # buffer) must not be closed, and its number reused by another open,
        # while a worker thread is still inside a pread/pwrite on it.
        self._io = threading.RLock()

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def block_size(self) -> int:
        """The alignment that goes straight to the file (512 when buffered)."""
        return self._block

    def _open_fd(self) -> int:
        if self._fd is None:
            raise BackendError(f"disk image {self.path!r} is closed")
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        with self._io:
            return self._read(offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        fd = self._open_fd()
        if self._bounce is not None:
            try:
                return self._read_direct(fd, self._bounce, offset, length)
            except ValueError:  # the bounce buffer closed under us (server stopping)
                raise BackendError(f"disk image {self.path!r} is closed") from None
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
        with self._io:
            self._write(offset, data)

    def _write(self, offset: int, data: bytes) -> None:
        fd = self._open_fd()
        if self._bounce is not None:
            try:
                self._write_direct(fd, self._bounce, offset, data)
            except ValueError:  # the bounce buffer closed under us (server stopping)
                raise BackendError(f"disk image {self.path!r} is closed") from None
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    # -- O_DIRECT through the bounce buffer

    def _span(self, pos: int, end: int) -> tuple[int, int]:
        """The block-aligned file range [start, stop) of the next step covering
        `pos`, at most BOUNCE_SIZE bytes, ending at `end` rounded up."""
        mask = self._block - 1
        start = pos & ~mask
        stop = min((end + mask) & ~mask, start + BOUNCE_SIZE)
        return start, stop

    def _fill(self, fd: int, bounce: mmap.mmap, at: int, start: int, length: int) -> int:
        """Read `length` aligned bytes at file offset `start` into bounce[at:];
        bytes read (short only at the end of the file)."""
        view = memoryview(bounce)
        try:
            done = 0
            while done < length:
                n = os.preadv(fd, [view[at + done : at + length]], start + done)
                if n <= 0:
                    break
                done += n
                if done % self._block:  # a short read mid-block: end of file
                    break
            return done
        finally:
            view.release()

    def _read_direct(self, fd: int, bounce: mmap.mmap, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        end = offset + length
        pos = offset
        while pos < end:
            start, stop = self._span(pos, end)
            got = self._fill(fd, bounce, 0, start, stop - start)
            have = min(end, start + got)
            if have <= pos:  # the file shrank under us: the rest reads as zeroes
                parts.append(bytes(end - pos))
                break
            parts.append(bounce[pos - start : have - start])
            pos = have
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _write_direct(self, fd: int, bounce: mmap.mmap, offset: int, data: bytes) -> None:
        source = memoryview(data)
        end = offset + len(data)
        pos = offset
        block = self._block
        while pos < end:
            start, stop = self._span(pos, end)
            last = min(end, stop)  # this step's bytes of `data`: [pos, last)
            if pos != start:  # a partial first block keeps the bytes before pos
                self._fill(fd, bounce, 0, start, block)
            if last != stop and (last - start > block or pos == start):
                # A partial last block (not the first one, already read) keeps
                # the bytes after `last`.
                self._fill(fd, bounce, stop - block - start, stop - block, block)
            bounce[pos - start : last - start] = source[pos - offset : last - offset]
            view = memoryview(bounce)
            try:
                done = 0
                while done < stop - start:
                    n = os.pwritev(fd, [view[done : stop - start]], start + done)
                    if n <= 0:
                        raise BackendError(f"disk image {self.path!r}: a write made no progress")
                    done += n
            finally:
                view.release()
            pos = last

    def flush(self) -> None:
        with self._io:
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
        with self._io:
            self._punch(offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        with self._io:
            self._write_zeroes(offset, length, unmap=unmap)

    def _write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        # A punched hole reads zeroes and frees the blocks: what unmap allows.
        if unmap and self._punch(offset, length):
            return
        if self._zero_range(offset, length):
            return
        zeroes = bytes(min(_ZERO_CHUNK, length))
        done = 0
        while done < length:
            take = min(_ZERO_CHUNK, length - done)
            self._write(offset + done, zeroes[:take])
            done += take

    def close(self) -> None:
        with self._io:  # after the transfer in progress, if any (one bounded step)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            bounce, self._bounce = self._bounce, None
            if bounce is not None:
                # A view still held elsewhere (BufferError): the mapping goes with it.
                with contextlib.suppress(BufferError):
                    bounce.close()


def open_block_backends(specs: Sequence[DeviceSpec]) -> dict[int, FileBlockBackend]:
    """Open the image of every virtio-blk spec (by spec index), or ConfigError
    with every one opened so far closed again."""
    opened: dict[int, FileBlockBackend] = {}
    try:
        for i, spec in enumerate(specs):
            if spec.type == "virtio-blk":
                options = block_options(spec.options)
                opened[i] = FileBlockBackend(
                    options.path, read_only=options.readonly, cache=options.cache
                )
    except BaseException:
        for backend in opened.values():
            backend.close()
        raise
    return opened
