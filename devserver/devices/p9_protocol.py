"""The 9P2000.L wire format (Linux's include/net/9p/9p.h, net/9p/protocol.c;
diod's protocol.md): message framing and the T/R messages the virtio-9p
device serves. Pure: bytes in, dataclasses out, and back; no I/O.

Every message is `size[4] type[1] tag[2]` then its fields, little-endian;
a string is `len[2]` then that many bytes (UTF-8 by convention, never
trusted: decoded with errors refused), a qid `type[1] version[4] path[8]`.
Every length a message carries is checked against the bytes it came in
(`size` against the buffer, each string and each Twrite's count against what
is left), so a hostile message raises `P9ProtocolError`, never reads past its
end nor allocates what it claims (reliability.md C10).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

HEADER: Final = struct.Struct("<IBH")  # size, type, tag
HEADER_SIZE: Final = HEADER.size  # 7
# Rread/Rreaddir: the header and count[4] before the data.
IO_HEADER_SIZE: Final = HEADER_SIZE + 4
QID: Final = struct.Struct("<BIQ")
NOTAG: Final = 0xFFFF
NOFID: Final = 0xFFFFFFFF
VERSION_9P2000_L: Final = "9P2000.L"
# msize bounds: the largest message a session may use (a guest asking for
# more gets this; its buffers are then never larger), and the least that
# still fits a useful Rread (Linux asks for 512 KiB with virtio by default).
MAX_MSIZE: Final = 512 * 1024
MIN_MSIZE: Final = 4096
# P9_MAXWELEM: names per Twalk (Linux never sends more; a walk is bounded).
MAX_WELEM: Final = 16
# A name (one path component) or a symlink target longer than this is refused
# (NAME_MAX and PATH_MAX on Linux).
NAME_MAX: Final = 255
PATH_MAX: Final = 4096

# Message types (9p.h enum p9_msg_t).
RLERROR: Final = 7
TSTATFS: Final = 8
TLOPEN: Final = 12
TLCREATE: Final = 14
TSYMLINK: Final = 16
TMKNOD: Final = 18
TRENAME: Final = 20
TREADLINK: Final = 22
TGETATTR: Final = 24
TSETATTR: Final = 26
TXATTRWALK: Final = 30
TXATTRCREATE: Final = 32
TREADDIR: Final = 40
TFSYNC: Final = 50
TLOCK: Final = 52
TGETLOCK: Final = 54
TLINK: Final = 70
TMKDIR: Final = 72
TRENAMEAT: Final = 74
TUNLINKAT: Final = 76
TVERSION: Final = 100
TAUTH: Final = 102
TATTACH: Final = 104
TFLUSH: Final = 108
TWALK: Final = 110
TREAD: Final = 116
TWRITE: Final = 118
TCLUNK: Final = 120
TREMOVE: Final = 122

# Qid types.
QTDIR: Final = 0x80
QTSYMLINK: Final = 0x02
QTFILE: Final = 0x00

# Tgetattr's mask: what Rgetattr fills (P9_GETATTR_BASIC: mode .. blocks).
GETATTR_BASIC: Final = 0x000007FF
# Tsetattr's valid bits (P9_ATTR_*).
ATTR_MODE: Final = 0x01
ATTR_UID: Final = 0x02
ATTR_GID: Final = 0x04
ATTR_SIZE: Final = 0x08
ATTR_ATIME: Final = 0x10
ATTR_MTIME: Final = 0x20
ATTR_CTIME: Final = 0x40
ATTR_ATIME_SET: Final = 0x80
ATTR_MTIME_SET: Final = 0x100
# Tunlinkat's flag: the name is a directory (AT_REMOVEDIR).
AT_REMOVEDIR: Final = 0x200
# Tlock status / Tgetlock type.
LOCK_SUCCESS: Final = 0
LOCK_TYPE_UNLCK: Final = 2


class P9ProtocolError(Exception):
    """A message that does not parse (the guest's doing): answered with
    Rlerror(EINVAL) when it has a tag, never an exception out of the device."""


@dataclass(frozen=True, slots=True)
class Qid:
    type: int
    version: int
    path: int

    def pack(self) -> bytes:
        return QID.pack(self.type & 0xFF, self.version & 0xFFFFFFFF, self.path & (1 << 64) - 1)


class Decoder:
    """A cursor over one message's body: each read checks what is left."""

    __slots__ = ("_at", "_data")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def _take(self, fmt: struct.Struct) -> tuple[int, ...]:
        if self._at + fmt.size > len(self._data):
            raise P9ProtocolError(f"message ends inside a field at byte {self._at}")
        values = fmt.unpack_from(self._data, self._at)
        self._at += fmt.size
        return values

    def u8(self) -> int:
        return self._take(_U8)[0]

    def u16(self) -> int:
        return self._take(_U16)[0]

    def u32(self) -> int:
        return self._take(_U32)[0]

    def u64(self) -> int:
        return self._take(_U64)[0]

    def data(self, length: int) -> bytes:
        if length > len(self._data) - self._at:
            raise P9ProtocolError(f"{length} bytes of data claimed, {self.left} left")
        out = self._data[self._at : self._at + length]
        self._at += length
        return out

    def string(self, limit: int = PATH_MAX) -> str:
        length = self.u16()
        if length > limit:
            raise P9ProtocolError(f"a string of {length} bytes (at most {limit})")
        raw = self.data(length)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise P9ProtocolError("a string that is not UTF-8") from None
        if "\0" in text:
            raise P9ProtocolError("a string with a NUL byte")
        return text

    @property
    def left(self) -> int:
        return len(self._data) - self._at


_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


class Encoder:
    """Builds one reply: `finish` puts the header in front."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Encoder:
        self._parts.append(_U8.pack(v & 0xFF))
        return self

    def u16(self, v: int) -> Encoder:
        self._parts.append(_U16.pack(v & 0xFFFF))
        return self

    def u32(self, v: int) -> Encoder:
        self._parts.append(_U32.pack(v & 0xFFFFFFFF))
        return self

    def u64(self, v: int) -> Encoder:
        self._parts.append(_U64.pack(v & (1 << 64) - 1))
        return self

    def string(self, s: str) -> Encoder:
        raw = s.encode(errors="surrogateescape")[:0xFFFF]
        self._parts.append(_U16.pack(len(raw)))
        self._parts.append(raw)
        return self

    def qid(self, q: Qid) -> Encoder:
        self._parts.append(q.pack())
        return self

    def raw(self, data: bytes) -> Encoder:
        self._parts.append(data)
        return self

    def finish(self, type_: int, tag: int) -> bytes:
        body = b"".join(self._parts)
        return HEADER.pack(HEADER_SIZE + len(body), type_, tag) + body


# -- T-messages (one frozen dataclass each; `decode` reads its body)


@dataclass(frozen=True, slots=True)
class Tversion:
    msize: int
    version: str


@dataclass(frozen=True, slots=True)
class Tflush:
    oldtag: int


@dataclass(frozen=True, slots=True)
class Tattach:
    fid: int
    afid: int
    uname: str
    aname: str
    n_uname: int


@dataclass(frozen=True, slots=True)
class Twalk:
    fid: int
    newfid: int
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Tlopen:
    fid: int
    flags: int


@dataclass(frozen=True, slots=True)
class Tlcreate:
    fid: int
    name: str
    flags: int
    mode: int
    gid: int


@dataclass(frozen=True, slots=True)
class Tsymlink:
    fid: int
    name: str
    target: str
    gid: int


@dataclass(frozen=True, slots=True)
class Treadlink:
    fid: int


@dataclass(frozen=True, slots=True)
class Tgetattr:
    fid: int
    request_mask: int


@dataclass(frozen=True, slots=True)
class Tsetattr:
    fid: int
    valid: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int


@dataclass(frozen=True, slots=True)
class Txattrwalk:
    fid: int
    newfid: int
    name: str


@dataclass(frozen=True, slots=True)
class Treaddir:
    fid: int
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class Tfsync:
    fid: int
    datasync: int


@dataclass(frozen=True, slots=True)
class Tlock:
    fid: int
    type: int
    flags: int
    start: int
    length: int
    proc_id: int
    client_id: str


@dataclass(frozen=True, slots=True)
class Tgetlock:
    fid: int
    type: int
    start: int
    length: int
    proc_id: int
    client_id: str


@dataclass(frozen=True, slots=True)
class Tlink:
    dfid: int
    fid: int
    name: str


@dataclass(frozen=True, slots=True)
class Tmkdir:
    dfid: int
    name: str
    mode: int
    gid: int


@dataclass(frozen=True, slots=True)
class Trenameat:
    olddirfid: int
    oldname: str
    newdirfid: int
    newname: str


@dataclass(frozen=True, slots=True)
class Tunlinkat:
    dirfid: int
    name: str
    flags: int


@dataclass(frozen=True, slots=True)
class Tstatfs:
    fid: int


@dataclass(frozen=True, slots=True)
class Tread:
    fid: int
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class Twrite:
    fid: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Tclunk:
    fid: int


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A message type this server does not serve: Rlerror(EOPNOTSUPP)."""

    type: int


TMessage = (
    Tversion
    | Tflush
    | Tattach
    | Twalk
    | Tlopen
    | Tlcreate
    | Tsymlink
    | Treadlink
    | Tgetattr
    | Tsetattr
    | Txattrwalk
    | Treaddir
    | Tfsync
    | Tlock
    | Tgetlock
    | Tlink
    | Tmkdir
    | Trenameat
    | Tunlinkat
    | Tstatfs
    | Tread
    | Twrite
    | Tclunk
    | Unsupported
)


def _walk(d: Decoder) -> Twalk:
    fid, newfid, count = d.u32(), d.u32(), d.u16()
    if count > MAX_WELEM:
        raise P9ProtocolError(f"Twalk of {count} names (at most {MAX_WELEM})")
    return Twalk(fid, newfid, tuple(d.string(NAME_MAX) for _ in range(count)))


def _write(d: Decoder) -> Twrite:
    fid, offset, count = d.u32(), d.u64(), d.u32()
    return Twrite(fid, offset, d.data(count))  # checked against what is left


_DECODERS: Final[dict[int, Callable[[Decoder], TMessage]]] = {
    TVERSION: lambda d: Tversion(d.u32(), d.string(64)),
    TFLUSH: lambda d: Tflush(d.u16()),
    TATTACH: lambda d: Tattach(d.u32(), d.u32(), d.string(), d.string(), d.u32()),
    TWALK: _walk,
    TLOPEN: lambda d: Tlopen(d.u32(), d.u32()),
    TLCREATE: lambda d: Tlcreate(d.u32(), d.string(NAME_MAX), d.u32(), d.u32(), d.u32()),
    TSYMLINK: lambda d: Tsymlink(d.u32(), d.string(NAME_MAX), d.string(PATH_MAX), d.u32()),
    TREADLINK: lambda d: Treadlink(d.u32()),
    TGETATTR: lambda d: Tgetattr(d.u32(), d.u64()),
    TSETATTR: lambda d: Tsetattr(
        d.u32(), d.u32(), d.u32(), d.u32(), d.u32(), d.u64(), d.u64(), d.u64(), d.u64(), d.u64()
    ),
    TXATTRWALK: lambda d: Txattrwalk(d.u32(), d.u32(), d.string(NAME_MAX)),
    TREADDIR: lambda d: Treaddir(d.u32(), d.u64(), d.u32()),
    TFSYNC: lambda d: Tfsync(d.u32(), d.u32()),
    TLOCK: lambda d: Tlock(d.u32(), d.u8(), d.u32(), d.u64(), d.u64(), d.u32(), d.string()),
    TGETLOCK: lambda d: Tgetlock(d.u32(), d.u8(), d.u64(), d.u64(), d.u32(), d.string()),
    TLINK: lambda d: Tlink(d.u32(), d.u32(), d.string(NAME_MAX)),
    TMKDIR: lambda d: Tmkdir(d.u32(), d.string(NAME_MAX), d.u32(), d.u32()),
    TRENAMEAT: lambda d: Trenameat(d.u32(), d.string(NAME_MAX), d.u32(), d.string(NAME_MAX)),
    TUNLINKAT: lambda d: Tunlinkat(d.u32(), d.string(NAME_MAX), d.u32()),
    TSTATFS: lambda d: Tstatfs(d.u32()),
    TREAD: lambda d: Tread(d.u32(), d.u64(), d.u32()),
    TWRITE: _write,
    TCLUNK: lambda d: Tclunk(d.u32()),
}


def peek_header(data: bytes) -> tuple[int, int, int]:
    """(size, type, tag) of a message's first 7 bytes; P9ProtocolError if fewer."""
    if len(data) < HEADER_SIZE:
        raise P9ProtocolError(f"a message of {len(data)} bytes has no header")
    size, type_, tag = HEADER.unpack_from(data)
    return size, type_, tag


def decode(data: bytes, msize: int) -> tuple[int, TMessage]:
    """(tag, message) of one whole T-message. `size` must match `data` exactly
    and be at most `msize`; trailing bytes inside `size` are refused too."""
    size, type_, tag = peek_header(data)
    if size != len(data):
        raise P9ProtocolError(f"size field {size}, message {len(data)} bytes")
    if size > msize:
        raise P9ProtocolError(f"a message of {size} bytes (msize {msize})")
    decoder = _DECODERS.get(type_)
    if decoder is None:
        return tag, Unsupported(type_)
    d = Decoder(data[HEADER_SIZE:])
    message = decoder(d)
    if d.left:
        raise P9ProtocolError(f"{d.left} bytes after a type-{type_} message")
    return tag, message


# -- R-messages: encoders (the reply type is the request's + 1)


def rlerror(tag: int, errno: int) -> bytes:
    return Encoder().u32(errno).finish(RLERROR, tag)


def rversion(tag: int, msize: int, version: str) -> bytes:
    return Encoder().u32(msize).string(version).finish(TVERSION + 1, tag)


def rempty(request_type: int, tag: int) -> bytes:
    """Rflush, Rclunk, Rsetattr, Rfsync, Rlink, Rrenameat, Runlinkat."""
    return Encoder().finish(request_type + 1, tag)


def rqid(request_type: int, tag: int, qid: Qid) -> bytes:
    """Rattach, Rsymlink, Rmkdir."""
    return Encoder().qid(qid).finish(request_type + 1, tag)


def rwalk(tag: int, qids: list[Qid]) -> bytes:
    e = Encoder().u16(len(qids))
    for q in qids:
        e.qid(q)
    return e.finish(TWALK + 1, tag)


def ropen(request_type: int, tag: int, qid: Qid, iounit: int) -> bytes:
    """Rlopen, Rlcreate."""
    return Encoder().qid(qid).u32(iounit).finish(request_type + 1, tag)


def rreadlink(tag: int, target: str) -> bytes:
    return Encoder().string(target).finish(TREADLINK + 1, tag)


@dataclass(frozen=True, slots=True)
class Attr:
    """Rgetattr's fields after `valid` and the qid."""

    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def rgetattr(tag: int, valid: int, qid: Qid, a: Attr) -> bytes:
    e = Encoder().u64(valid).qid(qid).u32(a.mode).u32(a.uid).u32(a.gid)
    e.u64(a.nlink).u64(a.rdev).u64(a.size).u64(a.blksize).u64(a.blocks)
    for ns in (a.atime_ns, a.mtime_ns, a.ctime_ns, 0):  # btime: not kept
        e.u64(ns // 1_000_000_000).u64(ns % 1_000_000_000)
    return e.u64(0).u64(0).finish(TGETATTR + 1, tag)  # gen, data_version


def rxattrwalk(tag: int, size: int) -> bytes:
    return Encoder().u64(size).finish(TXATTRWALK + 1, tag)


def dirent(qid: Qid, offset: int, type_: int, name: str) -> bytes:
    """One Rreaddir entry: qid[13] offset[8] type[1] name[s]."""
    return Encoder().qid(qid).u64(offset).u8(type_).string(name).finish(0, 0)[HEADER_SIZE:]


def rdata(request_type: int, tag: int, data: bytes) -> bytes:
    """Rread, Rreaddir: count[4] then the bytes."""
    return Encoder().u32(len(data)).raw(data).finish(request_type + 1, tag)


def rwrite(tag: int, count: int) -> bytes:
    return Encoder().u32(count).finish(TWRITE + 1, tag)


def rlock(tag: int, status: int) -> bytes:
    return Encoder().u8(status).finish(TLOCK + 1, tag)


def rgetlock(tag: int, m: Tgetlock) -> bytes:
    e = Encoder().u8(LOCK_TYPE_UNLCK).u64(m.start).u64(m.length).u32(m.proc_id)
    return e.string(m.client_id).finish(TGETLOCK + 1, tag)


@dataclass(frozen=True, slots=True)
class StatFs:
    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: int
    namelen: int


def rstatfs(tag: int, s: StatFs) -> bytes:
    e = Encoder().u32(s.type).u32(s.bsize).u64(s.blocks).u64(s.bfree).u64(s.bavail)
    return e.u64(s.files).u64(s.ffree).u64(s.fsid).u32(s.namelen).finish(TSTATFS + 1, tag)
