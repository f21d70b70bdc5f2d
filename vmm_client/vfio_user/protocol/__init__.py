"""The vfio-user wire protocol, sans I/O: messages, a framer and device layout.

Spec: "vfio-user Protocol Specification", QEMU docs/interop/vfio-user.rst
(version 0.0, the one QEMU 10.1+ proposes), with the message structs of
<linux/vfio.h> it reuses. Where QEMU 11.1 differs from the text or leaves a
choice, we follow what was seen on the wire (shared/design/qemu-vfio-user.md
§3): a NUL-terminated JSON capabilities object in VERSION, posted REGION_WRITE
with NO_REPLY, one fresh fd per DMA_MAP, DMA_UNMAP replies echoing the request.

Everything here is pure: bytes and integers in, frozen dataclasses and bytes
out. Every length, offset and count is checked, because every message is
input from another process. One module per part of the spec:

    header         message header, commands, limits, ProtocolError/FramingError
    version        VERSION and its capabilities
    dma_map        DMA_MAP, DMA_UNMAP
    device_info    DEVICE_GET_INFO
    region_info    DEVICE_GET_REGION_INFO, DEVICE_GET_REGION_IO_FDS
    irqs           DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS
    region_access  REGION_READ, REGION_WRITE, REGION_WRITE_MULTI, access splitting
    dma_access     DMA_READ, DMA_WRITE (server to client)
    framer         the byte stream cut into messages, with their descriptors
    layout         a device's regions and IRQs, and access bounds

This package re-exports them all, so `from vmm_client.vfio_user.protocol
import X` works for every public name.
"""

from __future__ import annotations

from .device_info import DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, DEVICE_INFO_SIZE, DeviceInfo
from .dma_access import DMA_DATA_OFFSET_SPEC, DMA_DATA_OFFSET_U32_COUNT, DmaAccess
from .dma_map import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
    DmaMap,
    DmaUnmap,
)
from .framer import Framer
from .header import (
    DEFAULT_MAX_DATA_XFER,
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_MASK,
    HEADER_SIZE,
    MAX_DATA_XFER_LIMIT,
    MAX_MESSAGE_SIZE,
    PAGE_SIZE,
    TYPE_COMMAND,
    TYPE_REPLY,
    Command,
    FramingError,
    Header,
    Message,
    ProtocolError,
    encode_error,
    encode_message,
    encode_reply,
)
from .irqs import (
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    IRQ_INFO_SIZE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_MASK_ALL,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_MASK,
    IRQ_SET_DATA_NONE,
    NUM_IRQS,
    IrqIndex,
    IrqInfo,
    IrqSet,
)
from .layout import BarLayout, DeviceLayout
from .region_access import MAX_WRITE_MULTI, RegionAccess, WriteMulti, all_ones, split_access
from .region_info import (
    NUM_REGIONS,
    REGION_BAR0,
    REGION_BAR5,
    REGION_CONFIG,
    REGION_INFO_FLAG_CAPS,
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    REGION_INFO_SIZE,
    REGION_ROM,
    REGION_VGA,
    RegionInfo,
    RegionIoFds,
)
from .version import MAX_VERSION_JSON, VERSION_MAJOR, VERSION_MINOR, Capabilities, Version

__all__ = [
    "DEFAULT_MAX_DATA_XFER",
    "DEVICE_FLAGS_PCI",
    "DEVICE_FLAGS_RESET",
    "DEVICE_INFO_SIZE",
    "DMA_DATA_OFFSET_SPEC",
    "DMA_DATA_OFFSET_U32_COUNT",
    "DMA_MAP_FLAG_READ",
    "DMA_MAP_FLAG_WRITE",
    "DMA_UNMAP_FLAG_ALL",
    "DMA_UNMAP_FLAG_GET_DIRTY_BITMAP",
    "FLAG_ERROR",
    "FLAG_NO_REPLY",
    "FLAG_TYPE_MASK",
    "HEADER_SIZE",
    "IRQ_INFO_AUTOMASKED",
    "IRQ_INFO_EVENTFD",
    "IRQ_INFO_MASKABLE",
    "IRQ_INFO_NORESIZE",
    "IRQ_INFO_SIZE",
    "IRQ_SET_ACTION_MASK",
    "IRQ_SET_ACTION_MASK_ALL",
    "IRQ_SET_ACTION_TRIGGER",
    "IRQ_SET_ACTION_UNMASK",
    "IRQ_SET_DATA_BOOL",
    "IRQ_SET_DATA_EVENTFD",
    "IRQ_SET_DATA_MASK",
    "IRQ_SET_DATA_NONE",
    "MAX_DATA_XFER_LIMIT",
    "MAX_MESSAGE_SIZE",
    "MAX_VERSION_JSON",
    "MAX_WRITE_MULTI",
    "NUM_IRQS",
    "NUM_REGIONS",
    "PAGE_SIZE",
    "REGION_BAR0",
    "REGION_BAR5",
    "REGION_CONFIG",
    "REGION_INFO_FLAG_CAPS",
    "REGION_INFO_FLAG_MMAP",
    "REGION_INFO_FLAG_READ",
    "REGION_INFO_FLAG_WRITE",
    "REGION_INFO_SIZE",
    "REGION_ROM",
    "REGION_VGA",
    "TYPE_COMMAND",
    "TYPE_REPLY",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "BarLayout",
    "Capabilities",
    "Command",
    "DeviceInfo",
    "DeviceLayout",
    "DmaAccess",
    "DmaMap",
    "DmaUnmap",
    "Framer",
    "FramingError",
    "Header",
    "IrqIndex",
    "IrqInfo",
    "IrqSet",
    "Message",
    "ProtocolError",
    "RegionAccess",
    "RegionInfo",
    "RegionIoFds",
    "Version",
    "WriteMulti",
    "all_ones",
    "encode_error",
    "encode_message",
    "encode_reply",
    "split_access",
]
