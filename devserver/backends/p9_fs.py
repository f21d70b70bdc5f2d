"""A host directory exported over 9P2000.L (the file-system half of virtio-9p;
devserver/devices/p9.py frames the messages and calls `serve`).

Security is the point (reliability.md C10): the guest never reaches outside
the export. A fid is a path of names below the export's root, each name
checked (not empty, no '/', no NUL, not '.' or '..': '..' is resolved here,
by dropping a name, and stops at the root). Every use re-resolves the path
from an fd of the root, one name at a time, with O_PATH|O_NOFOLLOW: a symlink
is never followed (opening through one fails ENOTDIR, opening one fails
ELOOP), so neither '..' nor an absolute or outward symlink, nor a directory
the host renamed meanwhile, leads anywhere but below the root. Symlinks the
guest creates are made as symlinks; only the guest follows them, in its own
namespace. No fd is held per walked fid (a guest's 4096 fids would exhaust
the server's fds); only opened fids hold one.

Fids are bounded (MAX_FIDS a session; past it, Rlerror EMFILE), reads and
directory listings are bounded by the reply's room, never by a count the
guest chose. Runs on the device's worker thread, never on the event loop.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..config import DeviceSpec, p9_options
from ..devices import p9_protocol as p9
from ..devices.p9 import check_tag
from ..errors import ConfigError

MAX_FIDS: Final = 4096
# Names below the root a fid may be (each use walks them all from the root:
# a bound on that walk's cost; Linux's own paths stop at PATH_MAX anyway).
MAX_DEPTH: Final = 256
# Bytes of directory listings (Rreaddir entries) held for all fids together.
MAX_LISTING_BYTES: Final = 16 << 20
# Tlopen/Tlcreate flags passed on (9P's P9_DOTL_* values are Linux's O_*):
# the access mode, TRUNC, APPEND, and the sync flags. Everything else the
# server decides (O_NOFOLLOW always; no O_CREAT from Tlopen; no O_PATH, ...).
_PASSED_FLAGS: Final = os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_DSYNC | os.O_SYNC
_WRITE_MODES: Final = (os.O_WRONLY, os.O_RDWR)
IOUNIT: Final = 0  # let the guest size its I/O by msize


class P9Error(Exception):
    """Answered Rlerror(errno)."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


@dataclass(slots=True)
class Fid:
    parts: tuple[str, ...]  # names below the root
    fd: int | None = None  # when opened (Tlopen, Tlcreate)
    entries: list[bytes] | None = None  # a directory listing, taken at offset 0
    xattr: bool = False  # a Txattrwalk fid (reads nothing)


