"""SCSI commands of a direct-access disk, as Linux's sd driver uses them (SPC-4
for INQUIRY, MODE SENSE, REQUEST SENSE, REPORT LUNS, TEST UNIT READY; SBC-3
for READ CAPACITY, READ/WRITE(10)/(16), SYNCHRONIZE CACHE). Pure: a CDB and
the sizes of the guest's buffers in, an answer out; no guest memory, no disk.

`decode` never raises on guest input. It returns either a `Reply` (status,
data to put in the data-in buffer, fixed-format sense) or a `Transfer` (the
block range a READ/WRITE moves, already checked against the disk and the
guest's buffer), which the device (scsi.py) carries out in bounded steps.

Rules kept here (reliability.md, "scsi: oversized CDB/sense, bad LUN,
unknown opcode"):
- a CDB shorter than its opcode's group length is ILLEGAL REQUEST;
- reply data is cut to the CDB's allocation length (the device cuts it again
  to the data-in buffer, counting the rest as residual);
- a transfer's bytes must fit the guest's buffer and its blocks the disk: the
  sums are Python integers, so a 64-bit LBA near 2^64 cannot wrap.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# SAM status codes
GOOD: Final = 0x00
CHECK_CONDITION: Final = 0x02

# SPC sense keys
NO_SENSE: Final = 0x0
MEDIUM_ERROR: Final = 0x3
ILLEGAL_REQUEST: Final = 0x5
DATA_PROTECT: Final = 0x7

# (ASC, ASCQ) pairs used
ASC_NONE: Final = (0x00, 0x00)
ASC_INVALID_OPCODE: Final = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE: Final = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB: Final = (0x24, 0x00)
ASC_LUN_NOT_SUPPORTED: Final = (0x25, 0x00)
ASC_WRITE_PROTECTED: Final = (0x27, 0x00)
ASC_UNRECOVERED_READ_ERROR: Final = (0x11, 0x00)
ASC_WRITE_ERROR: Final = (0x0C, 0x00)

# Opcodes
TEST_UNIT_READY: Final = 0x00
REQUEST_SENSE: Final = 0x03
INQUIRY: Final = 0x12
MODE_SENSE_6: Final = 0x1A
READ_CAPACITY_10: Final = 0x25
READ_10: Final = 0x28
WRITE_10: Final = 0x2A
SYNCHRONIZE_CACHE_10: Final = 0x35
MODE_SENSE_10: Final = 0x5A
READ_16: Final = 0x88
WRITE_16: Final = 0x8A
SYNCHRONIZE_CACHE_16: Final = 0x91
SERVICE_ACTION_IN_16: Final = 0x9E
SAI_READ_CAPACITY_16: Final = 0x10
REPORT_LUNS: Final = 0xA0
UNMAP: Final = 0x42
# UNMAP parameter list (SBC-3 §5.28.2): an 8-byte header, 16-byte descriptors.
UNMAP_HEADER: Final = struct.Struct(">HH4x")
UNMAP_DESCRIPTOR: Final = struct.Struct(">QI4x")
MAX_UNMAP_DESCRIPTORS: Final = 32  # offered in VPD 0xB0; bounds what is read
MAX_UNMAP_PARAMS: Final = UNMAP_HEADER.size + MAX_UNMAP_DESCRIPTORS * UNMAP_DESCRIPTOR.size
MAX_UNMAP_BLOCKS: Final = 1 << 22  # per descriptor (2 GiB of 512-byte blocks)

FIXED_SENSE_LEN: Final = 18
# Mode pages
MODE_PAGE_CACHING: Final = 0x08
MODE_PAGE_ALL: Final = 0x3F
# VPD pages offered, in order (page 0x00 lists them)
VPD_SUPPORTED: Final = 0x00
VPD_SERIAL: Final = 0x80
VPD_DEVICE_ID: Final = 0x83
VPD_BLOCK_LIMITS: Final = 0xB0
VPD_BLOCK_CHARACTERISTICS: Final = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING: Final = 0xB2
VPD_PAGES: Final = (
    VPD_SUPPORTED,
    VPD_SERIAL,
    VPD_DEVICE_ID,
    VPD_BLOCK_LIMITS,
    VPD_BLOCK_CHARACTERISTICS,
    VPD_LOGICAL_BLOCK_PROVISIONING,
)

VENDOR: Final = b"DEVMODEL"  # T10 vendor identification, 8 bytes
PRODUCT: Final = b"VIRTUAL DISK".ljust(16)
REVISION: Final = b"1.0 "
MAX_SERIAL: Final = 36


def cdb_length(opcode: int) -> int:
    """Bytes a CDB of this opcode's group takes (SPC-4 §4.2.5.1); 0: a group
    this disk implements nothing from (variable length, reserved, vendor)."""
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(opcode >> 5, 0)


def fixed_sense(key: int, asc_ascq: tuple[int, int]) -> bytes:
    """Fixed-format sense data (SPC-4 §4.5.3), response code 0x70 (current)."""
    sense = bytearray(FIXED_SENSE_LEN)
    sense[0] = 0x70
    sense[2] = key & 0xF
    sense[7] = FIXED_SENSE_LEN - 8  # additional sense length
    sense[12], sense[13] = asc_ascq
    return bytes(sense)


@dataclass(frozen=True, slots=True)
class Disk:
    """What the commands say about one logical unit."""

    blocks: int  # capacity in logical blocks
    block_size: int = 512
    read_only: bool = False
    serial: bytes = b""  # unit serial number (VPD 0x80), printable ASCII
    max_transfer_blocks: int = 0xFFFF  # block limits (VPD 0xB0) and the device's max_sectors
    # Optimal transfer (VPD 0xB0): what the device moves per step (1 MiB), a
    # multiple of the physical block, or Linux ignores it.
    optimal_transfer_blocks: int = 2048
    physical_exp: int = 3  # logical blocks per physical block, log2 (4 KiB physical)
    unmap: bool = False  # thin provisioning: UNMAP frees blocks (never on a read-only disk)


@dataclass(frozen=True, slots=True)
class Reply:
    """A command answered without disk I/O (or refused)."""

    status: int
    data: bytes = b""
    sense: bytes = b""


@dataclass(frozen=True, slots=True)
class Transfer:
    """READ or WRITE of `length` bytes at byte `offset` of the disk (checked)."""

    write: bool
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Flush:
    """SYNCHRONIZE CACHE: flush the disk's write cache."""


