"""virtio-blk (virtio 1.2 §5.2 Block Device).

One request queue, or `num_queues` of them with VIRTIO_BLK_F_MQ (§5.2.3; Linux
makes one hardware queue per queue up to its CPU count, and the transport gives
each its own MSI-X vector). A request is a chain (§5.2.6):

    readable   struct virtio_blk_req header: le32 type, le32 reserved, le64 sector
    readable   OUT data, or DISCARD / WRITE_ZEROES segments (16 bytes each)
    writable   IN data, or GET_ID's 20-byte serial
    writable   u8 status (the chain's last writable byte)

Parsing (`Request.parse`) is pure and never raises on guest input: a request it
cannot make sense of carries the status it must be answered with. Every popped
head is returned (reliability.md C9, cloud-hypervisor#8401: a head kept back
stalls the queue); the status byte is written when the chain has one, and a
chain with none is returned with length 0.

Discard and write-zeroes free the image's blocks (the backend punches holes):
DISCARD always, WRITE_ZEROES when the driver sets the UNMAP flag, which
`write_zeroes_may_unmap` invites. `discard=False` (QEMU's discard=off) offers
neither DISCARD nor unmapping; WRITE_ZEROES then zeroes and keeps the blocks.

The host cache mode (QEMU's cache=) is the backend's; two things of it show
here. blk_size is the backend's `block_size`, the alignment its O_DIRECT needs
(512 buffered), so a guest's requests go straight through; topology is counted
in those blocks. `write_cache=False` (cache=directsync, every write durable on
completion) offers no VIRTIO_BLK_F_FLUSH, which tells the driver the disk is
write-through (§5.2.5: without FLUSH or CONFIG_WCE), so it sends no flushes; a
FLUSH it sends anyway is still done.

The disk is a `BlockBackend` (ports.py), called synchronously here; the service
runs this device's work off the event loop, one call at a time per device
(every queue of it included).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..errors import BackendError, ConfigError, GuestMemoryError
from ..ports import BlockBackend
from ..virtio.chain import DescriptorChain, Reader, RingMemory, Segment, Writer, skip_bytes
from ..virtio.device import QUEUE_WEIGHT, VirtioDevice
from ..virtio.spec import VirtioDeviceId, feature_bit

SECTOR_SIZE: Final = 512
SECTOR_SHIFT: Final = 9
QUEUE_SIZE: Final = 256
SEG_MAX: Final = QUEUE_SIZE - 2  # header and status take a descriptor each (QEMU's rule)
ID_BYTES: Final = 20  # §5.2.6: VIRTIO_BLK_ID_BYTES
# Limits offered in the configuration structure (§5.2.4), in 512-byte sectors.
MAX_DISCARD_SECTORS: Final = 1 << 22  # 2 GiB a segment
# Segments a request may carry (Linux merges discards up to this): 16 bytes
# each, so a request's segment list is at most 512 bytes to read.
MAX_DISCARD_SEG: Final = 32
# Linux's discard granularity (<< 9): 4 KiB, the host filesystem block a hole
# punch frees whole (a smaller range would only be zeroed) and the guest page.
DISCARD_SECTOR_ALIGNMENT: Final = 8
MAX_WRITE_ZEROES_SECTORS: Final = 1 << 22
MAX_WRITE_ZEROES_SEG: Final = 32
# Topology (VIRTIO_BLK_F_TOPOLOGY), in logical blocks: 4 KiB physical blocks
# (2^3 512-byte blocks), the host filesystem's and page cache's unit, so a guest
# filesystem picks 4 KiB blocks and aligns to them; optimal I/O is what the
# device moves per step (CHUNK, 1 MiB).
PHYSICAL_BLOCK_BYTES: Final = 4096
# blk_size values offered: a sector, or the backend's larger O_DIRECT block.
BLOCK_SIZES: Final = (512, 1024, 2048, 4096)
# Queues with num_queues (VIRTIO_BLK_F_MQ): each costs a queue and an MSI-X
# vector; more than a guest has vCPUs buys nothing.
MAX_QUEUES: Final = 16
# Bytes moved between guest memory and the backend per step: a guest's lengths
# never decide how much the server allocates at once.
CHUNK: Final = 1 << 20

# §5.2.3 feature bits
VIRTIO_BLK_F_SIZE_MAX: Final = 1
VIRTIO_BLK_F_SEG_MAX: Final = 2
VIRTIO_BLK_F_RO: Final = 5
VIRTIO_BLK_F_BLK_SIZE: Final = 6
VIRTIO_BLK_F_FLUSH: Final = 9
VIRTIO_BLK_F_TOPOLOGY: Final = 10
VIRTIO_BLK_F_MQ: Final = 12
VIRTIO_BLK_F_DISCARD: Final = 13
VIRTIO_BLK_F_WRITE_ZEROES: Final = 14

# §5.2.6 request types and statuses
VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_T_DISCARD: Final = 11
VIRTIO_BLK_T_WRITE_ZEROES: Final = 13
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 1

HEADER: Final = struct.Struct("<IIQ")
SEGMENT: Final = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes
# struct virtio_blk_config through write_zeroes_may_unmap and its padding (60 bytes):
# capacity, size_max, seg_max, geometry(c,h,s), blk_size, topology(exp, align,
# min_io, opt_io), writeback, unused0, num_queues, max_discard_sectors,
# max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
# max_write_zeroes_seg, write_zeroes_may_unmap, unused1[3]
CONFIG: Final = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


class BlockRequestError(Exception):
    """A request answered with `status` (raised and caught inside this module)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request. `status_at` is the status byte's address (None: the
    chain has no writable byte); `error` set means answer with that status."""

    type: int
    sector: int
    readable: tuple[Segment, ...]  # after the header
    writable: tuple[Segment, ...]  # before the status byte
    status_at: int | None
    error: int | None = None
    reason: str = ""

    @property
    def readable_len(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)

    @classmethod
    def parse(cls, memory: RingMemory, chain: DescriptorChain) -> Request:
        writable = list(chain.writable)
        status_at: int | None = None
        if writable:
            gpa, length = writable[-1]
            status_at = gpa + length - 1
            if length == 1:
                writable.pop()
            else:
                writable[-1] = (gpa, length - 1)
        if chain.readable_len < HEADER.size:
            return cls(
                -1,
                0,
                (),
                (),
                status_at,
                VIRTIO_BLK_S_IOERR,
                f"header is {chain.readable_len} bytes, not {HEADER.size}",
            )
        reader = Reader(memory, chain.readable)
        type_, _reserved, sector = HEADER.unpack(reader.read(HEADER.size))
        rest = tuple(skip_bytes(chain.readable, HEADER.size))
        if status_at is None:
            return cls(type_, sector, rest, (), None, VIRTIO_BLK_S_IOERR, "no status byte")
        return cls(type_, sector, rest, tuple(writable), status_at)


class VirtioBlk(VirtioDevice):
    """The block device over a BlockBackend."""

    device_type = VirtioDeviceId.BLOCK
    type_name = "virtio-blk"
    pci_class_code = 0x018000  # mass storage, other (QEMU's virtio-blk-pci)

    def __init__(
        self,
        backend: BlockBackend,
        *,
        serial: str = "",
        discard: bool = True,
        num_queues: int = 1,
        write_cache: bool = True,
    ) -> None:
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ConfigError(f"virtio-blk num-queues={num_queues} is not 1..{MAX_QUEUES}")
        if backend.size % SECTOR_SIZE:
            raise ConfigError(f"a disk image of {backend.size} bytes is not a multiple of 512")
        encoded = serial.encode()
        if len(encoded) > ID_BYTES:
            raise ConfigError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        block = backend.block_size
        if block not in BLOCK_SIZES or backend.size % block:
            raise ConfigError(
                f"a disk image of {backend.size} bytes cannot have {block}-byte blocks"
            )
        features = (
            feature_bit(VIRTIO_BLK_F_SEG_MAX)
            | feature_bit(VIRTIO_BLK_F_BLK_SIZE)
            | feature_bit(VIRTIO_BLK_F_TOPOLOGY)
            | feature_bit(VIRTIO_BLK_F_WRITE_ZEROES)
        )
        if write_cache:
            features |= feature_bit(VIRTIO_BLK_F_FLUSH)
        if discard:
            features |= feature_bit(VIRTIO_BLK_F_DISCARD)
        if num_queues > 1:
            features |= feature_bit(VIRTIO_BLK_F_MQ)
        if backend.read_only:
            features |= feature_bit(VIRTIO_BLK_F_RO)
        super().__init__((QUEUE_SIZE,) * num_queues, features)
        self.backend = backend
        self.discard = discard
        self.num_queues = num_queues
        self.write_cache = write_cache
        self.block_size = block
        self.serial = encoded.ljust(ID_BYTES, b"\0")
        self.capacity = backend.size >> SECTOR_SHIFT
        self.errors = 0  # requests answered with a status other than OK

    def config_bytes(self) -> bytes:
        # Topology is in logical blocks (blk_size): 4 KiB physical blocks, or
        # the logical block when larger; optimal I/O one CHUNK.
        physical = max(PHYSICAL_BLOCK_BYTES, self.block_size)
        return CONFIG.pack(
            self.capacity,
            0,  # size_max: not offered
            SEG_MAX,
            0,
            0,
            0,  # geometry: not offered
            self.block_size,
            (physical // self.block_size).bit_length() - 1,  # physical_block_exp
            0,  # alignment_offset
            physical // self.block_size,  # min_io_size
            CHUNK // self.block_size,  # opt_io_size
            0,  # writeback: not offered (CONFIG_WCE)
            0,
            self.num_queues,
            MAX_DISCARD_SECTORS if self.discard else 0,
            MAX_DISCARD_SEG if self.discard else 0,
            DISCARD_SECTOR_ALIGNMENT if self.discard else 0,
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            int(self.discard),  # write_zeroes_may_unmap
        )

    def notify(self, queue_index: int) -> bool:
        queue = self.queues.get(queue_index)
        memory = self.memory
        if queue is None or memory is None:
            return False
        for _ in range(QUEUE_WEIGHT):
            chain = queue.pop()
            if chain is None:
                return False
            request = Request.parse(memory, chain)
            status, written = self._execute(memory, request)
            if status != VIRTIO_BLK_S_OK:
                self.errors += 1
            if request.status_at is None:
                self.complete(queue, chain, 0)
                continue
            try:
                memory.write(request.status_at, bytes((status,)))
            except GuestMemoryError:
                # The chain was checked to be in RAM when popped; a region that
                # left since is the guest's doing: return the head, nothing written.
                self.complete(queue, chain, 0)
                continue
            self.complete(queue, chain, written + 1)
        return queue.available() > 0

    # -- requests

    def _execute(self, memory: RingMemory, request: Request) -> tuple[int, int]:
        """(status, data bytes written into the chain before the status byte)."""
        if request.error is not None:
            return request.error, 0
        try:
            match request.type:
                case 0:  # VIRTIO_BLK_T_IN
                    return VIRTIO_BLK_S_OK, self._read(memory, request)
                case 1:  # VIRTIO_BLK_T_OUT
                    self._write(memory, request)
                case 4:  # VIRTIO_BLK_T_FLUSH
                    self.backend.flush()
                case 8:  # VIRTIO_BLK_T_GET_ID
                    writer = Writer(memory, request.writable)
                    return VIRTIO_BLK_S_OK, writer.write(self.serial)
                case 11 if self.discard:  # VIRTIO_BLK_T_DISCARD
                    self._ranges(memory, request)
                case 13:  # VIRTIO_BLK_T_WRITE_ZEROES
                    self._ranges(memory, request)
                case _:
                    return VIRTIO_BLK_S_UNSUPP, 0
        except BlockRequestError as e:
            return e.status, 0
        except (OSError, BackendError):
            return VIRTIO_BLK_S_IOERR, 0
        return VIRTIO_BLK_S_OK, 0

    def _range(self, sector: int, length: int) -> int:
        """Byte offset of `length` bytes at `sector`, or IOERR when outside the disk
        (the sum is checked in Python integers, so no u64 wrap hides an overflow)."""
        if length % SECTOR_SIZE:
            raise BlockRequestError(VIRTIO_BLK_S_IOERR, f"{length} bytes is not whole sectors")
        if sector + (length >> SECTOR_SHIFT) > self.capacity:
            raise BlockRequestError(VIRTIO_BLK_S_IOERR, "past the end of the disk")
        return sector << SECTOR_SHIFT

    def _read(self, memory: RingMemory, request: Request) -> int:
        length = request.writable_len
        offset = self._range(request.sector, length)
        writer = Writer(memory, request.writable)
        done = 0
        while done < length:
            take = min(CHUNK, length - done)
            data = self.backend.read(offset + done, take)
            if len(data) != take:
                raise BlockRequestError(VIRTIO_BLK_S_IOERR, "short read from the image")
            writer.write(data)
            done += take
        return done

    def _write(self, memory: RingMemory, request: Request) -> None:
        if self.backend.read_only:
            raise BlockRequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
        length = request.readable_len
        offset = self._range(request.sector, length)
        reader = Reader(memory, request.readable)
        done = 0
        while done < length:
            data = reader.read(min(CHUNK, length - done))
            self.backend.write(offset + done, data)
            done += len(data)

    def _ranges(self, memory: RingMemory, request: Request) -> None:
        discard = request.type == VIRTIO_BLK_T_DISCARD
        if self.backend.read_only:
            raise BlockRequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
        length = request.readable_len
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if length == 0 or length % SEGMENT.size or length // SEGMENT.size > max_seg:
            raise BlockRequestError(VIRTIO_BLK_S_UNSUPP, f"{length} bytes of segments")
        raw = Reader(memory, request.readable).read(length)
        segments = [SEGMENT.unpack_from(raw, at) for at in range(0, length, SEGMENT.size)]
        for sector, sectors, flags in segments:  # all checked before any is done
            allowed = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            if flags & ~allowed or sectors > max_sectors:
                raise BlockRequestError(VIRTIO_BLK_S_UNSUPP, "bad flags or too many sectors")
            self._range(sector, sectors << SECTOR_SHIFT)
        for sector, sectors, flags in segments:
            offset, size = sector << SECTOR_SHIFT, sectors << SECTOR_SHIFT
            if discard:
                self.backend.discard(offset, size)
            else:
                # Without discard, write_zeroes_may_unmap is 0: the flag asks for
                # nothing the device offered, so the blocks stay (QEMU's rule).
                unmap = self.discard and bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
                self.backend.write_zeroes(offset, size, unmap=unmap)
