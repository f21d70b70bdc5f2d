"""The pure-Python cpio newc writer: exact headers, round trips, and what the kernel needs."""

from __future__ import annotations

import io
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm_client.guest.cpio import TRAILER, CpioError, CpioWriter, read_cpio


def archive(build: object) -> bytes:
    out = io.BytesIO()
    w = CpioWriter(out)
    assert callable(build)
    build(w)
    w.close()
    return out.getvalue()


def test_header_layout_of_one_file() -> None:
    data = archive(lambda w: w.add_file("a", b"xyz", 0o644))
    # magic, ino 1, mode 0100644, uid, gid, nlink 1, mtime 0, size 3, dev 0/0,
    # rdev 0/0, namesize 2 ("a\0"), check 0
    expected = (
        b"070701"
        + b"00000001"
        + b"000081A4"
        + b"00000000" * 2
        + b"00000001"
        + b"00000000"
        + b"00000003"
        + b"00000000" * 4
        + b"00000002"
        + b"00000000"
    )
    assert data.startswith(expected)
    # 110-byte header + "a\0" = 112, already aligned; then data padded to 4.
    assert data[110:112] == b"a\0"
    assert data[112:116] == b"xyz\0"
    assert data[116:122] == b"070701"
    assert len(data) % 4 == 0


def test_round_trip_of_every_kind() -> None:
    def build(w: CpioWriter) -> None:
        w.add_dir("/tmp", 0o1777)
        w.add_file("/usr/bin/tool", b"\x7fELF" + bytes(range(256)), 0o755)
        w.add_symlink("bin/sh", "/bin/busybox")
        w.add_char_device("dev/console", 5, 1)
        w.add_file("empty", b"")

    entries = {e.name: e for e in read_cpio(archive(build))}
    assert list(entries) == [
        "tmp",
        "usr",
        "usr/bin",
        "usr/bin/tool",
        "bin",
        "bin/sh",
        "dev",
        "dev/console",
        "empty",
    ]
    assert entries["tmp"].is_dir
    assert stat.S_IMODE(entries["tmp"].mode) == 0o1777
    assert entries["usr"].is_dir
    assert entries["usr"].nlink == 2
    tool = entries["usr/bin/tool"]
    assert tool.is_file
    assert stat.S_IMODE(tool.mode) == 0o755
    assert tool.data == b"\x7fELF" + bytes(range(256))
    assert entries["bin/sh"].is_symlink
    assert entries["bin/sh"].link_target == "/bin/busybox"
    console = entries["dev/console"]
    assert console.is_chardev
    assert (console.rdevmajor, console.rdevminor) == (5, 1)
    assert entries["empty"].data == b""
    inodes = [e.ino for e in entries.values()]
    assert len(set(inodes)) == len(inodes)


def test_parents_come_before_children_and_only_once() -> None:
    def build(w: CpioWriter) -> None:
        w.add_file("a/b/c", b"1")
        w.add_file("a/b/d", b"2")
        w.add_dir("a/b")  # already implied: no second entry

    names = [e.name for e in read_cpio(archive(build))]
    assert names == ["a", "a/b", "a/b/c", "a/b/d"]


def test_output_is_deterministic() -> None:
    def build(w: CpioWriter) -> None:
        w.add_file("x", b"data")
        w.add_symlink("y", "x")

    assert archive(build) == archive(build)


@pytest.mark.parametrize("path", ["", "/", "a/../b", ".."])
def test_bad_paths_are_refused(path: str) -> None:
    w = CpioWriter(io.BytesIO())
    with pytest.raises(CpioError):
        w.add_file(path, b"")


def test_duplicates_and_files_as_directories_are_refused() -> None:
    w = CpioWriter(io.BytesIO())
    w.add_file("f", b"")
    with pytest.raises(CpioError, match="duplicate"):
        w.add_file("/f", b"")
    with pytest.raises(CpioError, match="not a directory"):
        w.add_file("f/g", b"")


def test_nothing_can_be_added_after_close() -> None:
    w = CpioWriter(io.BytesIO())
    w.close()
    with pytest.raises(CpioError):
        w.add_file("f", b"")


def test_concatenated_archives_with_padding_read_like_the_kernel() -> None:
    first = archive(lambda w: w.add_file("a", b"1"))
    second = archive(lambda w: w.add_file("b", b"2"))
    both = read_cpio(first + b"\0" * 8 + second)
    assert [e.name for e in both] == ["a", "b"]
    assert [e.name for e in read_cpio(first + second, all_archives=False)] == ["a"]
    assert TRAILER not in [e.name for e in both]


def test_reader_rejects_garbage() -> None:
    with pytest.raises(CpioError, match="magic"):
        read_cpio(b"070707" + b"0" * 200)
    good = archive(lambda w: w.add_file("a", b"12345678"))
    with pytest.raises(CpioError):
        read_cpio(good[:115])


names = st.lists(
    st.text(alphabet="abcxyz019_.-", min_size=1, max_size=12).filter(
        lambda s: s not in (".", "..")
    ),
    min_size=1,
    max_size=3,
).map("/".join)


@given(st.dictionaries(names, st.binary(max_size=300), max_size=8))
def test_round_trip_property(files: dict[str, bytes]) -> None:
    # A name that is a prefix directory of another cannot also be a file.
    keep = {n: d for n, d in files.items() if not any(o.startswith(n + "/") for o in files)}
    w_out = io.BytesIO()
    w = CpioWriter(w_out)
    for n, d in keep.items():
        w.add_file(n, d)
    w.close()
    got = {e.name: e.data for e in read_cpio(w_out.getvalue()) if e.is_file}
    assert got == keep
