"""A small writer and reader for the cpio "newc" format, the one the Linux initramfs uses.

Pure Python so that building the test guest needs no cpio binary and no root:
device nodes and ownership are written into the headers, not created on disk.
Output is deterministic (fixed mtime, inode numbers in write order), so the
same inputs give the same archive.

Format (Documentation/driver-api/early-userspace/buffer-format.rst): a 110-byte
ASCII header, "070701" then 13 fields of 8 hex digits, then the NUL-terminated
name padded to 4 bytes, then the data padded to 4 bytes; the archive ends with
an entry named "TRAILER!!!". The kernel does not create missing parent
directories, so the writer adds them before their contents.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["TRAILER", "CpioEntry", "CpioError", "CpioWriter", "read_cpio"]

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_LEN = 110


class CpioError(ValueError):
    """A malformed archive or an entry the writer cannot represent."""


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    ino: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_chardev(self) -> bool:
        return stat.S_ISCHR(self.mode)

    @property
    def link_target(self) -> str:
        if not self.is_symlink:
            raise CpioError(f"{self.name} is not a symlink")
        return self.data.decode()


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _normalize(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise CpioError(f"bad archive path {path!r}")
    return "/".join(parts)


class CpioWriter:
    """Writes a newc archive to a binary stream. Call close() to write the trailer.

    Paths may be given with or without a leading slash; they are stored
    relative ("bin/sh"), which is what the kernel and `cpio -t` expect.
    Parent directories are emitted automatically (mode 0755) the first time a
    path below them is added. Adding the same path twice is an error: the
    kernel would keep the later one, and a builder that does that has a bug.
    """

    def __init__(self, out: BinaryIO, *, mtime: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._ino = 0
        self._names: set[str] = set()
        self._dirs: set[str] = set()
        self._closed = False

    def _header(self, entry: CpioEntry) -> bytes:
        name = entry.name.encode() + b"\0"
        fields = (
            entry.ino,
            entry.mode,
            entry.uid,
            entry.gid,
            entry.nlink,
            entry.mtime,
            len(entry.data),
            0,  # devmajor: of the filesystem the file came from; meaningless here
            0,
            entry.rdevmajor,
            entry.rdevminor,
            len(name),
            0,  # check: only used by the "crc" variant (070702)
        )
        for v in fields:
            if not 0 <= v <= 0xFFFFFFFF:
                raise CpioError(f"{entry.name}: header field {v} out of range")
        head = MAGIC + b"".join(b"%08X" % v for v in fields)
        return head + name + b"\0" * _pad4(len(head) + len(name))

    def _emit(self, name: str, mode: int, data: bytes, nlink: int, rdev: tuple[int, int]) -> None:
        if self._closed:
            raise CpioError("archive already closed")
        if name in self._names:
            raise CpioError(f"duplicate archive path {name!r}")
        self._names.add(name)
        self._ino += 1
        entry = CpioEntry(
            name=name,
            mode=mode,
            data=data,
            nlink=nlink,
            mtime=self._mtime,
            ino=self._ino,
            rdevmajor=rdev[0],
            rdevminor=rdev[1],
        )
        self._out.write(self._header(entry))
        self._out.write(data)
        self._out.write(b"\0" * _pad4(len(data)))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                if d in self._names:
                    raise CpioError(f"{d!r} is not a directory, but {name!r} is below it")
                self._dirs.add(d)
                self._emit(d, stat.S_IFDIR | 0o755, b"", 2, (0, 0))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = _normalize(path)
        if name in self._dirs:
            return  # implied earlier by a child; mkdir -p semantics
        self._parents(name)
        self._dirs.add(name)
        self._emit(name, stat.S_IFDIR | (mode & 0o7777), b"", 2, (0, 0))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = _normalize(path)
        self._parents(name)
        self._emit(name, stat.S_IFREG | (mode & 0o7777), data, 1, (0, 0))

    def add_symlink(self, path: str, target: str) -> None:
        name = _normalize(path)
        if not target:
            raise CpioError(f"{name}: empty symlink target")
        self._parents(name)
        self._emit(name, stat.S_IFLNK | 0o777, target.encode(), 1, (0, 0))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = _normalize(path)
        self._parents(name)
        self._emit(name, stat.S_IFCHR | (mode & 0o7777), b"", 1, (major, minor))

    def close(self) -> None:
        """Writes the trailer. The stream itself is the caller's to close."""
        if self._closed:
            return
        self._emit(TRAILER, 0, b"", 1, (0, 0))
        self._closed = True


def read_cpio(data: bytes, *, all_archives: bool = True) -> list[CpioEntry]:
    """Parses newc archives (uncompressed) into entries, trailers left out.

    With all_archives, parsing goes on after a trailer, skipping NUL padding,
    like the kernel does with concatenated initramfs archives.
    """
    entries: list[CpioEntry] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            pos += 1
            continue
        if data[pos : pos + 6] != MAGIC:
            raise CpioError(f"bad magic {data[pos : pos + 6]!r} at offset {pos}")
        if pos + HEADER_LEN > len(data):
            raise CpioError(f"truncated header at offset {pos}")
        try:
            f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as e:
            raise CpioError(f"bad header field at offset {pos}") from e
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = f
        name_start = pos + HEADER_LEN
        name_end = name_start + namesize
        if namesize < 1 or name_end > len(data) or data[name_end - 1] != 0:
            raise CpioError(f"bad name at offset {pos}")
        name = data[name_start : name_end - 1].decode()
        data_start = name_end + _pad4(name_end - pos)
        data_end = data_start + size
        if data_end > len(data):
            raise CpioError(f"truncated data of {name!r}")
        pos = data_end + _pad4(size)
        if name == TRAILER:
            if not all_archives:
                break
            continue
        entries.append(
            CpioEntry(
                name=name,
                mode=mode,
                data=data[data_start:data_end],
                uid=uid,
                gid=gid,
                nlink=nlink,
                mtime=mtime,
                ino=ino,
                rdevmajor=rmaj,
                rdevminor=rmin,
            )
        )
    return entries
