"""Virtio constants under their spec names (virtio 1.2: §2.1 Device Status Field,
§2.2 Feature Bits, §2.7 Split Virtqueues, §4.1 Virtio Over PCI Bus, §5 Device Types,
§6 Reserved Feature Bits).

Only the modern (non-legacy) interface: no legacy I/O BAR, no transitional ids.
"""

from __future__ import annotations

import enum
from typing import Final


class DeviceStatus(enum.IntFlag):
    """§2.1: the device_status byte."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class VirtioDeviceId(enum.IntEnum):
    """§5: device types, named as Linux's VIRTIO_ID_* (so 9P is P9)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    SCSI = 8
    P9 = 9
    GPU = 16
    INPUT = 18
    VSOCK = 19
    FS = 26


# §6 Reserved Feature Bits: bit numbers (a device's feature word is a u64 mask).
VIRTIO_F_RING_INDIRECT_DESC: Final = 28
VIRTIO_F_RING_EVENT_IDX: Final = 29
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_F_ACCESS_PLATFORM: Final = 33
VIRTIO_F_RING_PACKED: Final = 34
VIRTIO_F_IN_ORDER: Final = 35
VIRTIO_F_ORDER_PLATFORM: Final = 36
VIRTIO_F_SR_IOV: Final = 37
VIRTIO_F_NOTIFICATION_DATA: Final = 38
VIRTIO_F_NOTIF_CONFIG_DATA: Final = 39
VIRTIO_F_RING_RESET: Final = 40

# Feature words are at most 64 bits here: the transport pages them 32 at a time
# (device_feature_select 0 and 1); higher pages read 0 and take no writes.
FEATURE_PAGES: Final = 2


def feature_bit(bit: int) -> int:
    """The mask of feature bit number `bit`."""
    return 1 << bit


class VirtqDescFlags(enum.IntFlag):
    """§2.7.5: struct virtq_desc.flags."""

    VIRTQ_DESC_F_NEXT = 1
    VIRTQ_DESC_F_WRITE = 2
    VIRTQ_DESC_F_INDIRECT = 4


VIRTQ_DESC_F_NEXT: Final = VirtqDescFlags.VIRTQ_DESC_F_NEXT
VIRTQ_DESC_F_WRITE: Final = VirtqDescFlags.VIRTQ_DESC_F_WRITE
VIRTQ_DESC_F_INDIRECT: Final = VirtqDescFlags.VIRTQ_DESC_F_INDIRECT

# §2.7.6 / §2.7.8: avail.flags and used.flags.
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

# §2.7: Queue Size is a power of two no larger than 32768.
VIRTQ_MAX_SIZE: Final = 32768


class VirtioPciCapType(enum.IntEnum):
    """§4.1.4: cfg_type of struct virtio_pci_cap."""

    VIRTIO_PCI_CAP_COMMON_CFG = 1
    VIRTIO_PCI_CAP_NOTIFY_CFG = 2
    VIRTIO_PCI_CAP_ISR_CFG = 3
    VIRTIO_PCI_CAP_DEVICE_CFG = 4
    VIRTIO_PCI_CAP_PCI_CFG = 5
    VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
    VIRTIO_PCI_CAP_VENDOR_CFG = 9


# §4.1.2: PCI ids. Modern devices are 0x1040 + device type; revision 1 or more.
VIRTIO_PCI_VENDOR_ID: Final = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE: Final = 0x1040
VIRTIO_PCI_REVISION: Final = 1

# §4.1.4.3 / §4.1.5.1.2: "no MSI-X vector" in config_msix_vector/queue_msix_vector.
VIRTIO_MSI_NO_VECTOR: Final = 0xFFFF

# §4.1.4.5: ISR status bits.
VIRTIO_PCI_ISR_QUEUE: Final = 0x1
VIRTIO_PCI_ISR_CONFIG: Final = 0x2