def check_name(name: str) -> str:
    """A single path component the guest may create or look up."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise P9Error(errno.EINVAL)
    return name


def qid_of(st: os.stat_result) -> p9.Qid:
    if stat.S_ISDIR(st.st_mode):
        kind = p9.QTDIR
    elif stat.S_ISLNK(st.st_mode):
        kind = p9.QTSYMLINK
    else:
        kind = p9.QTFILE
    # st_dev in the top bits: an export spanning mounts keeps qid paths unique.
    return p9.Qid(kind, int(st.st_mtime_ns) & 0xFFFFFFFF, st.st_ino ^ (st.st_dev << 48))


class DirectoryExport:
    """One exported directory: the P9Export the shell gives a virtio-9p."""

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        try:
            self._root = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"virtio-9p path={path!r}: {e.strerror}") from None
        self.path = path
        self.read_only = read_only
        self._fids: dict[int, Fid] = {}
        # serve() runs on the device's worker thread; close() comes from the
        # shell at shutdown, maybe while one message is being served.
        self._lock = threading.Lock()

    # -- the port

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        fids, self._fids = self._fids, {}
        for fid in fids.values():
            if fid.fd is not None:
                os.close(fid.fd)

    def close(self) -> None:
        with self._lock:
            self._reset()
            if self._root >= 0:
                os.close(self._root)
                self._root = -1

    def serve(self, tag: int, message: p9.TMessage, limit: int) -> bytes:
        with self._lock:
            if self._root < 0:
                return p9.rlerror(tag, errno.EIO)  # closed: the server is stopping
            return self._serve_checked(tag, message, limit)

    def _serve_checked(self, tag: int, message: p9.TMessage, limit: int) -> bytes:
        try:
            return self._serve(tag, message, limit)
        except P9Error as e:
            return p9.rlerror(tag, e.code)
        except OSError as e:
            return p9.rlerror(tag, e.errno or errno.EIO)
        except (OverflowError, ValueError):  # an offset or mode past what the OS takes
            return p9.rlerror(tag, errno.EINVAL)

    # -- paths

    def _open_path(self, parts: Sequence[str]) -> int:
        """An O_PATH fd of `parts` below the root, no symlink followed."""
        fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root)
        try:
            for name in parts:
                # Through a symlink (an O_PATH fd of the link itself) this fails
                # ENOTDIR: nothing but the export's own directories is entered.
                nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _stat(self, parts: Sequence[str]) -> os.stat_result:
        fd = self._open_path(parts)
        try:
            return os.stat(fd)
        finally:
            os.close(fd)

    def _dir(self, parts: Sequence[str]) -> int:
        """An O_PATH fd of the directory `parts` (ENOTDIR otherwise)."""
        fd = self._open_path(parts)
        if not stat.S_ISDIR(os.stat(fd).st_mode):
            os.close(fd)
            raise P9Error(errno.ENOTDIR)
        return fd

    def _fid(self, number: int) -> Fid:
        fid = self._fids.get(number)
        if fid is None:
            raise P9Error(errno.EBADF)
        return fid

    def _new_fid(self, number: int, fid: Fid) -> None:
        if number == p9.NOFID:
            raise P9Error(errno.EBADF)
        old = self._fids.get(number)
        if old is None and len(self._fids) >= MAX_FIDS:
            raise P9Error(errno.EMFILE)
        if old is not None and old.fd is not None:
            os.close(old.fd)
        self._fids[number] = fid

    def _writable(self) -> None:
        if self.read_only:
            raise P9Error(errno.EROFS)

    # -- messages

    def _serve(self, tag: int, m: p9.TMessage, limit: int) -> bytes:
        match m:
            case p9.Tattach():
                if m.fid in self._fids:
                    raise P9Error(errno.EBADF)
                qid = qid_of(self._stat(()))
                self._new_fid(m.fid, Fid(()))
                return p9.rqid(p9.TATTACH, tag, qid)
            case p9.Twalk():
                return self._walk(tag, m)
            case p9.Tclunk():
                fid = self._fids.pop(m.fid, None)
                if fid is None:
                    raise P9Error(errno.EBADF)
                if fid.fd is not None:
                    os.close(fid.fd)
                return p9.rempty(p9.TCLUNK, tag)
            case p9.Tgetattr():
                fid = self._fid(m.fid)
                # An opened fid by its fd: a file unlinked or renamed since is still it.
                st = os.stat(fid.fd) if fid.fd is not None else self._stat(fid.parts)
                attr = p9.Attr(
                    st.st_mode,
                    st.st_uid,
                    st.st_gid,
                    st.st_nlink,
                    st.st_rdev,
                    st.st_size,
                    st.st_blksize,
                    st.st_blocks,
                    st.st_atime_ns,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                )
                return p9.rgetattr(tag, p9.GETATTR_BASIC, qid_of(st), attr)
            case p9.Tlopen():
                return self._lopen(tag, m)
            case p9.Tlcreate():
                return self._lcreate(tag, m)
            case p9.Tread():
                fid = self._fid(m.fid)
                if fid.xattr:
                    return p9.rdata(p9.TREAD, tag, b"")
                if fid.fd is None:
                    raise P9Error(errno.EBADF)
                count = min(m.count, limit - p9.IO_HEADER_SIZE)
                return p9.rdata(p9.TREAD, tag, os.pread(fid.fd, max(count, 0), m.offset))
            case p9.Twrite():
                fid = self._fid(m.fid)
                if fid.fd is None:
                    raise P9Error(errno.EBADF)
                self._writable()
                return p9.rwrite(tag, os.pwrite(fid.fd, m.data, m.offset))
            case p9.Treaddir():
                return self._readdir(tag, m, limit)
            case p9.Tmkdir():
                self._writable()
                dfd = self._dir(self._fid(m.dfid).parts)
                try:
                    name = check_name(m.name)
                    os.mkdir(name, m.mode & 0o7777, dir_fd=dfd)
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                finally:
                    os.close(dfd)
                return p9.rqid(p9.TMKDIR, tag, qid_of(st))
            case p9.Tsymlink():
                self._writable()
                dfd = self._dir(self._fid(m.fid).parts)
                try:
                    name = check_name(m.name)
                    if not m.target:
                        raise P9Error(errno.ENOENT)
                    # Made as a symlink, never followed by the server.
                    os.symlink(m.target, name, dir_fd=dfd)
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                finally:
                    os.close(dfd)
                return p9.rqid(p9.TSYMLINK, tag, qid_of(st))
            case p9.Treadlink():
                parts = self._fid(m.fid).parts
                if not parts:
                    raise P9Error(errno.EINVAL)
                dfd = self._dir(parts[:-1])
                try:
                    return p9.rreadlink(tag, os.readlink(parts[-1], dir_fd=dfd))
                finally:
                    os.close(dfd)
            case p9.Tlink():
                self._writable()
                target = self._fid(m.fid).parts
                if not target:
                    raise P9Error(errno.EPERM)
                sfd = self._dir(target[:-1])
                try:
                    dfd = self._dir(self._fid(m.dfid).parts)
                    try:
                        os.link(
                            target[-1],
                            check_name(m.name),
                            src_dir_fd=sfd,
                            dst_dir_fd=dfd,
                            follow_symlinks=False,
                        )
                    finally:
                        os.close(dfd)
                finally:
                    os.close(sfd)
                return p9.rempty(p9.TLINK, tag)
            case p9.Trenameat():
                self._writable()
                ofd = self._dir(self._fid(m.olddirfid).parts)
                try:
                    nfd = self._dir(self._fid(m.newdirfid).parts)
                    try:
                        os.rename(
                            check_name(m.oldname),
                            check_name(m.newname),
                            src_dir_fd=ofd,
                            dst_dir_fd=nfd,
                        )
                    finally:
                        os.close(nfd)
                finally:
                    os.close(ofd)
                self._renamed(
                    (*self._fid(m.olddirfid).parts, m.oldname),
                    (*self._fid(m.newdirfid).parts, m.newname),
                )
                return p9.rempty(p9.TRENAMEAT, tag)
            case p9.Tunlinkat():
                self._writable()
                dfd = self._dir(self._fid(m.dirfid).parts)
                try:
                    name = check_name(m.name)
                    if m.flags & p9.AT_REMOVEDIR:
                        os.rmdir(name, dir_fd=dfd)
                    else:
                        os.unlink(name, dir_fd=dfd)
                finally:
                    os.close(dfd)
                return p9.rempty(p9.TUNLINKAT, tag)
            case p9.Tsetattr():
                self._setattr(m)
                return p9.rempty(p9.TSETATTR, tag)
            case p9.Tstatfs():
                self._fid(m.fid)
                s = os.fstatvfs(self._root)
                return p9.rstatfs(
                    tag,
                    p9.StatFs(
                        0x01021997,  # V9FS_MAGIC
                        s.f_bsize,
                        s.f_blocks,
                        s.f_bfree,
                        s.f_bavail,
                        s.f_files,
                        s.f_ffree,
                        s.f_fsid,
                        s.f_namemax,
                    ),
                )
            case p9.Tfsync():
                fid = self._fid(m.fid)
                if fid.fd is None:
                    raise P9Error(errno.EBADF)
                (os.fdatasync if m.datasync else os.fsync)(fid.fd)
                return p9.rempty(p9.TFSYNC, tag)
            case p9.Txattrwalk():
                parts = self._fid(m.fid).parts
                if m.newfid in self._fids:
                    raise P9Error(errno.EBADF)  # 9P: newfid must not be in use
                if m.name:
                    raise P9Error(errno.ENODATA)  # no extended attributes are kept
                self._new_fid(m.newfid, Fid(parts, xattr=True))
                return p9.rxattrwalk(tag, 0)  # the list of names: empty
            case p9.Tlock():
                self._fid(m.fid)
                return p9.rlock(tag, p9.LOCK_SUCCESS)  # granted: one guest, no host locks
            case p9.Tgetlock():
                self._fid(m.fid)
                return p9.rgetlock(tag, m)
            case _:
                raise P9Error(errno.EOPNOTSUPP)

    def _walk(self, tag: int, m: p9.Twalk) -> bytes:
        fid = self._fid(m.fid)
        if m.newfid != m.fid and m.newfid in self._fids:
            raise P9Error(errno.EBADF)  # 9P: newfid must not be in use
        parts = list(fid.parts)
        qids: list[p9.Qid] = []
        for name in m.names:
            if name == "..":
                if parts:  # the root's parent is the root
                    parts.pop()
            elif name != ".":
                check_name(name)
                parts.append(name)
                if len(parts) > MAX_DEPTH:
                    raise P9Error(errno.ENAMETOOLONG)
            try:
                qids.append(qid_of(self._stat(parts)))
            except OSError:
                if not qids:
                    raise  # the first name fails: Rlerror
                break  # a later one: Rwalk with the qids so far, newfid untouched
        if len(qids) == len(m.names):
            if fid.fd is not None and m.newfid == m.fid:
                raise P9Error(errno.EBUSY)  # an opened fid is not walked in place
            self._new_fid(m.newfid, Fid(tuple(parts)))
        return p9.rwalk(tag, qids)

    def _renamed(self, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        """Fids at or below a renamed name follow it (QEMU's v9fs_fix_path):
        Linux keeps using a dentry's fid after moving the dentry."""
        n = len(old)
        for fid in self._fids.values():
            if fid.parts[:n] == old:
                fid.parts = new + fid.parts[n:]

    def _lopen(self, tag: int, m: p9.Tlopen) -> bytes:
        fid = self._fid(m.fid)
        if fid.fd is not None:
            raise P9Error(errno.EBUSY)
        flags = m.flags & _PASSED_FLAGS
        if (flags & os.O_ACCMODE) in _WRITE_MODES or flags & os.O_TRUNC:
            self._writable()
        st = self._stat(fid.parts)
        if stat.S_ISLNK(st.st_mode):
            raise P9Error(errno.ELOOP)
        if stat.S_ISDIR(st.st_mode):
            flags = os.O_RDONLY | os.O_DIRECTORY
        elif not stat.S_ISREG(st.st_mode):
            raise P9Error(errno.EOPNOTSUPP)  # no device nodes or FIFOs through the export
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        if fid.parts:
            dfd = self._dir(fid.parts[:-1])
            try:
                fid.fd = os.open(fid.parts[-1], flags, dir_fd=dfd)
            finally:
                os.close(dfd)
        else:
            fid.fd = os.open(".", flags, dir_fd=self._root)
        fid.entries = None
        return p9.ropen(p9.TLOPEN, tag, qid_of(os.stat(fid.fd)), IOUNIT)

    def _lcreate(self, tag: int, m: p9.Tlcreate) -> bytes:
        self._writable()
        fid = self._fid(m.fid)
        if fid.fd is not None:
            raise P9Error(errno.EBUSY)
        name = check_name(m.name)
        if len(fid.parts) >= MAX_DEPTH:
            raise P9Error(errno.ENAMETOOLONG)
        flags = (m.flags & _PASSED_FLAGS) | (m.flags & os.O_EXCL)
        flags |= os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        dfd = self._dir(fid.parts)
        try:
            fd = os.open(name, flags, m.mode & 0o7777, dir_fd=dfd)
        finally:
            os.close(dfd)
        # The fid now names the new file, opened (9P2000.L Tlcreate).
        fid.parts = (*fid.parts, name)
        fid.fd = fd
        return p9.ropen(p9.TLCREATE, tag, qid_of(os.stat(fd)), IOUNIT)

    def _readdir(self, tag: int, m: p9.Treaddir, limit: int) -> bytes:
        fid = self._fid(m.fid)
        if fid.fd is None:
            raise P9Error(errno.EBADF)
        if m.offset == 0 or fid.entries is None:
            fid.entries = None  # its old listing leaves the budget first
            entries = self._list(fid)
            self._budget(fid, sum(map(len, entries)))
            fid.entries = entries
        room = min(m.count, limit - p9.IO_HEADER_SIZE)
        out: list[bytes] = []
        used = 0
        # Offsets are positions in the listing taken at offset 0 (1-based: an
        # entry's offset is where the next read starts).
        start = m.offset if m.offset < len(fid.entries) else len(fid.entries)
        for entry in fid.entries[start:]:
            if used + len(entry) > room:
                break
            out.append(entry)
            used += len(entry)
        if not out:
            fid.entries = None  # the end: Linux reads no further
        return p9.rdata(p9.TREADDIR, tag, b"".join(out))

    def _budget(self, keep: Fid, size: int) -> None:
        """Directory listings held across fids stay under MAX_LISTING_BYTES
        (a guest opening many fids of a big directory): past it, the others
        are dropped; one read again at a non-zero offset lists it anew (same
        order while the directory is unchanged)."""
        held = sum(sum(map(len, f.entries)) for f in self._fids.values() if f.entries)
        if held + size > MAX_LISTING_BYTES:
            for fid in self._fids.values():
                if fid is not keep:
                    fid.entries = None

    def _list(self, fid: Fid) -> list[bytes]:
        assert fid.fd is not None
        here = os.stat(fid.fd)
        parent = self._stat(fid.parts[:-1]) if fid.parts else here
        named: list[tuple[str, os.stat_result]] = [(".", here), ("..", parent)]
        with os.scandir(fid.fd) as it:
            for entry in it:
                try:
                    named.append((entry.name, entry.stat(follow_symlinks=False)))
                except OSError:
                    continue  # gone since listed
        entries: list[bytes] = []
        for offset, (name, st) in enumerate(named, start=1):
            dtype = stat.S_IFMT(st.st_mode) >> 12  # DT_* is the S_IFMT nibble
            entries.append(p9.dirent(qid_of(st), offset, dtype, name))
        return entries

    def _setattr(self, m: p9.Tsetattr) -> None:
        self._writable()
        fid = self._fid(m.fid)
        st = self._stat(fid.parts)
        if fid.parts:
            dfd = self._dir(fid.parts[:-1])
            name = fid.parts[-1]
        else:
            dfd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root)
            name = "."
        try:
            link = stat.S_ISLNK(st.st_mode)
            if m.valid & p9.ATTR_MODE and not link:
                # Not a symlink (checked just above through O_NOFOLLOW): chmod
                # by name follows nothing the guest could have planted since,
                # because this device serves one message at a time.
                os.chmod(name, m.mode & 0o7777, dir_fd=dfd)
            if m.valid & (p9.ATTR_UID | p9.ATTR_GID):
                uid = m.uid if m.valid & p9.ATTR_UID else -1
                gid = m.gid if m.valid & p9.ATTR_GID else -1
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
            if m.valid & p9.ATTR_SIZE:
                if not stat.S_ISREG(st.st_mode):
                    raise P9Error(errno.EINVAL)
                fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    os.truncate(fd, m.size)
                finally:
                    os.close(fd)
            if m.valid & (p9.ATTR_ATIME | p9.ATTR_MTIME):
                now = time.time_ns()  # ATIME/MTIME without _SET: the server's now
                atime = (
                    (m.atime_sec * 1_000_000_000 + m.atime_nsec)
                    if m.valid & p9.ATTR_ATIME_SET
                    else now
                )
                mtime = (
                    (m.mtime_sec * 1_000_000_000 + m.mtime_nsec)
                    if m.valid & p9.ATTR_MTIME_SET
                    else now
                )
                if not m.valid & p9.ATTR_ATIME:
                    atime = st.st_atime_ns
                if not m.valid & p9.ATTR_MTIME:
                    mtime = st.st_mtime_ns
                os.utime(name, ns=(atime, mtime), dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)


def open_p9_exports(specs: Sequence[DeviceSpec]) -> dict[int, DirectoryExport]:
    """Open the directory of every virtio-9p spec (by spec index), or ConfigError
    with every one opened so far closed again."""
    opened: dict[int, DirectoryExport] = {}
    try:
        for i, spec in enumerate(specs):
            if spec.type == "virtio-9p":
                options = p9_options(spec.options)
                check_tag(options.tag)
                opened[i] = DirectoryExport(options.path, read_only=options.readonly)
    except BaseException:
        for export in opened.values():
            export.close()
        raise
    return opened
