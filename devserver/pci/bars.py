"""Base address registers: sizing, types, and what a BAR decodes.

A BAR register stores `(written & ~(size - 1) & type mask) | type bits`: the
low address bits are hardwired to zero. That one rule answers every sizing
pattern (all-ones, Linux's ROM probe `0xfffff800 | enable`, the high dword of
a 64-bit BAR) with `~(size - 1)` and the type bits, as the PCI spec says.

A BAR decodes when its enable bit (command IO or MEM; for the ROM also its own
enable bit) is set and its address is a real one: not zero, and the whole
range below the top of its address space. The top excludes the sizing value
itself (`~(size - 1)` ends exactly at 4 GiB), so a BAR caught mid-probe with
decoding on never claims the top of the 32-bit space (QEMU's rule).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..effects import AddressRange, BarKind, SharedMemory
from ..errors import ConfigError
from .config_space import ConfigSpace
from .regs import (
    NUM_BARS,
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_IO_MASK,
    PCI_BASE_ADDRESS_MEM_MASK,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY,
    PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS_ENABLE,
    PCI_ROM_ADDRESS_MASK,
    ROM_BAR_INDEX,
)

IO_SPACE_END = 1 << 16
MEM32_SPACE_END = 1 << 32
MEM64_SPACE_END = 1 << 64

# Size limits from the PCI 3.0 spec (IO BARs at most 256 bytes) and from
# what an x86 frontend can route.
_MIN_SIZE = {BarKind.IO: 4, BarKind.MEM32: 16, BarKind.MEM64: 16, BarKind.ROM: 2048}
_MAX_SIZE = {
    BarKind.IO: 256,
    BarKind.MEM32: 1 << 31,
    BarKind.MEM64: 1 << 63,
    BarKind.ROM: 1 << 24,
}


@dataclass(frozen=True, slots=True)
class BarSpec:
    """What a device declares about one BAR; checked when the device is built."""

    index: int
    kind: BarKind
    size: int
    prefetchable: bool = False
    backing: SharedMemory | None = None

    def __post_init__(self) -> None:
        name = f"BAR{self.index}" if self.index != ROM_BAR_INDEX else "expansion ROM BAR"
        if self.kind is BarKind.ROM:
            if self.index != ROM_BAR_INDEX:
                raise ConfigError(f"{name}: only index {ROM_BAR_INDEX} is the expansion ROM")
        elif not 0 <= self.index < NUM_BARS:
            raise ConfigError(f"BAR index {self.index} is not 0..5")
        if self.kind is BarKind.MEM64 and self.index == NUM_BARS - 1:
            raise ConfigError("BAR5 cannot be 64-bit: it needs the next register for its top half")
        if self.size <= 0 or self.size & (self.size - 1):
            raise ConfigError(f"{name}: size {self.size:#x} is not a power of two")
        low, high = _MIN_SIZE[self.kind], _MAX_SIZE[self.kind]
        if not low <= self.size <= high:
            raise ConfigError(
                f"{name}: size {self.size:#x} outside {low:#x}..{high:#x} for {self.kind.name}"
            )
        if self.prefetchable and self.kind in (BarKind.IO, BarKind.ROM):
            raise ConfigError(f"{name}: only memory BARs can be prefetchable")
        if self.backing is not None and self.backing.size != self.size:
            raise ConfigError(f"{name}: shared-memory backing must be exactly the BAR size")

    @property
    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return PCI_BASE_ADDRESS_SPACE_IO
        if self.kind is BarKind.ROM:
            return 0
        bits = PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0
        if self.kind is BarKind.MEM64:
            bits |= PCI_BASE_ADDRESS_MEM_TYPE_64
        return bits

    @property
    def register(self) -> int:
        """Config-space offset of the (low) register."""
        if self.kind is BarKind.ROM:
            return PCI_ROM_ADDRESS
        return PCI_BASE_ADDRESS_0 + 4 * self.index

    @property
    def space_end(self) -> int:
        if self.kind is BarKind.IO:
            return IO_SPACE_END
        if self.kind is BarKind.MEM64:
            return MEM64_SPACE_END
        return MEM32_SPACE_END

    @property
    def low_mask(self) -> int:
        """Writable bits of the low register."""
        if self.kind is BarKind.IO:
            type_mask = PCI_BASE_ADDRESS_IO_MASK
        elif self.kind is BarKind.ROM:
            type_mask = PCI_ROM_ADDRESS_MASK
        else:
            type_mask = PCI_BASE_ADDRESS_MEM_MASK
        return ~(self.size - 1) & type_mask & 0xFFFF_FFFF

    @property
    def high_mask(self) -> int:
        """Writable bits of the top register of a 64-bit BAR."""
        return (~(self.size - 1) >> 32) & 0xFFFF_FFFF


class BarRegisters:
    """The BAR registers of one function, stored in its config space."""

    __slots__ = ("_by_register", "_cs", "specs")

    def __init__(self, cs: ConfigSpace, specs: Iterable[BarSpec]) -> None:
        self._cs = cs
        self.specs: dict[int, BarSpec] = {}
        # register offset -> (spec, is the top half of a 64-bit BAR)
        self._by_register: dict[int, tuple[BarSpec, bool]] = {}
        for spec in specs:
            taken = [spec.register]
            if spec.kind is BarKind.MEM64:
                taken.append(spec.register + 4)
            for reg in taken:
                if reg in self._by_register:
                    raise ConfigError(f"BAR{spec.index} overlaps another BAR's register")
            self.specs[spec.index] = spec
            self._by_register[spec.register] = (spec, False)
            if spec.kind is BarKind.MEM64:
                self._by_register[spec.register + 4] = (spec, True)
        self.reset()

    def __iter__(self) -> Iterator[BarSpec]:
        return iter(sorted(self.specs.values(), key=lambda s: s.index))

    @staticmethod
    def is_bar_register(offset: int) -> bool:
        """Whether a config byte belongs to BAR0..5 or the ROM BAR."""
        return PCI_BASE_ADDRESS_0 <= offset < PCI_BASE_ADDRESS_0 + 4 * NUM_BARS or (
            PCI_ROM_ADDRESS <= offset < PCI_ROM_ADDRESS + 4
        )

    def reset(self) -> None:
        for reg in range(PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_0 + 4 * NUM_BARS, 4):
            self._cs.set(reg, 4, 0)
        self._cs.set(PCI_ROM_ADDRESS, 4, 0)
        for spec in self.specs.values():
            self._cs.set(spec.register, 4, spec.type_bits)

    def write_register(self, register: int, value: int) -> None:
        """A guest wrote `value` to the dword at `register` (0x10..0x24, 0x30)."""
        entry = self._by_register.get(register)
        if entry is None:
            return  # unimplemented BAR: hardwired to zero
        spec, top = entry
        if top:
            self._cs.set(register, 4, value & spec.high_mask)
        elif spec.kind is BarKind.ROM:
            enable = value & PCI_ROM_ADDRESS_ENABLE
            self._cs.set(register, 4, (value & spec.low_mask) | enable)
        else:
            self._cs.set(register, 4, (value & spec.low_mask) | spec.type_bits)

    def address(self, spec: BarSpec) -> int:
        low = self._cs.get(spec.register, 4)
        if spec.kind is BarKind.IO:
            address = low & PCI_BASE_ADDRESS_IO_MASK
        elif spec.kind is BarKind.ROM:
            address = low & PCI_ROM_ADDRESS_MASK
        else:
            address = low & PCI_BASE_ADDRESS_MEM_MASK
        if spec.kind is BarKind.MEM64:
            address |= self._cs.get(spec.register + 4, 4) << 32
        return address

    def decoded_range(self, spec: BarSpec, command: int) -> AddressRange | None:
        """What the BAR decodes now, from its registers and the command register."""
        if spec.kind is BarKind.IO:
            enabled = bool(command & PCI_COMMAND_IO)
        else:
            enabled = bool(command & PCI_COMMAND_MEMORY)
        if spec.kind is BarKind.ROM:
            enabled = enabled and bool(self._cs.get(spec.register, 4) & PCI_ROM_ADDRESS_ENABLE)
        if not enabled:
            return None
        base = self.address(spec)
        end = base + spec.size
        # IO ports may run to 0xffff; a memory BAR may not end at the top of
        # its space, where the sizing value `~(size - 1)` sits.
        too_high = end > spec.space_end if spec.kind is BarKind.IO else end >= spec.space_end
        if base == 0 or too_high:
            return None
        return AddressRange(base, spec.size)

    def decoded(self, command: int) -> dict[int, AddressRange]:
        ranges = {}
        for spec in self.specs.values():
            decoded = self.decoded_range(spec, command)
            if decoded is not None:
                ranges[spec.index] = decoded
        return ranges
