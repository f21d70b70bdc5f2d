"""The PCI test device: every BAR kind and interrupt path, with no spec of its own.

A small device in the spirit of QEMU's pci-testdev and edu, to exercise the
bus before virtio: an IO BAR, a 64-bit prefetchable memory BAR, a 32-bit
memory BAR with the MSI-X table and PBA, and a 2 KiB expansion ROM.

Registers, at the same offsets in BAR0 (IO) and BAR2 (memory):

    0x00  ID        RO   0x7E570001
    0x04  SCRATCH   RW   32-bit scratch register
    0x08  DOORBELL  W    raise interrupt vector `value` (MSI-X, or INTx)
                    R    number of doorbells rung
    0x0C  IRQ_STATUS R   INTx causes not yet acknowledged (bit per vector & 31)
                    W1C  acknowledge; INTx drops when no cause is left
    0x10  BAR_INDEX RO   the BAR this access came through (0 or 2)
    0x14  RESETS    RO   function resets seen

BAR2 also has 4 KiB of RAM at 0x1000 for accesses of every width.
"""

from __future__ import annotations

from typing import Final

from ..effects import BarKind
from ..pci.bars import BarSpec
from ..pci.function import MsixLayout, PciFunction, PciIdentity, Presentation

VENDOR_ID: Final = 0x1234  # the experimental vendor QEMU's edu and bochs use
DEVICE_ID: Final = 0x7E57
ID_VALUE: Final = 0x7E57_0001

REG_ID: Final = 0x00
REG_SCRATCH: Final = 0x04
REG_DOORBELL: Final = 0x08
REG_IRQ_STATUS: Final = 0x0C
REG_BAR_INDEX: Final = 0x10
REG_RESETS: Final = 0x14

IO_BAR: Final = 0
MEM_BAR: Final = 2
MSIX_BAR: Final = 4
RAM_OFFSET: Final = 0x1000
RAM_SIZE: Final = 0x1000
MSIX_VECTORS: Final = 4

ROM_IMAGE: Final = b"DEVMODEL PCI TEST DEVICE ROM\0".ljust(64, b"\0")


class PciTestDevice(PciFunction):
    type_name = "pci-testdev"

    def __init__(self, presentation: Presentation = Presentation(), serial: int = 0) -> None:
        super().__init__(
            PciIdentity(
                vendor_id=VENDOR_ID,
                device_id=DEVICE_ID,
                class_code=0x00FF00,  # unclassified device
                revision=1,
                subsystem_vendor_id=VENDOR_ID,
                subsystem_id=0x0001,
            ),
            [
                BarSpec(IO_BAR, BarKind.IO, 0x100),
                BarSpec(MEM_BAR, BarKind.MEM64, 0x10000, prefetchable=True),
                BarSpec(MSIX_BAR, BarKind.MEM32, 0x1000),
                BarSpec(6, BarKind.ROM, 0x800),
            ],
            presentation=presentation,
            msix=MsixLayout(MSIX_VECTORS, MSIX_BAR, table_offset=0, pba_offset=0x800),
            rom=ROM_IMAGE,
            serial=serial,
        )
        self.resets = 0
        self._clear()

    def _clear(self) -> None:
        self.scratch = 0
        self.doorbells = 0
        self.irq_status = 0
        self.ram = bytearray(RAM_SIZE)

    def on_reset(self) -> None:
        self.resets += 1
        self._clear()

    def read_bar(self, bar: int, offset: int, size: int) -> int:
        if bar == MEM_BAR and offset >= RAM_OFFSET:
            at = offset - RAM_OFFSET
            if at + size <= RAM_SIZE:
                return int.from_bytes(self.ram[at : at + size], "little")
            return 0
        if bar not in (IO_BAR, MEM_BAR):
            return 0
        # Registers are 32 bits wide; a read sees the bytes of every register it
        # covers (a misaligned qword can span three).
        first = offset & ~3
        block = b"".join(
            self._read_register(register, bar).to_bytes(4, "little")
            for register in range(first, offset + size, 4)
        )
        return int.from_bytes(block[offset - first : offset - first + size], "little")

    def _read_register(self, register: int, bar: int) -> int:
        match register:
            case 0x00:
                return ID_VALUE
            case 0x04:
                return self.scratch
            case 0x08:
                return self.doorbells & 0xFFFF_FFFF
            case 0x0C:
                return self.irq_status
            case 0x10:
                return bar
            case 0x14:
                return self.resets & 0xFFFF_FFFF
            case _:
                return 0

    def write_bar(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar == MEM_BAR and offset >= RAM_OFFSET:
            at = offset - RAM_OFFSET
            if at + size <= RAM_SIZE:
                self.ram[at : at + size] = value.to_bytes(size, "little")
            return
        if bar not in (IO_BAR, MEM_BAR) or offset & 3:
            return  # registers take aligned writes only
        value &= 0xFFFF_FFFF
        match offset:
            case 0x04:
                self.scratch = value
            case 0x08:
                self.doorbells += 1
                self.ring(value)
            case 0x0C:
                self.irq_status &= ~value
                if not self.irq_status:
                    self.set_intx(False)
            case _:
                pass

    def ring(self, vector: int) -> None:
        """Raise `vector` as the doorbell does (also for the server's own use)."""
        if self.msix is None or not self.msix.enabled:
            self.irq_status |= 1 << (vector & 31)
        self.signal(vector)
