"""virtio-9p (virtio 1.2 §5.11, the 9P transport; Linux's net/9p/trans_virtio.c).

One request queue. A request is a chain: the T-message in its device-readable
buffers, room for the R-message in its device-writable ones; the reply's
length is the used length. The configuration structure is the mount tag
(`le16 tag_len; u8 tag[tag_len]`, with VIRTIO_9P_MOUNT_TAG), which the guest
names in `mount -t 9p -o trans=virtio TAG DIR`.

This module frames and decodes (p9_protocol.py) and answers what needs no
file system: Tversion (msize negotiated down to MAX_MSIZE; every fid
forgotten), Tflush (requests are served one at a time, in order, so none is
ever in flight to cancel) and a message that does not parse (Rlerror EINVAL,
or the chain returned empty when it has no header). The rest goes to the
`P9Export` port, the shell's file-system half, called synchronously here:
the service runs this device's work off the event loop, as blk's.

Every length the guest chooses is bounded before anything is allocated: a
request is read only up to the negotiated msize (a chain claiming more is
answered EINVAL without being read), a reply never exceeds the writable
bytes nor msize.
"""

from __future__ import annotations

import errno
import struct
from typing import Final

from ..errors import ConfigError
from ..ports import P9Export
from ..virtio.chain import DescriptorChain, Reader, RingMemory, Writer
from ..virtio.device import QUEUE_WEIGHT, VirtioDevice
from ..virtio.spec import VirtioDeviceId, feature_bit
from . import p9_protocol as p9

QUEUE_SIZE: Final = 128  # QEMU's MAX_REQ
VIRTIO_9P_MOUNT_TAG: Final = 0
# Longest mount tag offered (bytes); Linux copies tag_len bytes of config.
MAX_TAG_BYTES: Final = 64
TAG_LEN: Final = struct.Struct("<H")


def check_tag(tag: str) -> bytes:
    """The tag's bytes, or ConfigError naming what is wrong with it."""
    raw = tag.encode()
    if not raw or len(raw) > MAX_TAG_BYTES:
        raise ConfigError(f"virtio-9p tag={tag!r}: give 1..{MAX_TAG_BYTES} bytes")
    if any(c <= 0x20 or c in b",/" for c in raw):
        raise ConfigError(f"virtio-9p tag={tag!r}: no spaces, commas, slashes or control bytes")
    return raw


class Virtio9p(VirtioDevice):
    """9P2000.L over virtio, the file system behind a P9Export."""

    device_type = VirtioDeviceId.P9
    type_name = "virtio-9p"
    pci_class_code = 0x000200  # QEMU's virtio-9p-pci (class_id 0x0002)

    def __init__(self, export: P9Export, *, tag: str) -> None:
        super().__init__((QUEUE_SIZE,), feature_bit(VIRTIO_9P_MOUNT_TAG))
        self.export = export
        self.tag = check_tag(tag)
        self.msize = p9.MAX_MSIZE  # until a Tversion lowers it
        self.errors = 0  # requests answered Rlerror by this module (malformed)

    def config_bytes(self) -> bytes:
        return TAG_LEN.pack(len(self.tag)) + self.tag

    def reset(self) -> None:
        super().reset()
        self.msize = p9.MAX_MSIZE
        self.export.reset()

    def notify(self, queue_index: int) -> bool:
        queue = self.queues.get(queue_index)
        memory = self.memory
        if queue is None or memory is None:
            return False
        for _ in range(QUEUE_WEIGHT):
            chain = queue.pop()
            if chain is None:
                return False
            self.complete(queue, chain, self._serve(memory, chain))
        return queue.available() > 0

    def _serve(self, memory: RingMemory, chain: DescriptorChain) -> int:
        """Answer one chain; returns the bytes written into it."""
        writer = Writer(memory, chain.writable)
        limit = min(writer.remaining, self.msize)
        reader = Reader(memory, chain.readable)
        head = reader.read(p9.HEADER_SIZE)
        if len(head) < p9.HEADER_SIZE or limit < p9.IO_HEADER_SIZE:
            self.errors += 1
            return 0  # no tag to answer, or no room for any reply
        size, _type, tag = p9.peek_header(head)
        if not p9.HEADER_SIZE <= size <= min(self.msize, chain.readable_len):
            self.errors += 1
            return writer.write(p9.rlerror(tag, errno.EINVAL))
        data = head + reader.read(size - p9.HEADER_SIZE)
        try:
            tag, message = p9.decode(data, self.msize)
        except p9.P9ProtocolError:
            self.errors += 1
            return writer.write(p9.rlerror(tag, errno.EINVAL))
        reply = self._answer(tag, message, limit)
        if len(reply) > limit:  # the export's promise broken: never overrun the buffers
            reply = p9.rlerror(tag, errno.EMSGSIZE)
        return writer.write(reply)

    def _answer(self, tag: int, message: p9.TMessage, limit: int) -> bytes:
        match message:
            case p9.Tversion(msize, version):
                # Tversion begins a session: every fid of the last one goes.
                self.export.reset()
                if msize < p9.MIN_MSIZE:
                    return p9.rlerror(tag, errno.EINVAL)
                self.msize = min(msize, p9.MAX_MSIZE)
                if version != p9.VERSION_9P2000_L:
                    return p9.rversion(tag, self.msize, "unknown")
                return p9.rversion(tag, self.msize, p9.VERSION_9P2000_L)
            case p9.Tflush():
                return p9.rempty(p9.TFLUSH, tag)
            case p9.Unsupported():
                return p9.rlerror(tag, errno.EOPNOTSUPP)
            case _:
                return self.export.serve(tag, message, limit)
