"""virtio-scsi (virtio 1.2 §5.6 SCSI Host Device) with disk LUNs on raw images.

Each disk is target N, LUN 0 (max_target = disks - 1, max_lun = 0): Linux's
virtio_scsi scans every target's LUN 0 and asks it REPORT LUNS, so one LUN a
target is found without relying on sparse-LUN scanning.

Queues (§5.6.2): 0 control, 1 event, 2 request (num_queues = 1).

A request chain (§5.6.6):

    readable   struct virtio_scsi_cmd_req: u8 lun[8], le64 id, u8 task_attr,
               u8 prio, u8 crn, u8 cdb[CDB_SIZE]
    readable   data-out (WRITE)
    writable   struct virtio_scsi_cmd_resp: le32 sense_len, le32 resid,
               le16 status_qualifier, u8 status, u8 response, u8 sense[SENSE_SIZE]
    writable   data-in (READ, INQUIRY, ...)

The SCSI commands themselves are scsi_commands.py (pure). A chain too short
for the request header or the response is returned with length 0 (every
popped head comes back, reliability.md C9). The control queue answers task
management (§5.6.6.2): commands complete before the next is taken, so no task
is ever in flight to abort and every TMF succeeds; asynchronous notification
queries and subscriptions get no events. The event queue's buffers are kept
(no hotplug, so nothing is ever reported on it).

Disks are BlockBackends (ports.py), called synchronously here; the service
runs this device's queue work off the event loop like virtio-blk's. UNMAP (thin provisioning,
offered on writable disks) is the backend's discard: a hole punched in the
image.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from ..errors import BackendError, ConfigError, GuestMemoryError
from ..ports import BlockBackend
from ..virtio.chain import (
    MAX_COPY,
    ChainError,
    DescriptorChain,
    Reader,
    RingMemory,
    Writer,
    skip_bytes,
)
from ..virtio.device import QUEUE_WEIGHT, VirtioDevice
from ..virtio.queue import SplitQueue
from ..virtio.spec import VirtioDeviceId
from . import scsi_commands as cmd

QUEUE_SIZE: Final = 128
CONTROL_QUEUE: Final = 0
EVENT_QUEUE: Final = 1
REQUEST_QUEUE: Final = 2
CDB_SIZE: Final = 32  # §5.6.4 defaults, which Linux writes back unchanged
SENSE_SIZE: Final = 96
SEG_MAX: Final = QUEUE_SIZE - 2  # request header and response take a descriptor each
MAX_SECTORS: Final = 0xFFFF  # per command, in 512-byte sectors (Linux's default)
MAX_DISKS: Final = 64
SECTOR_SIZE: Final = 512
# Bytes moved between guest memory and a disk per step (blk.CHUNK's reason):
# one Reader/Writer copy, so a step is never cut short.
CHUNK: Final = MAX_COPY

# §5.6.6 request header, response header
CMD_REQ: Final = struct.Struct(f"<8sQBBB{CDB_SIZE}s")
CMD_RESP: Final = struct.Struct("<IIHBB")
RESP_SIZE: Final = CMD_RESP.size + SENSE_SIZE
# struct virtio_scsi_config: num_queues, seg_max, max_sectors, cmd_per_lun,
# event_info_size, sense_size, cdb_size, max_channel, max_target, max_lun
CONFIG: Final = struct.Struct("<IIIIIIIHHI")
EVENT_INFO_SIZE: Final = 16  # struct virtio_scsi_event

# §5.6.6 response codes
VIRTIO_SCSI_S_OK: Final = 0
VIRTIO_SCSI_S_OVERRUN: Final = 1
VIRTIO_SCSI_S_BAD_TARGET: Final = 3
VIRTIO_SCSI_S_FAILURE: Final = 9
VIRTIO_SCSI_S_FUNCTION_SUCCEEDED: Final = 10
VIRTIO_SCSI_S_FUNCTION_REJECTED: Final = 11
VIRTIO_SCSI_S_INCORRECT_LUN: Final = 12
# §5.6.6.2 control request types and TMF subtypes
VIRTIO_SCSI_T_TMF: Final = 0
VIRTIO_SCSI_T_AN_QUERY: Final = 1
VIRTIO_SCSI_T_AN_SUBSCRIBE: Final = 2
VIRTIO_SCSI_T_TMF_QUERY_TASK: Final = 6
VIRTIO_SCSI_T_TMF_QUERY_TASK_SET: Final = 7
CTRL_TYPE: Final = struct.Struct("<I")
TMF_REQ: Final = struct.Struct("<II8sQ")  # type, subtype, lun, id
AN_REQ: Final = struct.Struct("<I8sI")  # type, lun, event_requested
AN_RESP: Final = struct.Struct("<IB")  # event_actual, response


def decode_lun(lun: bytes) -> tuple[int, int] | None:
    """(target, LUN) of virtio-scsi's single-level LUN format (§5.6.6.1:
    lun[0] = 1, lun[1] = target, lun[2..3] = 0x4000 | LUN), or None."""
    if len(lun) != 8 or lun[0] != 1 or any(lun[4:]):
        return None
    return lun[1], ((lun[2] << 8) | lun[3]) & 0x3FFF


class VirtioScsi(VirtioDevice):
    """A SCSI host with one disk LUN per target, over BlockBackends."""

    device_type = VirtioDeviceId.SCSI
    type_name = "virtio-scsi"
    pci_class_code = 0x010000  # mass storage, SCSI (QEMU's virtio-scsi-pci)

    def __init__(
        self, disks: Sequence[BlockBackend], *, serials: Sequence[str] = (), discard: bool = True
    ) -> None:
        if not 1 <= len(disks) <= MAX_DISKS:
            raise ConfigError(f"virtio-scsi needs 1..{MAX_DISKS} disks, not {len(disks)}")
        luns: list[cmd.Disk] = []
        for n, backend in enumerate(disks):
            if backend.size % SECTOR_SIZE or backend.size == 0:
                raise ConfigError(
                    f"virtio-scsi disk {n}: an image of {backend.size} bytes is not "
                    "a non-zero multiple of 512"
                )
            serial = serials[n] if n < len(serials) else f"devmodel-scsi{n}"
            luns.append(
                cmd.Disk(
                    blocks=backend.size // SECTOR_SIZE,
                    block_size=SECTOR_SIZE,
                    read_only=backend.read_only,
                    serial=serial.encode("ascii", "replace")[: cmd.MAX_SERIAL],
                    max_transfer_blocks=MAX_SECTORS,
                    optimal_transfer_blocks=CHUNK // SECTOR_SIZE,
                    unmap=discard and not backend.read_only,
                )
            )
        super().__init__((QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE))
        self.backends = tuple(disks)
        self.luns = tuple(luns)
        self.errors = 0  # commands answered with CHECK CONDITION or a failure response

    def config_bytes(self) -> bytes:
        return CONFIG.pack(
            1,  # num_queues: request queues
            SEG_MAX,
            MAX_SECTORS,
            QUEUE_SIZE,  # cmd_per_lun
            EVENT_INFO_SIZE,
            SENSE_SIZE,
            CDB_SIZE,
            0,  # max_channel
            len(self.luns) - 1,  # max_target
            0,  # max_lun
        )

    def notify(self, queue_index: int) -> bool:
        queue = self.queues.get(queue_index)
        memory = self.memory
        if queue is None or memory is None or queue_index == EVENT_QUEUE:
            return False  # event buffers wait for events that never come
        for _ in range(QUEUE_WEIGHT):
            chain = queue.pop()
            if chain is None:
                return False
            self._answer(queue, memory, chain, queue_index == CONTROL_QUEUE)
        return queue.available() > 0

    def _answer(
        self, queue: SplitQueue, memory: RingMemory, chain: DescriptorChain, control: bool
    ) -> None:
        try:
            written = self._control(memory, chain) if control else self._command(memory, chain)
        except (ChainError, GuestMemoryError):
            # The chain was in RAM when popped; a region gone since is the
            # guest's doing: return the head with nothing counted written.
            written = 0
        self.complete(queue, chain, written)

    # -- control queue (§5.6.6.2)

    def _control(self, memory: RingMemory, chain: DescriptorChain) -> int:
        reader = Reader(memory, chain.readable)
        head = reader.read(CTRL_TYPE.size)
        if len(head) < CTRL_TYPE.size:
            return 0
        (type_,) = CTRL_TYPE.unpack(head)
        writer = Writer(memory, chain.writable)
        if type_ == VIRTIO_SCSI_T_TMF:
            rest = reader.read(TMF_REQ.size - CTRL_TYPE.size)
            if len(rest) < TMF_REQ.size - CTRL_TYPE.size:
                return 0
            _, subtype, lun, _id = TMF_REQ.unpack(head + rest)
            response = self._tmf(subtype, lun)
            return writer.write(bytes((response,)))
        if type_ in (VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE):
            if chain.readable_len < AN_REQ.size:
                return 0
            # No asynchronous events are supported: none actual, OK.
            return writer.write(AN_RESP.pack(0, VIRTIO_SCSI_S_OK))
        self.errors += 1
        return 0  # unknown type: its response layout is unknown too

    def _tmf(self, subtype: int, lun: bytes) -> int:
        where = decode_lun(lun)
        if where is None or where[0] >= len(self.luns):
            return VIRTIO_SCSI_S_BAD_TARGET
        if where[1] != 0:
            return VIRTIO_SCSI_S_INCORRECT_LUN
        if subtype in (VIRTIO_SCSI_T_TMF_QUERY_TASK, VIRTIO_SCSI_T_TMF_QUERY_TASK_SET):
            return VIRTIO_SCSI_S_OK  # FUNCTION COMPLETE: no such task is in flight
        if subtype > VIRTIO_SCSI_T_TMF_QUERY_TASK_SET:
            return VIRTIO_SCSI_S_FUNCTION_REJECTED
        # Abort, clear, LUN / nexus reset: nothing is in flight (commands
        # complete before the next is taken), so each is done already.
        return VIRTIO_SCSI_S_FUNCTION_SUCCEEDED

    # -- request queue (§5.6.6.1)

    def _command(self, memory: RingMemory, chain: DescriptorChain) -> int:
        if chain.readable_len < CMD_REQ.size or chain.writable_len < RESP_SIZE:
            self.errors += 1
            return 0
        reader = Reader(memory, chain.readable)
        lun, _id, _attr, _prio, _crn, cdb = CMD_REQ.unpack(reader.read(CMD_REQ.size))
        data_out_len = chain.readable_len - CMD_REQ.size
        data_in_len = chain.writable_len - RESP_SIZE
        where = decode_lun(lun)
        if where is None or where[0] >= len(self.luns):
            self.errors += 1
            return self._respond(memory, chain, VIRTIO_SCSI_S_BAD_TARGET, cmd.Reply(cmd.GOOD), 0)
        disk = self.luns[where[0]] if where[1] == 0 else None
        decoded = cmd.decode(cdb, disk, data_in_len=data_in_len, data_out_len=data_out_len)
        consumed = moved = 0  # data-out bytes taken, data-in bytes given
        if isinstance(decoded, cmd.Transfer):
            reply = self._transfer(memory, chain, where[0], decoded)
            if reply.status == cmd.GOOD:
                consumed, moved = (decoded.length, 0) if decoded.write else (0, decoded.length)
        elif isinstance(decoded, cmd.Flush):
            reply = self._flush(where[0])
        elif isinstance(decoded, cmd.Unmap):
            reply = self._unmap(memory, chain, where[0], decoded)
            consumed = decoded.length if reply.status == cmd.GOOD else 0
        else:
            reply = decoded
            if reply.data:
                moved = self._data_in(memory, chain).write(reply.data)
        if reply.status != cmd.GOOD:
            self.errors += 1
        # resid (§5.6.6.1): what the command left of its data buffer.
        resid = data_out_len - consumed if data_out_len else data_in_len - moved
        return self._respond(memory, chain, VIRTIO_SCSI_S_OK, reply, resid) + moved

    def _data_in(self, memory: RingMemory, chain: DescriptorChain) -> Writer:
        """A writer over the data-in buffer: the writable bytes after the response."""
        return Writer(memory, tuple(skip_bytes(chain.writable, RESP_SIZE)))

    def _respond(
        self,
        memory: RingMemory,
        chain: DescriptorChain,
        response: int,
        reply: cmd.Reply,
        resid: int,
    ) -> int:
        sense = reply.sense[:SENSE_SIZE]
        header = CMD_RESP.pack(len(sense), max(0, resid) & 0xFFFFFFFF, 0, reply.status, response)
        Writer(memory, chain.writable).write((header + sense).ljust(RESP_SIZE, b"\0"))
        return RESP_SIZE

    def _transfer(
        self, memory: RingMemory, chain: DescriptorChain, target: int, transfer: cmd.Transfer
    ) -> cmd.Reply:
        backend = self.backends[target]
        done = 0
        try:
            if transfer.write:
                reader = Reader(memory, tuple(skip_bytes(chain.readable, CMD_REQ.size)))
                while done < transfer.length:
                    data = reader.read(min(CHUNK, transfer.length - done))
                    if not data:
                        break
                    backend.write(transfer.offset + done, data)
                    done += len(data)
            else:
                writer = self._data_in(memory, chain)
                while done < transfer.length:
                    take = min(CHUNK, transfer.length - done)
                    data = backend.read(transfer.offset + done, take)
                    if len(data) != take:
                        return cmd.check(cmd.MEDIUM_ERROR, cmd.ASC_UNRECOVERED_READ_ERROR)
                    writer.write(data)
                    done += take
        except (OSError, BackendError):
            asc = cmd.ASC_WRITE_ERROR if transfer.write else cmd.ASC_UNRECOVERED_READ_ERROR
            return cmd.check(cmd.MEDIUM_ERROR, asc)
        return cmd.Reply(cmd.GOOD)

    def _unmap(
        self, memory: RingMemory, chain: DescriptorChain, target: int, unmap: cmd.Unmap
    ) -> cmd.Reply:
        # unmap.length was checked against the data-out buffer and
        # MAX_UNMAP_PARAMS (a few hundred bytes) by decode.
        params = Reader(memory, tuple(skip_bytes(chain.readable, CMD_REQ.size))).read(unmap.length)
        ranges = cmd.decode_unmap(params, self.luns[target])
        if isinstance(ranges, cmd.Reply):
            return ranges
        try:
            for offset, length in ranges:
                self.backends[target].discard(offset, length)
        except (OSError, BackendError):
            return cmd.check(cmd.MEDIUM_ERROR, cmd.ASC_WRITE_ERROR)
        return cmd.Reply(cmd.GOOD)

    def _flush(self, target: int) -> cmd.Reply:
        try:
            self.backends[target].flush()
        except (OSError, BackendError):
            return cmd.check(cmd.MEDIUM_ERROR, cmd.ASC_WRITE_ERROR)
        return cmd.Reply(cmd.GOOD)