@dataclass(frozen=True, slots=True)
class Unmap:
    """UNMAP: read `length` bytes of parameter list from the data-out buffer
    (checked to fit it and MAX_UNMAP_PARAMS), then `decode_unmap` them."""

    length: int


Decoded = Reply | Transfer | Flush | Unmap


def check(key: int, asc_ascq: tuple[int, int]) -> Reply:
    return Reply(CHECK_CONDITION, b"", fixed_sense(key, asc_ascq))


def invalid_field() -> Reply:
    return check(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)


def good(data: bytes, allocation: int) -> Reply:
    """GOOD with `data` cut to the CDB's allocation length."""
    return Reply(GOOD, data[: max(0, allocation)])


def decode(cdb: bytes, disk: Disk | None, *, data_in_len: int, data_out_len: int) -> Decoded:
    """Answer `cdb` for `disk` (None: no logical unit at this LUN of a present
    target). `data_in_len`/`data_out_len` are the guest's buffer sizes."""
    if not cdb:
        return invalid_field()
    opcode = cdb[0]
    needed = cdb_length(opcode)
    if needed == 0:
        return check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
    if len(cdb) < needed:
        return invalid_field()
    cdb = cdb[:needed]
    # Commands any LUN answers, present or not (SPC-4 §4.6.x: INQUIRY reports
    # "no unit here", REPORT LUNS and REQUEST SENSE work on any LUN).
    if opcode == INQUIRY:
        return _inquiry(cdb, disk)
    if opcode == REPORT_LUNS:
        return _report_luns(cdb)
    if opcode == REQUEST_SENSE:
        # Sense is always returned with the failed command (autosense), so
        # nothing is pending here.
        return good(fixed_sense(NO_SENSE, ASC_NONE), cdb[4])
    if disk is None:
        return check(ILLEGAL_REQUEST, ASC_LUN_NOT_SUPPORTED)
    match opcode:
        case 0x00:  # TEST UNIT READY
            return Reply(GOOD)
        case 0x25:  # READ CAPACITY(10)
            last = min(disk.blocks - 1, 0xFFFFFFFF)  # 0xFFFFFFFF: use (16)
            return Reply(GOOD, struct.pack(">II", last, disk.block_size))
        case 0x9E if cdb[1] & 0x1F == SAI_READ_CAPACITY_16:
            return _read_capacity_16(cdb, disk)
        case 0x28 | 0x2A:  # READ(10), WRITE(10)
            lba, count = struct.unpack_from(">IxH", cdb, 2)
            return _transfer(opcode == WRITE_10, lba, count, disk, data_in_len, data_out_len)
        case 0x88 | 0x8A:  # READ(16), WRITE(16)
            lba, count = struct.unpack_from(">QI", cdb, 2)
            return _transfer(opcode == WRITE_16, lba, count, disk, data_in_len, data_out_len)
        case 0x42 if disk.unmap:  # UNMAP
            if cdb[1] & 0x01:
                return invalid_field()  # ANCHOR: no anchored state
            length = struct.unpack_from(">H", cdb, 7)[0]
            if length > min(data_out_len, MAX_UNMAP_PARAMS):
                return invalid_field()
            return Unmap(length)
        case 0x35 | 0x91:  # SYNCHRONIZE CACHE(10)/(16): the range is not needed
            return Flush()
        case 0x1A:  # MODE SENSE(6)
            return _mode_sense(cdb, disk, ten=False)
        case 0x5A:  # MODE SENSE(10)
            return _mode_sense(cdb, disk, ten=True)
    return check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)


