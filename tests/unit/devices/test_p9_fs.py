"""The exported directory (devserver/backends/p9_fs.py): what 9P2000.L does to
it, and that the guest never reaches outside it (reliability.md C10): '..',
absolute and outward symlinks, names with '/', too many fids."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from devserver.backends.p9_fs import MAX_FIDS, DirectoryExport
from devserver.devices import p9_protocol as p9

LIMIT = 8192
O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2


class Session:
    def __init__(self, export: DirectoryExport) -> None:
        self.export = export
        self.tag = 0

    def call(self, m: p9.TMessage, limit: int = LIMIT) -> tuple[int, bytes]:
        """(reply type, body)."""
        self.tag += 1
        reply = self.export.serve(self.tag, m, limit)
        size, type_, tag = p9.peek_header(reply)
        assert size == len(reply) <= limit and tag == self.tag
        return type_, reply[7:]

    def ok(self, m: p9.TMessage, limit: int = LIMIT) -> bytes:
        type_, body = self.call(m, limit)
        assert type_ != p9.RLERROR, f"{m} failed: {os.strerror(struct.unpack('<I', body)[0])}"
        return body

    def err(self, m: p9.TMessage) -> int:
        type_, body = self.call(m)
        assert type_ == p9.RLERROR, f"{m} succeeded"
        return int(struct.unpack("<I", body)[0])

    def walk(self, fid: int, newfid: int, *names: str) -> int:
        """Number of qids walked."""
        return int(struct.unpack_from("<H", self.ok(p9.Twalk(fid, newfid, names)))[0])

    def read_file(self, *names: str) -> bytes:
        assert self.walk(0, 50, *names) == len(names)
        self.ok(p9.Tlopen(50, O_RDONLY))
        body = self.ok(p9.Tread(50, 0, 4096))
        self.ok(p9.Tclunk(50))
        (count,) = struct.unpack_from("<I", body)
        return body[4 : 4 + count]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "outside.txt").write_text("host secret\n")
    root = tmp_path / "export"
    root.mkdir()
    (root / "hello.txt").write_text("hello from the host\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_text("inner\n")
    (root / "abs").symlink_to("/")
    (root / "out").symlink_to("../outside.txt")
    (root / "updir").symlink_to("..")
    return root


@pytest.fixture
def session(tree: Path) -> Iterator[Session]:
    export = DirectoryExport(str(tree))
    s = Session(export)
    s.ok(p9.Tattach(0, p9.NOFID, "root", "", 0))
    yield s
    export.close()


def test_read_a_host_file(session: Session) -> None:
    assert session.read_file("hello.txt") == b"hello from the host\n"
    assert session.read_file("sub", "inner.txt") == b"inner\n"


def test_create_write_then_the_host_reads(session: Session, tree: Path) -> None:
    session.walk(0, 1)
    session.ok(p9.Tlcreate(1, "new.txt", O_RDWR, 0o644, 0))
    body = session.ok(p9.Twrite(1, 0, b"from the guest"))
    assert struct.unpack("<I", body)[0] == 14
    session.ok(p9.Tfsync(1, 0))
    session.ok(p9.Tclunk(1))
    assert (tree / "new.txt").read_bytes() == b"from the guest"


def test_mkdir_rename_unlink(session: Session, tree: Path) -> None:
    session.ok(p9.Tmkdir(0, "d", 0o755, 0))
    assert (tree / "d").is_dir()
    session.ok(p9.Trenameat(0, "hello.txt", 0, "moved.txt"))
    assert (tree / "moved.txt").exists() and not (tree / "hello.txt").exists()
    session.walk(0, 2, "d")
    session.ok(p9.Trenameat(0, "moved.txt", 2, "in-d.txt"))
    assert (tree / "d" / "in-d.txt").exists()
    session.ok(p9.Tunlinkat(2, "in-d.txt", 0))
    session.ok(p9.Tunlinkat(0, "d", p9.AT_REMOVEDIR))
    assert not (tree / "d").exists()


def test_readdir_lists_every_entry_across_small_replies(session: Session, tree: Path) -> None:
    for i in range(40):
        (tree / f"file{i:02}").write_text("")
    session.walk(0, 3)
    session.ok(p9.Tlopen(3, O_RDONLY))
    names: list[str] = []
    offset = 0
    while True:
        body = session.ok(p9.Treaddir(3, offset, 200), limit=211)
        (count,) = struct.unpack_from("<I", body)
        if not count:
            break
        at = 4
        while at < 4 + count:
            at += 13
            (offset,) = struct.unpack_from("<Q", body, at)
            at += 9
            (n,) = struct.unpack_from("<H", body, at)
            names.append(body[at + 2 : at + 2 + n].decode())
            at += 2 + n
    assert sorted(names) == sorted([".", "..", *os.listdir(tree)])


def test_getattr_setattr_statfs_readlink(session: Session, tree: Path) -> None:
    session.walk(0, 4, "hello.txt")
    body = session.ok(p9.Tgetattr(4, p9.GETATTR_BASIC))
    size = struct.unpack_from("<Q", body, 8 + 13 + 4 * 3 + 8 * 2)[0]
    assert size == len("hello from the host\n")
    session.ok(p9.Tsetattr(4, p9.ATTR_SIZE | p9.ATTR_MODE, 0o600, 0, 0, 5, 0, 0, 0, 0))
    assert (tree / "hello.txt").read_bytes() == b"hello"
    assert (tree / "hello.txt").stat().st_mode & 0o777 == 0o600
    session.ok(p9.Tstatfs(0))
    session.walk(0, 5, "out")
    body = session.ok(p9.Treadlink(5))
    assert body[2:] == b"../outside.txt"


def test_dotdot_at_the_root_stays_at_the_root(session: Session) -> None:
    assert session.walk(0, 6, "..", "..", "..") == 3
    assert session.read_file("..", "hello.txt") == b"hello from the host\n"
    # An fid walked up to the root lists the export, not its parent.
    body = session.ok(p9.Tgetattr(6, p9.GETATTR_BASIC))
    root_qid = session.ok(p9.Tgetattr(0, p9.GETATTR_BASIC))[8:21]
    assert body[8:21] == root_qid


def test_absolute_symlink_is_never_followed(session: Session) -> None:
    # Through /abs (-> /) to /etc: the walk stops at the symlink (one qid,
    # newfid not made), and a walk starting inside it fails ENOTDIR.
    assert session.walk(0, 7, "abs", "etc") == 1
    session.walk(0, 16, "abs")
    assert session.err(p9.Twalk(16, 17, ("etc",))) == errno.ENOTDIR
    session.walk(0, 8, "abs")
    assert session.err(p9.Tlopen(8, O_RDONLY)) == errno.ELOOP


def test_walk_partial_through_a_symlink_leaves_newfid_unset(session: Session) -> None:
    assert session.walk(0, 9, "abs", "etc", "hostname") == 1  # only "abs" walked
    assert session.err(p9.Tgetattr(9, 0)) == errno.EBADF


def test_symlink_pointing_outside_is_not_followed(session: Session) -> None:
    for link in ("out", "updir"):
        session.walk(0, 10, link)
        assert session.err(p9.Tlopen(10, O_RDONLY)) == errno.ELOOP
        session.ok(p9.Tclunk(10))
    assert session.walk(0, 11, "updir", "outside.txt") == 1


def test_names_with_a_slash_or_dots_are_refused(session: Session) -> None:
    assert session.err(p9.Twalk(0, 12, ("sub/inner.txt",))) == errno.EINVAL
    assert session.err(p9.Twalk(0, 12, ("../outside.txt",))) == errno.EINVAL
    assert session.err(p9.Tmkdir(0, "a/b", 0o755, 0)) == errno.EINVAL
    assert session.err(p9.Tmkdir(0, "..", 0o755, 0)) == errno.EINVAL
    assert session.err(p9.Tlcreate(0, "/etc/x", O_RDWR, 0o644, 0)) == errno.EINVAL
    assert session.err(p9.Trenameat(0, "hello.txt", 0, "../x")) == errno.EINVAL
    assert session.err(p9.Tunlinkat(0, "../outside.txt", 0)) == errno.EINVAL


def test_guest_made_symlink_is_a_symlink_and_stays_unfollowed(session: Session, tree: Path) -> None:
    session.ok(p9.Tsymlink(0, "x", "/", 0))
    assert os.readlink(tree / "x") == "/"
    assert session.walk(0, 13, "x", "etc", "hostname") == 1
    session.ok(p9.Tsymlink(0, "y", "../outside.txt", 0))
    session.walk(0, 14, "y")
    assert session.err(p9.Tlopen(14, O_RDONLY)) == errno.ELOOP


def test_a_directory_swapped_for_a_symlink_is_not_entered(session: Session, tree: Path) -> None:
    session.walk(0, 15, "sub", "inner.txt")
    (tree / "sub" / "inner.txt").unlink()
    (tree / "sub").rmdir()
    (tree / "sub").symlink_to(tree.parent)  # the host (or a race) swaps it
    assert session.err(p9.Tlopen(15, O_RDONLY)) == errno.ENOTDIR


def test_fids_are_bounded(session: Session) -> None:
    for fid in range(1, MAX_FIDS):
        session.walk(0, fid)
    assert session.err(p9.Twalk(0, MAX_FIDS, ())) == errno.EMFILE
    session.ok(p9.Tclunk(1))
    session.walk(0, MAX_FIDS)


def test_unknown_fids_and_reuse(session: Session) -> None:
    assert session.err(p9.Tclunk(99)) == errno.EBADF
    assert session.err(p9.Tread(99, 0, 10)) == errno.EBADF
    session.walk(0, 1)
    assert session.err(p9.Twalk(0, 1, ())) == errno.EBADF  # newfid in use
    assert session.err(p9.Tattach(0, p9.NOFID, "", "", 0)) == errno.EBADF


def test_read_is_bounded_by_the_reply_room(session: Session, tree: Path) -> None:
    (tree / "big").write_bytes(b"x" * 100_000)
    session.walk(0, 1, "big")
    session.ok(p9.Tlopen(1, O_RDONLY))
    body = session.ok(p9.Tread(1, 0, 0xFFFFFFFF), limit=1000)
    assert struct.unpack_from("<I", body)[0] == 1000 - p9.IO_HEADER_SIZE
    assert session.err(p9.Tread(1, 1 << 63, 10)) in (errno.EINVAL, errno.EOVERFLOW)


def test_read_only_export_refuses_changes(tree: Path) -> None:
    export = DirectoryExport(str(tree), read_only=True)
    s = Session(export)
    s.ok(p9.Tattach(0, p9.NOFID, "", "", 0))
    assert s.read_file("hello.txt").startswith(b"hello")
    assert s.err(p9.Tmkdir(0, "d", 0o755, 0)) == errno.EROFS
    assert s.err(p9.Tlcreate(0, "f", O_RDWR, 0o644, 0)) == errno.EROFS
    assert s.err(p9.Tunlinkat(0, "hello.txt", 0)) == errno.EROFS
    s.walk(0, 1, "hello.txt")
    assert s.err(p9.Tlopen(1, O_WRONLY)) == errno.EROFS
    assert s.err(p9.Tsetattr(1, p9.ATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)) == errno.EROFS
    export.close()


def test_xattrs_locks_and_unsupported(session: Session) -> None:
    assert session.err(p9.Txattrwalk(0, 1, "user.x")) == errno.ENODATA
    assert struct.unpack("<Q", session.ok(p9.Txattrwalk(0, 1, "")))[0] == 0
    session.ok(p9.Tclunk(1))
    assert session.ok(p9.Tlock(0, 1, 0, 0, 0, 1, "c")) == b"\x00"
    session.ok(p9.Tgetlock(0, 1, 0, 0, 1, "c"))
    assert session.err(p9.Unsupported(p9.TMKNOD)) == errno.EOPNOTSUPP


def test_reset_forgets_every_fid(session: Session) -> None:
    session.walk(0, 1, "hello.txt")
    session.ok(p9.Tlopen(1, O_RDONLY))
    session.export.reset()
    assert session.err(p9.Tgetattr(0, 0)) == errno.EBADF


def test_fids_follow_a_rename(session: Session, tree: Path) -> None:
    session.walk(0, 1, "sub", "inner.txt")
    session.walk(0, 2, "sub")
    session.ok(p9.Trenameat(0, "sub", 0, "renamed"))
    assert session.ok(p9.Tgetattr(1, p9.GETATTR_BASIC))  # found at its new path
    session.ok(p9.Tlopen(1, O_RDONLY))
    body = session.ok(p9.Tread(1, 0, 100))
    assert body[4:] == b"inner\n"
    assert session.walk(2, 3, "inner.txt") == 1


def test_an_opened_file_unlinked_still_has_attributes(session: Session, tree: Path) -> None:
    session.walk(0, 1, "hello.txt")
    session.ok(p9.Tlopen(1, O_RDONLY))
    (tree / "hello.txt").unlink()
    assert session.ok(p9.Tgetattr(1, p9.GETATTR_BASIC))


def test_walk_depth_is_bounded(
    session: Session, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import devserver.backends.p9_fs as p9_fs

    monkeypatch.setattr(p9_fs, "MAX_DEPTH", 3)
    (tree / "a" / "b" / "c" / "d").mkdir(parents=True)
    assert session.walk(0, 1, "a", "b", "c") == 3
    assert session.err(p9.Twalk(1, 2, ("d",))) == errno.ENAMETOOLONG
    assert session.err(p9.Tlcreate(1, "f", O_RDWR, 0o644, 0)) == errno.ENAMETOOLONG


def test_a_closed_export_answers_eio(tree: Path) -> None:
    export = DirectoryExport(str(tree))
    export.close()
    reply = export.serve(1, p9.Tattach(0, p9.NOFID, "", "", 0), LIMIT)
    assert reply == p9.rlerror(1, errno.EIO)
    export.close()  # twice is fine


def test_listings_held_across_fids_are_bounded(
    session: Session, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import devserver.backends.p9_fs as p9_fs

    monkeypatch.setattr(p9_fs, "MAX_LISTING_BYTES", 300)
    for fid in (1, 2):
        session.walk(0, fid)
        session.ok(p9.Tlopen(fid, O_RDONLY))
        session.ok(p9.Treaddir(fid, 0, 40), limit=51)  # one entry read, the rest held
    held = [session.export._fids[f].entries for f in (1, 2)]
    assert held[0] is None and held[1] is not None
    # fid 1 goes on where it was: listed anew, the same order.
    body = session.ok(p9.Treaddir(1, 1, 4000))
    assert struct.unpack_from("<I", body)[0] > 0
