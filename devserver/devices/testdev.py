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
    0x18  DMA_ADDR_LO RW guest-physical address of the transfer, bits 31:0
    0x1C  DMA_ADDR_HI RW ... bits 63:32
    0x20  DMA_LEN   RW   bytes to move, 1..4096 (anything else fails the command)
    0x24  DMA_CMD   W    1: guest memory [addr, addr + len) -> device RAM[0:len]
                         2: device RAM[0:len] -> guest memory at addr
                         other values, and any command while busy, are ignored
                    R    0
    0x28  DMA_STATUS R   bit 0 BUSY, bit 1 DONE, bit 2 ERROR
                    W1C  bits 1 and 2

BAR2 also has 4 KiB of RAM at 0x1000 for accesses of every width; it is the
DMA engine's buffer (device RAM[0] is BAR2 + 0x1000).

The DMA engine, like QEMU's edu device: a command clears DONE and ERROR and
sets BUSY; without Bus Master Enable (command register bit 2), or with a bad
length, it fails at once and moves nothing. Otherwise the device asks its
shell for the transfer (a DmaRequested effect) and finishes when the shell
reports back: BUSY clears and DONE (or ERROR, for an address outside guest
RAM) sets. Every command ends with interrupt vector 1 (DMA_VECTOR): MSI-X
vector 1 when MSI-X is on, else INTx with IRQ_STATUS bit 1, acknowledged
there as for doorbells. An 8-byte write to an aligned register pair writes
both, low dword first, so `writeq` of DMA_ADDR works.
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
REG_DMA_ADDR_LO: Final = 0x18
REG_DMA_ADDR_HI: Final = 0x1C
REG_DMA_LEN: Final = 0x20
REG_DMA_CMD: Final = 0x24
REG_DMA_STATUS: Final = 0x28

DMA_CMD_FROM_GUEST: Final = 1  # guest memory -> device RAM (the device reads)
DMA_CMD_TO_GUEST: Final = 2  # device RAM -> guest memory (the device writes)
DMA_STATUS_BUSY: Final = 1 << 0
DMA_STATUS_DONE: Final = 1 << 1
DMA_STATUS_ERROR: Final = 1 << 2
DMA_STATUS_W1C: Final = DMA_STATUS_DONE | DMA_STATUS_ERROR
DMA_VECTOR: Final = 1

IO_BAR: Final = 0
MEM_BAR: Final = 2
MSIX_BAR: Final = 4
RAM_OFFSET: Final = 0x1000
RAM_SIZE: Final = 0x1000
MSIX_VECTORS: Final = 4
DMA_MAX_LEN: Final = RAM_SIZE

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
        self.dma_address = 0
        self.dma_length = 0
        self.dma_status = 0
        self.dma_error = ""  # why the last command failed, for logs and tests

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
            case 0x18:
                return self.dma_address & 0xFFFF_FFFF
            case 0x1C:
                return self.dma_address >> 32
            case 0x20:
                return self.dma_length
            case 0x28:
                return self.dma_status
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
        if size == 8:  # a register pair, low dword first (lo_hi_writeq)
            self._write_register(offset, value & 0xFFFF_FFFF)
            self._write_register(offset + 4, value >> 32)
            return
        self._write_register(offset, value & 0xFFFF_FFFF)

    def _write_register(self, offset: int, value: int) -> None:
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
            case 0x18:
                self.dma_address = (self.dma_address & ~0xFFFF_FFFF) | value
            case 0x1C:
                self.dma_address = (self.dma_address & 0xFFFF_FFFF) | value << 32
            case 0x20:
                self.dma_length = value
            case 0x24:
                self._dma_command(value)
            case 0x28:
                self.dma_status &= ~(value & DMA_STATUS_W1C)
            case _:
                pass

    # -- the DMA engine

    def _dma_command(self, command: int) -> None:
        if self.dma_status & DMA_STATUS_BUSY or command not in (
            DMA_CMD_FROM_GUEST,
            DMA_CMD_TO_GUEST,
        ):
            return
        self.dma_status = DMA_STATUS_BUSY
        self.dma_error = ""
        length = self.dma_length
        if not 1 <= length <= DMA_MAX_LEN:
            self._dma_finish(f"DMA_LEN {length} is not 1..{DMA_MAX_LEN}")
            return
        if command == DMA_CMD_FROM_GUEST:
            token = self.request_dma_read(self.dma_address, length)
        else:
            token = self.request_dma_write(self.dma_address, bytes(self.ram[:length]))
        if token is None:
            # Refused before reaching the bus: no Bus Master Enable, or a range
            # running past 2^64.
            self._dma_finish(
                "bus mastering is disabled (command register bit 2)"
                if not self.bus_master
                else f"[{self.dma_address:#x} +{length:#x}) wraps past the 64-bit space"
            )

    def on_dma_completed(self, token: int, data: bytes | None, error: str | None) -> None:
        if error is None and data is not None:
            self.ram[: len(data)] = data
        self._dma_finish(error)

    def _dma_finish(self, error: str | None) -> None:
        self.dma_error = error or ""
        self.dma_status = DMA_STATUS_ERROR if error is not None else DMA_STATUS_DONE
        self.ring(DMA_VECTOR)

    def ring(self, vector: int) -> None:
        """Raise `vector` as the doorbell does (also for the server's own use)."""
        if self.msix is None or not self.msix.enabled:
            self.irq_status |= 1 << (vector & 31)
        self.signal(vector)
