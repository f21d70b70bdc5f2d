"""SCSI commands of a disk LUN (scsi_commands.py): pure, so driven with CDBs
directly, hostile ones included (reliability.md "scsi: oversized CDB/sense, bad
LUN, unknown opcode": CHECK CONDITION with fixed-format sense, never an error)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from devserver.devices import scsi_commands as sc

DISK = sc.Disk(blocks=2048, block_size=512, serial=b"SER123")
RO = sc.Disk(blocks=2048, block_size=512, read_only=True, serial=b"RO")
THIN = sc.Disk(blocks=2048, block_size=512, serial=b"T", unmap=True)
BIG = 1 << 20


def run(cdb: bytes, disk: sc.Disk | None = DISK, din: int = BIG, dout: int = 0) -> sc.Decoded:
    return sc.decode(cdb.ljust(32, b"\0"), disk, data_in_len=din, data_out_len=dout)


def reply(cdb: bytes, disk: sc.Disk | None = DISK, din: int = BIG) -> sc.Reply:
    out = run(cdb, disk, din)
    assert isinstance(out, sc.Reply)
    return out


def sense_of(r: sc.Reply) -> tuple[int, int, int]:
    assert r.status == sc.CHECK_CONDITION
    assert len(r.sense) == sc.FIXED_SENSE_LEN and r.sense[0] == 0x70
    return r.sense[2], r.sense[12], r.sense[13]


def test_test_unit_ready() -> None:
    assert reply(b"\x00") == sc.Reply(sc.GOOD)


def test_standard_inquiry_and_allocation_length() -> None:
    r = reply(bytes((0x12, 0, 0, 0, 96)))
    assert r.status == sc.GOOD and len(r.data) == 36
    assert r.data[0] == 0 and r.data[8:16] == sc.VENDOR
    short = reply(bytes((0x12, 0, 0, 0, 5)))
    assert short.data == r.data[:5]
    assert reply(bytes((0x12, 0, 0, 0, 0))).data == b""


def test_inquiry_for_a_missing_lun_says_no_unit() -> None:
    r = reply(bytes((0x12, 0, 0, 0, 36)), None)
    assert r.status == sc.GOOD and r.data[0] == 0x7F


def test_vpd_pages() -> None:
    pages = reply(bytes((0x12, 1, 0x00, 0, 255))).data
    assert pages[1] == 0 and list(pages[4:]) == list(sc.VPD_PAGES)
    serial = reply(bytes((0x12, 1, 0x80, 0, 255))).data
    assert serial[4:] == b"SER123" and serial[3] == 6
    ident = reply(bytes((0x12, 1, 0x83, 0, 255))).data
    assert ident[4] == 0x02 and ident[5] == 0x01 and ident[8:] == sc.VENDOR + b"SER123"
    limits = reply(bytes((0x12, 1, 0xB0, 0, 255))).data
    assert struct.unpack_from(">II", limits, 8) == (DISK.max_transfer_blocks, 2048)
    bdc = reply(bytes((0x12, 1, 0xB1, 0, 255))).data
    assert bdc[4:6] == b"\x00\x01"
    assert sense_of(reply(bytes((0x12, 1, 0xC7, 0, 255))))[:2] == (sc.ILLEGAL_REQUEST, 0x24)
    # a page code without EVPD, and CmdDt
    assert sense_of(reply(bytes((0x12, 0, 0x80, 0, 255))))[1] == 0x24
    assert sense_of(reply(bytes((0x12, 2, 0, 0, 255))))[1] == 0x24


def test_read_capacity() -> None:
    r10 = reply(bytes((0x25,)))
    assert struct.unpack(">II", r10.data) == (2047, 512)
    r16 = reply(bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32))
    assert struct.unpack_from(">QI", r16.data) == (2047, 512) and len(r16.data) == 32
    assert r16.data[13] == 3
    assert len(reply(bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 12)).data) == 12
    huge = sc.Disk(blocks=1 << 33)
    assert struct.unpack(">II", reply(bytes((0x25,)), huge).data)[0] == 0xFFFFFFFF


def test_read_write_10_and_16() -> None:
    assert run(bytes((0x28, 0)) + struct.pack(">IxH", 2, 4)) == sc.Transfer(False, 1024, 2048)
    got = run(bytes((0x2A, 0)) + struct.pack(">IxH", 2047, 1), dout=512)
    assert got == sc.Transfer(True, 2047 * 512, 512)
    assert run(bytes((0x88, 0)) + struct.pack(">QI", 10, 8)) == sc.Transfer(False, 5120, 4096)
    got = run(bytes((0x8A, 0)) + struct.pack(">QI", 0, 0), dout=0)
    assert got == sc.Transfer(True, 0, 0)


def test_transfers_are_bounded_by_disk_and_buffer() -> None:
    past = reply(bytes((0x28, 0)) + struct.pack(">IxH", 2047, 2))
    assert sense_of(past) == (sc.ILLEGAL_REQUEST, 0x21, 0)
    # a 64-bit LBA near 2^64 must not wrap into range
    wrap = reply(bytes((0x88, 0)) + struct.pack(">QI", (1 << 64) - 1, 2))
    assert sense_of(wrap)[1] == 0x21
    # more blocks than the guest's buffer holds
    assert sense_of(reply(bytes((0x28, 0)) + struct.pack(">IxH", 0, 4), din=1024))[1] == 0x24
    out = run(bytes((0x2A, 0)) + struct.pack(">IxH", 0, 4), dout=2047)
    assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x24
    # more than the device's maximum transfer
    big = reply(bytes((0x88, 0)) + struct.pack(">QI", 0, 0x10000))
    assert sense_of(big)[1] == 0x24


def test_readonly_refuses_writes() -> None:
    out = run(bytes((0x2A, 0)) + struct.pack(">IxH", 0, 1), RO, dout=512)
    assert isinstance(out, sc.Reply)
    assert sense_of(out) == (sc.DATA_PROTECT, 0x27, 0)
    assert isinstance(run(bytes((0x28, 0)) + struct.pack(">IxH", 0, 1), RO), sc.Transfer)


def test_synchronize_cache() -> None:
    assert run(bytes((0x35,))) == sc.Flush()
    assert run(bytes((0x91,))) == sc.Flush()


def test_mode_sense_6_and_10() -> None:
    r6 = reply(bytes((0x1A, 0, 0x08, 0, 255)))
    assert r6.data[0] == len(r6.data) - 1 and r6.data[2] == 0 and r6.data[3] == 8
    assert struct.unpack_from(">II", r6.data, 4) == (2048, 512)
    assert r6.data[12] == 0x08 and r6.data[14] & 0x04  # caching page, WCE
    ro6 = reply(bytes((0x1A, 0x08, 0x3F, 0, 255)), RO)  # DBD: no block descriptor
    assert ro6.data[2] == 0x80 and ro6.data[3] == 0 and ro6.data[4] == 0x08
    r10 = reply(bytes((0x5A, 0, 0x3F, 0xFF, 0, 0, 0)) + struct.pack(">H", 255), RO)
    assert struct.unpack_from(">H", r10.data)[0] == len(r10.data) - 2
    assert r10.data[3] == 0x80 and struct.unpack_from(">H", r10.data, 6)[0] == 8
    changeable = reply(bytes((0x1A, 0x08, 0x48, 0, 255)))
    assert changeable.data[6] == 0  # nothing changeable in the caching page
    assert len(reply(bytes((0x1A, 0, 0x08, 0, 4))).data) == 4
    assert sense_of(reply(bytes((0x1A, 0, 0x0A, 0, 255))))[1] == 0x24
    assert sense_of(reply(bytes((0x1A, 0, 0xC8, 0, 255))))[1] == 0x39
    assert sense_of(reply(bytes((0x1A, 0, 0x08, 0x01, 255))))[1] == 0x24


def test_request_sense_and_report_luns() -> None:
    rs = reply(bytes((0x03, 0, 0, 0, 252)))
    assert rs.status == sc.GOOD and rs.data[0] == 0x70 and rs.data[2] == sc.NO_SENSE
    luns = reply(bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 64), None)
    assert luns.data == struct.pack(">I4x", 8) + bytes(8)
    short = reply(bytes((0xA0, 0, 0, 0, 0, 0)) + struct.pack(">I", 8))
    assert sense_of(short)[1] == 0x24


def test_missing_lun_and_unknown_opcodes() -> None:
    assert sense_of(reply(b"\x00", None)) == (sc.ILLEGAL_REQUEST, 0x25, 0)
    for opcode in (0x04, 0x42, 0x7F, 0xC0, 0xE0, 0xFF):
        assert sense_of(reply(bytes((opcode,))))[:2] == (sc.ILLEGAL_REQUEST, 0x20)


def test_short_cdbs_are_refused() -> None:
    empty = sc.decode(b"", DISK, data_in_len=0, data_out_len=0)
    assert isinstance(empty, sc.Reply) and sense_of(empty)[1] == 0x24
    for opcode in (0x28, 0x88, 0x12, 0x9E):
        out = sc.decode(bytes((opcode, 0, 0)), DISK, data_in_len=BIG, data_out_len=0)
        assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x24


@given(st.binary(min_size=0, max_size=40), st.integers(0, 1 << 33), st.integers(0, 1 << 33))
def test_any_cdb_is_answered(cdb: bytes, din: int, dout: int) -> None:
    for disk in (DISK, RO, THIN, None):
        out = sc.decode(cdb, disk, data_in_len=din, data_out_len=dout)
        if isinstance(out, sc.Reply):
            assert out.status in (sc.GOOD, sc.CHECK_CONDITION)
            assert len(out.data) <= 0xFFFFFFFF and len(out.sense) <= sc.FIXED_SENSE_LEN
        elif isinstance(out, sc.Unmap):
            assert disk is not None and disk.unmap
            assert out.length <= min(dout, sc.MAX_UNMAP_PARAMS)
        elif isinstance(out, sc.Transfer):
            assert disk is not None
            assert out.offset + out.length <= disk.blocks * disk.block_size
            assert out.length <= (dout if out.write else din)
            assert not (out.write and disk.read_only)


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(sc.UNMAP_DESCRIPTOR.pack(lba, n) for lba, n in ranges)
    return sc.UNMAP_HEADER.pack(6 + len(body), len(body)) + body


def test_unmap_is_offered_only_when_thin() -> None:
    cdb = bytes((0x42, 0, 0, 0, 0, 0, 0)) + struct.pack(">H", 24)
    assert sense_of(reply(cdb))[:2] == (sc.ILLEGAL_REQUEST, 0x20)
    assert run(cdb, THIN, dout=24) == sc.Unmap(24)
    cap = reply(bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32), THIN)
    assert cap.data[14] & 0x80
    assert not reply(bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32)).data[14]
    assert reply(bytes((0x12, 1, 0xB2, 0, 255)), THIN).data[5] & 0x80
    limits = reply(bytes((0x12, 1, 0xB0, 0, 255)), THIN).data
    assert struct.unpack_from(">III", limits, 20) == (
        sc.MAX_UNMAP_BLOCKS,
        sc.MAX_UNMAP_DESCRIPTORS,
        8,
    )


def test_unmap_parameter_list_is_bounded() -> None:
    cdb = bytes((0x42, 0, 0, 0, 0, 0, 0)) + struct.pack(">H", 24)
    # longer than the data-out buffer, or than the most descriptors offered
    out = run(cdb, THIN, dout=23)
    assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x24
    big = bytes((0x42, 0, 0, 0, 0, 0, 0)) + struct.pack(">H", sc.MAX_UNMAP_PARAMS + 16)
    out = run(big, THIN, dout=1 << 16)
    assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x24
    anchor = bytes((0x42, 1, 0, 0, 0, 0, 0)) + struct.pack(">H", 24)
    out = run(anchor, THIN, dout=24)
    assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x24


def test_decode_unmap() -> None:
    assert sc.decode_unmap(unmap_params((8, 8), (100, 0)), THIN) == [(4096, 4096)]
    assert sc.decode_unmap(b"", THIN) == sc.Reply(sc.GOOD)
    out = sc.decode_unmap(unmap_params((2040, 9)), THIN)
    assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x21
    out = sc.decode_unmap(unmap_params(((1 << 64) - 1, 2)), THIN)
    assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x21
    out = sc.decode_unmap(unmap_params((0, sc.MAX_UNMAP_BLOCKS + 1)), THIN)
    assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x24
    ragged = unmap_params((0, 8))[:-3]
    out = sc.decode_unmap(ragged, THIN)
    assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x24
    out = sc.decode_unmap(b"\0\0\0", THIN)
    assert isinstance(out, sc.Reply) and sense_of(out)[1] == 0x24
    # a block descriptor length larger than what was sent counts only what was sent
    lying = sc.UNMAP_HEADER.pack(0, 0xFFF0) + sc.UNMAP_DESCRIPTOR.pack(0, 8)
    assert sc.decode_unmap(lying, THIN) == [(0, 4096)]


@given(st.binary(max_size=sc.MAX_UNMAP_PARAMS + 40))
def test_any_unmap_list_is_answered(params: bytes) -> None:
    out = sc.decode_unmap(params, THIN)
    if isinstance(out, list):
        assert len(out) <= sc.MAX_UNMAP_DESCRIPTORS
        assert all(o + n <= THIN.blocks * THIN.block_size for o, n in out)
