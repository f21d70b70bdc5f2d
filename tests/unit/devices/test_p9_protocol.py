"""The 9P2000.L codec (devserver/devices/p9_protocol.py): messages decode, and
every hostile length is refused without reading past the message
(reliability.md C10)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devserver.devices import p9_protocol as p9


def msg(type_: int, body: bytes, tag: int = 1) -> bytes:
    return struct.pack("<IBH", 7 + len(body), type_, tag) + body


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<H", len(raw)) + raw


def test_tversion_and_twalk_decode() -> None:
    tag, m = p9.decode(msg(p9.TVERSION, struct.pack("<I", 8192) + s("9P2000.L"), 0xFFFF), 8192)
    assert (tag, m) == (0xFFFF, p9.Tversion(8192, "9P2000.L"))
    body = struct.pack("<IIH", 1, 2, 2) + s("a") + s("b")
    assert p9.decode(msg(p9.TWALK, body), 8192)[1] == p9.Twalk(1, 2, ("a", "b"))


def test_twrite_data_and_tsetattr() -> None:
    body = struct.pack("<IQI", 3, 10, 4) + b"data"
    assert p9.decode(msg(p9.TWRITE, body), 8192)[1] == p9.Twrite(3, 10, b"data")
    body = struct.pack("<IIIIIQQQQQ", 1, p9.ATTR_SIZE, 0, 0, 0, 5, 0, 0, 0, 0)
    m = p9.decode(msg(p9.TSETATTR, body), 8192)[1]
    assert isinstance(m, p9.Tsetattr) and m.size == 5


def test_unknown_type_is_unsupported_not_an_error() -> None:
    assert p9.decode(msg(p9.TMKNOD, b"anything"), 8192)[1] == p9.Unsupported(p9.TMKNOD)
    assert p9.decode(msg(p9.TAUTH, b""), 8192)[1] == p9.Unsupported(p9.TAUTH)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x07\x00\x00", "no header"),
        (struct.pack("<IBH", 100, p9.TCLUNK, 1) + b"\0" * 4, "size larger than the buffer"),
        (struct.pack("<IBH", 9, p9.TCLUNK, 1) + b"\0" * 4, "size smaller than the buffer"),
        (msg(p9.TCLUNK, b"\0\0"), "field cut short"),
        (msg(p9.TCLUNK, b"\0" * 5), "trailing bytes"),
        (msg(p9.TWRITE, struct.pack("<IQI", 1, 0, 0xFFFFFFFF) + b"x"), "Twrite count > data"),
        (msg(p9.TMKDIR, struct.pack("<I", 1) + struct.pack("<H", 0xFFFF) + b"a"), "string len"),
        (msg(p9.TMKDIR, struct.pack("<I", 1) + s(b"\xff\xfe") + b"\0" * 8), "not UTF-8"),
        (msg(p9.TMKDIR, struct.pack("<I", 1) + s(b"a\0b") + b"\0" * 8), "NUL in a name"),
        (msg(p9.TMKDIR, struct.pack("<I", 1) + s("x" * 256) + b"\0" * 8), "name > NAME_MAX"),
        (msg(p9.TWALK, struct.pack("<IIH", 1, 2, 17) + s("a") * 17), "17 walk names"),
        (msg(p9.TWALK, struct.pack("<IIH", 1, 2, 3) + s("a")), "walk names missing"),
    ],
)
def test_hostile_messages_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(p9.P9ProtocolError):
        p9.decode(data, 8192)


def test_a_message_longer_than_msize_is_refused() -> None:
    body = struct.pack("<IQI", 1, 0, 100) + b"x" * 100
    with pytest.raises(p9.P9ProtocolError, match="msize"):
        p9.decode(msg(p9.TWRITE, body), 64)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(p9.P9ProtocolError):
        p9.decode(data, 8192)


@given(st.integers(0, 0xFF), st.binary(max_size=64))
def test_any_body_of_any_type_decodes_or_raises(type_: int, body: bytes) -> None:
    with contextlib.suppress(p9.P9ProtocolError):
        p9.decode(msg(type_, body), 8192)


def test_replies_are_framed() -> None:
    reply = p9.rlerror(5, 2)
    assert reply == struct.pack("<IBHI", 11, p9.RLERROR, 5, 2)
    q = p9.Qid(p9.QTDIR, 1, 2)
    walk = p9.rwalk(3, [q, q])
    size, type_, tag = p9.peek_header(walk)
    assert (size, type_, tag) == (len(walk), p9.TWALK + 1, 3)
    assert walk[7:9] == b"\x02\x00" and walk[9:22] == q.pack()
    data = p9.rdata(p9.TREAD, 1, b"abc")
    assert data[7:] == struct.pack("<I", 3) + b"abc"
    entry = p9.dirent(q, 1, 4, "x")
    assert len(entry) == 13 + 8 + 1 + 2 + 1