def _transfer(
    write: bool, lba: int, count: int, disk: Disk, data_in_len: int, data_out_len: int
) -> Decoded:
    if count > disk.max_transfer_blocks:
        return invalid_field()
    if lba + count > disk.blocks:
        return check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
    if write and disk.read_only:
        return check(DATA_PROTECT, ASC_WRITE_PROTECTED)
    length = count * disk.block_size
    # The guest's buffer must hold the whole transfer: a shorter one would be
    # a partial read or write the command did not ask for.
    if length > (data_out_len if write else data_in_len):
        return invalid_field()
    return Transfer(write, lba * disk.block_size, length)


def _read_capacity_16(cdb: bytes, disk: Disk) -> Reply:
    allocation = struct.unpack_from(">I", cdb, 10)[0]
    data = bytearray(32)
    struct.pack_into(">QI", data, 0, disk.blocks - 1, disk.block_size)
    data[13] = disk.physical_exp & 0xF
    if disk.unmap:
        data[14] = 0x80  # LBPME: logical block provisioning (UNMAP) enabled
    return good(bytes(data), allocation)


def _inquiry(cdb: bytes, disk: Disk | None) -> Reply:
    evpd = cdb[1] & 0x01
    page = cdb[2]
    allocation = struct.unpack_from(">H", cdb, 3)[0]
    if cdb[1] & 0xFE or (not evpd and page):
        return invalid_field()  # CmdDt and reserved bits; a page without EVPD
    # Peripheral qualifier 3, type 0x1F: no logical unit here (SPC-4 §6.6.2).
    peripheral = 0x00 if disk is not None else 0x7F
    if not evpd:
        data = bytearray(36)
        data[0] = peripheral
        data[2] = 0x06  # SPC-4
        data[3] = 0x02  # response data format 2 (HISUP off)
        data[4] = len(data) - 5
        data[7] = 0x02  # CMDQUE: tagged queueing
        data[8:16] = VENDOR
        data[16:32] = PRODUCT
        data[32:36] = REVISION
        return good(bytes(data), allocation)
    if disk is None:
        return invalid_field()
    body: bytes
    match page:
        case 0x00:
            body = bytes(VPD_PAGES)
        case 0x80:
            body = disk.serial[:MAX_SERIAL]
        case 0x83:
            # One T10 vendor ID designator (ASCII): vendor + serial, which
            # Linux uses for /dev/disk/by-id and the disk's wwid.
            ident = VENDOR + disk.serial[:MAX_SERIAL]
            body = bytes((0x02, 0x01, 0x00, len(ident))) + ident
        case 0xB0:
            limits = bytearray(0x3C)
            # maximum and optimal transfer length, in logical blocks
            struct.pack_into(
                ">II", limits, 4, disk.max_transfer_blocks, disk.optimal_transfer_blocks
            )
            if disk.unmap:
                # maximum unmap LBA count and descriptors, optimal granularity
                # (a physical block: what a host hole punch frees whole)
                struct.pack_into(
                    ">III",
                    limits,
                    16,
                    MAX_UNMAP_BLOCKS,
                    MAX_UNMAP_DESCRIPTORS,
                    1 << disk.physical_exp,
                )
            body = bytes(limits)
        case 0xB1:
            characteristics = bytearray(0x3C)
            characteristics[1] = 0x01  # medium rotation rate 1: non-rotating (an SSD)
            body = bytes(characteristics)
        case 0xB2:
            provisioning = bytearray(4)
            provisioning[1] = 0x80 if disk.unmap else 0x00  # LBPU: UNMAP supported
            body = bytes(provisioning)
        case _:
            return invalid_field()
    header = bytes((peripheral, page)) + struct.pack(">H", len(body))
    return good(header + body, allocation)


