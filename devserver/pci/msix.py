"""MSI-X (PCI 3.0 §6.8.2): the capability, the vector table and the PBA.

Both the table and the pending-bit array live in a BAR; the function routes
accesses in those windows here. A vector raised while it, or the whole
function, is masked sets its pending bit and is delivered when unmasked.
Table accesses of any width are honoured byte by byte (the spec asks for
dword or qword accesses, but a guest may do otherwise and must not crash us).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..effects import AddressRange
from ..errors import ConfigError
from .capabilities import CapabilityList
from .config_space import ConfigSpace
from .regs import (
    PCI_CAP_ID_MSIX,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
)

MAX_VECTORS = 2048

# Per-byte writable bits of one table entry: address (dword aligned), upper
# address, data, vector control (mask bit only).
_ENTRY_WRITABLE = bytes([0xFC, 0xFF, 0xFF, 0xFF] + [0xFF] * 8 + [0x01, 0, 0, 0])


@dataclass(frozen=True, slots=True)
class Message:
    address: int
    data: int


class Msix:
    """MSI-X state of one function."""

    __slots__ = ("_cs", "_pending", "_table", "cap_offset", "pba", "table", "vectors")

    def __init__(
        self,
        cs: ConfigSpace,
        caps: CapabilityList,
        vectors: int,
        bar: int,
        table_offset: int,
        pba_offset: int,
    ) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise ConfigError(f"MSI-X vector count {vectors} is not 1..{MAX_VECTORS}")
        if table_offset % 8 or pba_offset % 8:
            raise ConfigError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.vectors = vectors
        self.table = AddressRange(table_offset, vectors * PCI_MSIX_ENTRY_SIZE)
        self.pba = AddressRange(pba_offset, ((vectors + 63) // 64) * 8)
        if self.table.overlaps(self.pba):
            raise ConfigError("MSI-X table and PBA overlap")
        self._cs = cs
        self.cap_offset = caps.add(PCI_CAP_ID_MSIX, 12)
        cs.set(self.cap_offset + PCI_MSIX_FLAGS, 2, vectors - 1)
        cs.set_writable(
            self.cap_offset + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL
        )
        cs.set(self.cap_offset + PCI_MSIX_TABLE, 4, table_offset | bar)
        cs.set(self.cap_offset + PCI_MSIX_PBA, 4, pba_offset | bar)
        self._table = bytearray(self.table.size)
        self._pending = 0
        self.reset()

    def reset(self) -> None:
        flags = self._cs.get(self.cap_offset + PCI_MSIX_FLAGS, 2)
        self._cs.set(
            self.cap_offset + PCI_MSIX_FLAGS,
            2,
            flags & ~(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL),
        )
        self._table[:] = bytes(self.table.size)
        for vector in range(self.vectors):  # vectors start masked (spec)
            self._table[vector * PCI_MSIX_ENTRY_SIZE + 12] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self._pending = 0

    # -- state

    @property
    def enabled(self) -> bool:
        return bool(self._cs.get(self.cap_offset + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._cs.get(self.cap_offset + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_MASKALL)

    def vector_masked(self, vector: int) -> bool:
        return bool(self._table[vector * PCI_MSIX_ENTRY_SIZE + 12] & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def pending(self, vector: int) -> bool:
        return bool(self._pending >> vector & 1)

    def message(self, vector: int) -> Message:
        entry = vector * PCI_MSIX_ENTRY_SIZE
        address = int.from_bytes(self._table[entry : entry + 8], "little")
        data = int.from_bytes(self._table[entry + 8 : entry + 12], "little")
        return Message(address, data)

    def owns_config(self, offset: int, size: int) -> bool:
        return offset < self.cap_offset + 4 and self.cap_offset < offset + size

    # -- raising and delivering

    def fire(self, vector: int) -> Message | None:
        """Raise `vector`: its message if deliverable now, else None (pending or dropped)."""
        if not 0 <= vector < self.vectors:
            return None
        if self.function_masked or self.vector_masked(vector):
            self._pending |= 1 << vector
            return None
        return self.message(vector)

    def deliverable_pending(self) -> list[tuple[int, Message]]:
        """Pending vectors that are no longer masked: clear and return them."""
        if not self._pending or not self.enabled or self.function_masked:
            return []
        out = []
        for vector in range(self.vectors):
            if self.pending(vector) and not self.vector_masked(vector):
                self._pending &= ~(1 << vector)
                out.append((vector, self.message(vector)))
        return out

    # -- BAR windows

    def read_table(self, offset: int, size: int) -> int:
        return int.from_bytes(self._table[offset : offset + size], "little")

    def write_table(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            at = offset + i
            writable = _ENTRY_WRITABLE[at % PCI_MSIX_ENTRY_SIZE]
            byte = (value >> (8 * i)) & 0xFF
            self._table[at] = (self._table[at] & ~writable) | (byte & writable)

    def read_pba(self, offset: int, size: int) -> int:
        return (self._pending >> (8 * offset)) & ((1 << (8 * size)) - 1)
