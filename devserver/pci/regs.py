"""Register offsets and bits of the PCI 3.0 type-0 header and PCIe 1.1.

Names follow Linux's include/uapi/linux/pci_regs.h so they can be grepped
side by side.
"""

from __future__ import annotations

from typing import Final

CONFIG_SPACE_SIZE: Final = 256
EXT_CONFIG_SPACE_SIZE: Final = 4096

PCI_VENDOR_ID: Final = 0x00
PCI_DEVICE_ID: Final = 0x02
PCI_COMMAND: Final = 0x04
PCI_STATUS: Final = 0x06
PCI_REVISION_ID: Final = 0x08
PCI_CLASS_PROG: Final = 0x09
PCI_CACHE_LINE_SIZE: Final = 0x0C
PCI_LATENCY_TIMER: Final = 0x0D
PCI_HEADER_TYPE: Final = 0x0E
PCI_BASE_ADDRESS_0: Final = 0x10
PCI_BASE_ADDRESS_5: Final = 0x24
PCI_SUBSYSTEM_VENDOR_ID: Final = 0x2C
PCI_SUBSYSTEM_ID: Final = 0x2E
PCI_ROM_ADDRESS: Final = 0x30
PCI_CAPABILITY_LIST: Final = 0x34
PCI_INTERRUPT_LINE: Final = 0x3C
PCI_INTERRUPT_PIN: Final = 0x3D

PCI_COMMAND_IO: Final = 0x0001
PCI_COMMAND_MEMORY: Final = 0x0002
PCI_COMMAND_MASTER: Final = 0x0004
PCI_COMMAND_PARITY: Final = 0x0040
PCI_COMMAND_SERR: Final = 0x0100
PCI_COMMAND_INTX_DISABLE: Final = 0x0400
# The command bits a guest may set; the rest are hardwired to zero.
PCI_COMMAND_WRITABLE: Final = (
    PCI_COMMAND_IO
    | PCI_COMMAND_MEMORY
    | PCI_COMMAND_MASTER
    | PCI_COMMAND_PARITY
    | PCI_COMMAND_SERR
    | PCI_COMMAND_INTX_DISABLE
)

PCI_STATUS_INTERRUPT: Final = 0x0008
PCI_STATUS_CAP_LIST: Final = 0x0010
# Error bits: write 1 to clear.
PCI_STATUS_W1C: Final = 0xF900

PCI_BASE_ADDRESS_SPACE_IO: Final = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64: Final = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH: Final = 0x08
PCI_BASE_ADDRESS_IO_MASK: Final = 0xFFFF_FFFC
PCI_BASE_ADDRESS_MEM_MASK: Final = 0xFFFF_FFF0
PCI_ROM_ADDRESS_ENABLE: Final = 0x01
PCI_ROM_ADDRESS_MASK: Final = 0xFFFF_F800

ROM_BAR_INDEX: Final = 6
NUM_BARS: Final = 6

PCI_CAP_ID_PM: Final = 0x01
PCI_CAP_ID_VNDR: Final = 0x09
PCI_CAP_ID_EXP: Final = 0x10
PCI_CAP_ID_MSIX: Final = 0x11

PCI_EXT_CAP_ID_DSN: Final = 0x0003

# PCI Express capability (v1 endpoint layout, 20 bytes used; 36 reserved).
PCI_EXP_FLAGS: Final = 0x02
PCI_EXP_DEVCAP: Final = 0x04
PCI_EXP_DEVCTL: Final = 0x08
PCI_EXP_DEVSTA: Final = 0x0A
PCI_EXP_LNKCAP: Final = 0x0C
PCI_EXP_LNKCTL: Final = 0x10
PCI_EXP_LNKSTA: Final = 0x12
PCI_EXP_TYPE_ENDPOINT: Final = 0x0

# MSI-X capability.
PCI_MSIX_FLAGS: Final = 0x02
PCI_MSIX_TABLE: Final = 0x04
PCI_MSIX_PBA: Final = 0x08
PCI_MSIX_FLAGS_QSIZE: Final = 0x07FF
PCI_MSIX_FLAGS_MASKALL: Final = 0x4000
PCI_MSIX_FLAGS_ENABLE: Final = 0x8000
PCI_MSIX_ENTRY_SIZE: Final = 16
PCI_MSIX_ENTRY_CTRL_MASKBIT: Final = 0x1

# Power management capability.
PCI_PM_CTRL: Final = 0x04
