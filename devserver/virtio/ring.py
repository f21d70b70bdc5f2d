"""Split virtqueue layouts (virtio 1.2 §2.7.5 The Virtqueue Descriptor Table,
§2.7.6 The Virtqueue Available Ring, §2.7.8 The Virtqueue Used Ring).

Precompiled little-endian Structs, used with `unpack_from`/`pack` on bytes read
from guest memory (about 100 ns a descriptor, style.md §2): plain tuples on the
hot path, no per-descriptor objects.

    virtq_desc   { le64 addr; le32 len; le16 flags; le16 next; }           16 bytes
    virtq_avail  { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }
    virtq_used   { le16 flags; le16 idx; virtq_used_elem ring[size]; le16 avail_event; }
    virtq_used_elem { le32 id; le32 len; }                                   8 bytes

Ordering: the device writes a used element before it publishes used.idx, and
reads avail.idx before the ring entries it covers. Between processes sharing
guest RAM on x86 this relies on TSO (stores are seen in order, loads are not
reordered with older loads), as vhost-user back-ends in C do with compiler
barriers only. Over DMA messages, where the frontend may carry requests out in
any order, the queue fences instead (chain.BatchedRingMemory), and reads
what an avail.idx covers only in a request after the one that read it.
"""

from __future__ import annotations

import struct
from typing import Final

DESC: Final = struct.Struct("<QIHH")
DESC_SIZE: Final = DESC.size  # 16
U16: Final = struct.Struct("<H")
RING_HEADER: Final = struct.Struct("<HH")  # flags, idx (avail and used alike)
RING_HEADER_SIZE: Final = RING_HEADER.size
USED_ELEM: Final = struct.Struct("<II")
USED_ELEM_SIZE: Final = USED_ELEM.size  # 8

# §2.7: alignment of each part (the driver's duty; the device relies on nothing).
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4


def desc_table_size(queue_size: int) -> int:
    return DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """Bytes of the driver area, used_event included."""
    return RING_HEADER_SIZE + 2 * queue_size + 2


def used_ring_size(queue_size: int) -> int:
    """Bytes of the device area, avail_event included."""
    return RING_HEADER_SIZE + USED_ELEM_SIZE * queue_size + 2


def avail_entry_offset(slot: int) -> int:
    return RING_HEADER_SIZE + 2 * slot


def used_entry_offset(slot: int) -> int:
    return RING_HEADER_SIZE + USED_ELEM_SIZE * slot


def used_event_offset(queue_size: int) -> int:
    """avail ring's trailing used_event (VIRTIO_F_EVENT_IDX)."""
    return RING_HEADER_SIZE + 2 * queue_size


def avail_event_offset(queue_size: int) -> int:
    """used ring's trailing avail_event (VIRTIO_F_EVENT_IDX)."""
    return RING_HEADER_SIZE + USED_ELEM_SIZE * queue_size
