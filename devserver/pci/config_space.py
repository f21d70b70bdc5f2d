"""Configuration space as bytes plus per-byte write rules (kvmtool's pci.c).

Each byte has a writable mask (bits a guest may change) and a write-1-to-clear
mask (bits a guest clears by writing 1). Everything else is read-only. BAR
registers are stored here too, but their write rules live in `bars.py`.
"""

from __future__ import annotations

from .regs import EXT_CONFIG_SPACE_SIZE


class ConfigSpace:
    __slots__ = ("_data", "_w1c", "_writable", "size")

    def __init__(self, size: int = EXT_CONFIG_SPACE_SIZE) -> None:
        self.size = size
        self._data = bytearray(size)
        self._writable = bytearray(size)
        self._w1c = bytearray(size)

    # -- device-side set-up (no masks apply)

    def set(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size)
        self._data[offset : offset + size] = value.to_bytes(size, "little")

    def set_bytes(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self._data[offset : offset + len(data)] = data

    def set_writable(self, offset: int, size: int, mask: int) -> None:
        self._check(offset, size)
        self._writable[offset : offset + size] = mask.to_bytes(size, "little")

    def set_w1c(self, offset: int, size: int, mask: int) -> None:
        self._check(offset, size)
        self._w1c[offset : offset + size] = mask.to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        self._check(offset, size)
        return int.from_bytes(self._data[offset : offset + size], "little")

    # -- guest-side accesses

    def read(self, offset: int, size: int) -> int:
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Apply a guest write byte by byte through the masks."""
        self._check(offset, size)
        for i in range(size):
            at = offset + i
            byte = (value >> (8 * i)) & 0xFF
            writable = self._writable[at]
            new = (self._data[at] & ~writable) | (byte & writable)
            new &= ~(byte & self._w1c[at])
            self._data[at] = new & 0xFF

    def snapshot(self) -> bytes:
        return bytes(self._data)

    def _check(self, offset: int, size: int) -> None:
        # Explicit: slices would clamp silently and negative offsets would wrap.
        if offset < 0 or size < 0 or offset + size > self.size:
            raise IndexError(f"config access [{offset:#x}, +{size}) outside {self.size} bytes")
