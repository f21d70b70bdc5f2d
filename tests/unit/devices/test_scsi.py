"""virtio-scsi driven like a guest (virtio 1.2 §5.6): commands on the request
queue, task management on the control queue, and the hostile cases of
reliability.md (short headers, bad LUNs, buffers too small: every popped head
comes back, C9)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devserver.devices import scsi_commands as sc
from devserver.devices.scsi import (
    CDB_SIZE,
    CMD_REQ,
    CMD_RESP,
    CONFIG,
    CONTROL_QUEUE,
    EVENT_QUEUE,
    QUEUE_SIZE,
    REQUEST_QUEUE,
    RESP_SIZE,
    SENSE_SIZE,
    TMF_REQ,
    VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
    VIRTIO_SCSI_S_INCORRECT_LUN,
    VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_TMF,
    VirtioScsi,
    decode_lun,
)
from devserver.errors import ConfigError
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.virtio.pci_transport import DEVICE_CFG_OFFSET, VirtioPciFunction
from tests.unit.devices.test_blk import FakeDisk
from tests.unit.virtio.driver import RAM_SIZE, FakeVirtioDriver

DISK = 64 * 1024


def lun(target: int, unit: int = 0) -> bytes:
    return bytes((1, target, 0x40 | (unit >> 8), unit & 0xFF, 0, 0, 0, 0))


class Scsi:
    def __init__(self, *disks: FakeDisk) -> None:
        self.disks = disks
        self.dev = VirtioScsi(disks, serials=[f"S{n}" for n in range(len(disks))])
        self.mem = BytearrayMemory(RAM_SIZE)
        self.fn = VirtioPciFunction(self.dev, presentation=Presentation(), memory=self.mem)
        self.fn.device_id = 5
        self.drv = FakeVirtioDriver(self.fn, self.mem)
        self.drv.start(3)

    def buffer(self, data: bytes | int) -> int:
        size = data if isinstance(data, int) else len(data)
        gpa = self.drv.alloc(max(size, 1))
        if isinstance(data, bytes):
            self.drv.put(gpa, data)
        return gpa

    def send(self, queue: int, buffers: list[tuple[int, int, bool]]) -> int:
        head = self.drv.add_chain(queue, buffers)
        self.drv.publish(queue, head)
        self.drv.kick(queue)
        used = self.drv.used(queue)
        assert used and used[-1][0] == head, "every popped head is returned (C9)"
        return used[-1][1]

    def command(
        self, cdb: bytes, *, target: int = 0, unit: int = 0, out: bytes = b"", din: int = 0
    ) -> tuple[tuple[int, int, int, int, int], bytes, bytes, int]:
        """((sense_len, resid, qualifier, status, response), sense, data-in, used len)."""
        req = CMD_REQ.pack(lun(target, unit), 7, 0, 0, 0, cdb.ljust(CDB_SIZE, b"\0"))
        buffers = [(self.buffer(req), len(req), False)]
        if out:
            buffers.append((self.buffer(out), len(out), False))
        resp = self.buffer(RESP_SIZE)
        buffers.append((resp, RESP_SIZE, True))
        data = 0
        if din:
            data = self.buffer(din)
            buffers.append((data, din, True))
        used = self.send(REQUEST_QUEUE, buffers)
        raw = self.drv.get(resp, RESP_SIZE)
        header = CMD_RESP.unpack_from(raw)
        sense = raw[CMD_RESP.size : CMD_RESP.size + header[0]]
        return header, sense, self.drv.get(data, din) if din else b"", used


@pytest.fixture
def scsi() -> Scsi:
    return Scsi(FakeDisk(DISK), FakeDisk(DISK, read_only=True))


def test_config(scsi: Scsi) -> None:
    raw = bytes(scsi.drv.read(DEVICE_CFG_OFFSET + i, 1) for i in range(CONFIG.size))
    fields = CONFIG.unpack(raw)
    assert fields[0] == 1 and fields[1] == QUEUE_SIZE - 2
    assert fields[5:7] == (SENSE_SIZE, CDB_SIZE)
    assert fields[7:] == (0, 1, 0)  # max_channel, max_target (2 disks), max_lun


def test_constructor_refuses_bad_disks() -> None:
    with pytest.raises(ConfigError):
        VirtioScsi([])
    with pytest.raises(ConfigError):
        VirtioScsi([FakeDisk(1000)])


def test_decode_lun() -> None:
    assert decode_lun(lun(3, 5)) == (3, 5)
    assert decode_lun(bytes(8)) is None
    assert decode_lun(lun(0)[:7] + b"\x01") is None
    assert decode_lun(b"\x01") is None


def test_inquiry_and_read_write_roundtrip(scsi: Scsi) -> None:
    (_, resid, _, status, response), _, data, used = scsi.command(
        bytes((0x12, 0, 0, 0, 36)), din=64
    )
    assert (status, response) == (sc.GOOD, VIRTIO_SCSI_S_OK)
    assert data[8:16] == sc.VENDOR and resid == 64 - 36 and used == RESP_SIZE + 36
    payload = bytes(range(256)) * 4
    header, _, _, _ = scsi.command(bytes((0x2A, 0)) + struct.pack(">IxH", 3, 2), out=payload)
    assert header[3] == sc.GOOD and header[1] == 0
    assert scsi.disks[0].data[3 * 512 : 5 * 512] == payload
    header, _, data, used = scsi.command(bytes((0x28, 0)) + struct.pack(">IxH", 3, 2), din=1024)
    assert header[3] == sc.GOOD and data == payload and used == RESP_SIZE + 1024


def test_second_target_is_readonly(scsi: Scsi) -> None:
    header, sense, _, _ = scsi.command(
        bytes((0x2A, 0)) + struct.pack(">IxH", 0, 1), target=1, out=bytes(512)
    )
    assert header[3] == sc.CHECK_CONDITION and header[1] == 512
    assert sense[2] == sc.DATA_PROTECT and sense[12] == 0x27
    header, _, data, _ = scsi.command(bytes((0x1A, 0, 0x3F, 0, 255)), target=1, din=255)
    assert data[2] == 0x80  # WP


def test_sync_cache_flushes(scsi: Scsi) -> None:
    header, _, _, _ = scsi.command(bytes((0x35,)))
    assert header[3] == sc.GOOD and ("flush", 0, 0) in scsi.disks[0].calls


def test_io_error_is_a_medium_error(scsi: Scsi) -> None:
    scsi.disks[0].fail = True
    header, sense, _, _ = scsi.command(bytes((0x28, 0)) + struct.pack(">IxH", 0, 1), din=512)
    assert header[3] == sc.CHECK_CONDITION and sense[2] == sc.MEDIUM_ERROR


def test_bad_target_and_lun(scsi: Scsi) -> None:
    header, _, _, used = scsi.command(b"\x00", target=2)
    assert header[4] == VIRTIO_SCSI_S_BAD_TARGET and used == RESP_SIZE
    header, sense, _, _ = scsi.command(b"\x00", unit=1)
    assert header[4] == VIRTIO_SCSI_S_OK and header[3] == sc.CHECK_CONDITION
    assert sense[12] == 0x25
    header, _, data, _ = scsi.command(bytes((0x12, 0, 0, 0, 36)), unit=3, din=36)
    assert data[0] == 0x7F


def test_unknown_opcode(scsi: Scsi) -> None:
    header, sense, _, _ = scsi.command(b"\xc1")
    assert header[3] == sc.CHECK_CONDITION and header[0] == sc.FIXED_SENSE_LEN
    assert (sense[0], sense[2], sense[12]) == (0x70, sc.ILLEGAL_REQUEST, 0x20)


def test_short_request_and_response_come_back_unanswered(scsi: Scsi) -> None:
    # header shorter than struct virtio_scsi_cmd_req
    req = scsi.buffer(CMD_REQ.size - 1)
    resp = scsi.buffer(RESP_SIZE)
    assert scsi.send(REQUEST_QUEUE, [(req, CMD_REQ.size - 1, False), (resp, RESP_SIZE, True)]) == 0
    # response buffer shorter than struct virtio_scsi_cmd_resp
    full = CMD_REQ.pack(lun(0), 0, 0, 0, 0, bytes(CDB_SIZE))
    req = scsi.buffer(full)
    assert scsi.send(REQUEST_QUEUE, [(req, len(full), False), (resp, RESP_SIZE - 1, True)]) == 0
    # no writable part at all
    assert scsi.send(REQUEST_QUEUE, [(req, len(full), False)]) == 0
    assert scsi.dev.errors == 3
    # and the device still serves a valid request afterwards
    assert scsi.command(b"\x00")[0][3] == sc.GOOD


def test_read_larger_than_buffer_is_refused(scsi: Scsi) -> None:
    header, sense, _, used = scsi.command(bytes((0x28, 0)) + struct.pack(">IxH", 0, 4), din=512)
    assert header[3] == sc.CHECK_CONDITION and sense[12] == 0x24 and used == RESP_SIZE


def test_read_scattered_over_many_buffers(scsi: Scsi) -> None:
    scsi.disks[0].data[0:1024] = bytes(range(256)) * 4
    req = CMD_REQ.pack(
        lun(0), 0, 0, 0, 0, (bytes((0x28, 0)) + struct.pack(">IxH", 0, 2)).ljust(32, b"\0")
    )
    resp = scsi.buffer(RESP_SIZE)
    pieces = [scsi.buffer(100) for _ in range(10)] + [scsi.buffer(24)]
    buffers = [(scsi.buffer(req), len(req), False), (resp, RESP_SIZE, True)]
    buffers += [(gpa, 100, True) for gpa in pieces[:10]] + [(pieces[10], 24, True)]
    assert scsi.send(REQUEST_QUEUE, buffers) == RESP_SIZE + 1024
    got = b"".join(scsi.drv.get(g, 100) for g in pieces[:10]) + scsi.drv.get(pieces[10], 24)
    assert got == bytes(range(256)) * 4


def test_control_queue_tmf_and_an(scsi: Scsi) -> None:
    def tmf(subtype: int, target: int = 0, unit: int = 0) -> int:
        req = scsi.buffer(TMF_REQ.pack(VIRTIO_SCSI_T_TMF, subtype, lun(target, unit), 1))
        resp = scsi.buffer(1)
        assert scsi.send(CONTROL_QUEUE, [(req, TMF_REQ.size, False), (resp, 1, True)]) == 1
        return scsi.drv.get(resp, 1)[0]

    assert tmf(0) == VIRTIO_SCSI_S_FUNCTION_SUCCEEDED  # ABORT TASK
    assert tmf(5) == VIRTIO_SCSI_S_FUNCTION_SUCCEEDED  # LOGICAL UNIT RESET
    assert tmf(6) == VIRTIO_SCSI_S_OK  # QUERY TASK
    assert tmf(5, target=9) == VIRTIO_SCSI_S_BAD_TARGET
    assert tmf(5, unit=2) == VIRTIO_SCSI_S_INCORRECT_LUN
    an = scsi.buffer(struct.pack("<I8sI", VIRTIO_SCSI_T_AN_QUERY, lun(0), 0xFF))
    resp = scsi.buffer(5)
    assert scsi.send(CONTROL_QUEUE, [(an, 16, False), (resp, 5, True)]) == 5
    assert scsi.drv.get(resp, 5) == struct.pack("<IB", 0, VIRTIO_SCSI_S_OK)
    # short and unknown control requests come back unanswered
    short = scsi.buffer(2)
    assert scsi.send(CONTROL_QUEUE, [(short, 2, False), (resp, 1, True)]) == 0
    odd = scsi.buffer(struct.pack("<I", 99))
    assert scsi.send(CONTROL_QUEUE, [(odd, 4, False), (resp, 1, True)]) == 0
    trunc = scsi.buffer(struct.pack("<I", VIRTIO_SCSI_T_TMF) + bytes(4))
    assert scsi.send(CONTROL_QUEUE, [(trunc, 8, False), (resp, 1, True)]) == 0


def test_event_queue_buffers_are_kept(scsi: Scsi) -> None:
    buf = scsi.buffer(16)
    head = scsi.drv.add_chain(EVENT_QUEUE, [(buf, 16, True)])
    scsi.drv.publish(EVENT_QUEUE, head)
    scsi.drv.kick(EVENT_QUEUE)
    assert scsi.drv.used(EVENT_QUEUE) == []


def test_unmap_discards_on_the_writable_disk(scsi: Scsi) -> None:
    body = struct.pack(">QI4x", 8, 16)
    params = struct.pack(">HH4x", 6 + len(body), len(body)) + body
    cdb = bytes((0x42, 0, 0, 0, 0, 0, 0)) + struct.pack(">H", len(params))
    header, _, _, _ = scsi.command(cdb, out=params)
    assert header[3] == sc.GOOD and header[1] == 0
    assert ("discard", 8 * 512, 16 * 512) in scsi.disks[0].calls
    # not offered on the read-only disk
    header, sense, _, _ = scsi.command(cdb, target=1, out=params)
    assert header[3] == sc.CHECK_CONDITION and sense[12] == 0x20
    # a list past the end of the disk does nothing
    scsi.disks[0].calls.clear()
    body = struct.pack(">QI4x", DISK // 512 - 1, 2)
    params = struct.pack(">HH4x", 6 + len(body), len(body)) + body
    header, sense, _, _ = scsi.command(cdb, out=params)
    assert header[3] == sc.CHECK_CONDITION and sense[12] == 0x21
    assert not scsi.disks[0].calls


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(min_size=0, max_size=CMD_REQ.size + 8),
        st.builds(
            lambda t, u, cdb: CMD_REQ.pack(lun(t, u), 0, 0, 0, 0, cdb),
            st.integers(0, 2),
            st.integers(0, 1),
            st.binary(min_size=CDB_SIZE, max_size=CDB_SIZE),
        ),
    ),
    st.integers(0, RESP_SIZE + 8),
    st.integers(0, 4096),
    st.binary(max_size=600),
)
def test_any_request_is_answered_and_the_device_lives(
    req: bytes, resp_len: int, din: int, out: bytes
) -> None:
    scsi = Scsi(FakeDisk(DISK), FakeDisk(DISK, read_only=True))
    buffers = [(scsi.buffer(req), len(req), False)]
    if out:
        buffers.append((scsi.buffer(out), len(out), False))
    buffers.append((scsi.buffer(resp_len), resp_len, True))
    if din:
        buffers.append((scsi.buffer(din), din, True))
    used = scsi.send(REQUEST_QUEUE, buffers)
    assert used <= resp_len + din
    assert scsi.command(b"\x00")[0][3] == sc.GOOD