def _report_luns(cdb: bytes) -> Reply:
    allocation = struct.unpack_from(">I", cdb, 6)[0]
    if allocation < 16:  # SPC-4 §6.33: less than 16 is an invalid field
        return invalid_field()
    # One LUN (0) per target: list length 8, then its all-zero 8-byte entry.
    return good(struct.pack(">I4x", 8) + bytes(8), allocation)


def _caching_page(changeable: bool) -> bytes:
    page = bytearray(20)
    page[0] = MODE_PAGE_CACHING
    page[1] = len(page) - 2
    if not changeable:
        page[2] = 0x04  # WCE: a write-back cache (SYNCHRONIZE CACHE makes it durable)
    return bytes(page)


def _mode_sense(cdb: bytes, disk: Disk, *, ten: bool) -> Reply:
    dbd = bool(cdb[1] & 0x08)
    control = cdb[2] >> 6  # 0 current, 1 changeable, 2 default, 3 saved
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    allocation = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
    if control == 3:
        return check(ILLEGAL_REQUEST, (0x39, 0x00))  # SAVING PARAMETERS NOT SUPPORTED
    # The caching page is the only one (all pages: just it); subpages none.
    caching = page == MODE_PAGE_CACHING and subpage == 0
    if not (caching or (page == MODE_PAGE_ALL and subpage in (0x00, 0xFF))):
        return invalid_field()
    pages = _caching_page(control == 1)
    descriptor = b""
    if not dbd:
        # Short LBA block descriptor (SBC-3 §6.4.2.2): block count (all ones:
        # more than fit), a reserved byte, the 24-bit block length.
        descriptor = struct.pack(">II", min(disk.blocks, 0xFFFFFFFF), disk.block_size & 0xFFFFFF)
    device_specific = 0x80 if disk.read_only else 0x00  # WP
    if ten:
        length = 6 + len(descriptor) + len(pages)
        header = struct.pack(">HBBxxH", length, 0, device_specific, len(descriptor))
    else:
        length = 3 + len(descriptor) + len(pages)
        header = struct.pack(">BBBB", length, 0, device_specific, len(descriptor))
    return good(header + descriptor + pages, allocation)


def decode_unmap(params: bytes, disk: Disk) -> list[tuple[int, int]] | Reply:
    """The (byte offset, byte length) ranges of an UNMAP parameter list, every
    one checked against the disk before any is done; or the refusal."""
    if len(params) < UNMAP_HEADER.size:
        return Reply(GOOD) if not params else invalid_field()  # no list: nothing to do
    _, described = UNMAP_HEADER.unpack_from(params)
    count, rest = divmod(min(described, len(params) - UNMAP_HEADER.size), UNMAP_DESCRIPTOR.size)
    if rest or count > MAX_UNMAP_DESCRIPTORS:
        return invalid_field()
    ranges: list[tuple[int, int]] = []
    for n in range(count):
        lba, blocks = UNMAP_DESCRIPTOR.unpack_from(params, UNMAP_HEADER.size + n * 16)
        if blocks > MAX_UNMAP_BLOCKS:
            return invalid_field()
        if lba + blocks > disk.blocks:
            return check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        if blocks:
            ranges.append((lba * disk.block_size, blocks * disk.block_size))
    return ranges
