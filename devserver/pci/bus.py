"""The root bus: config routing by device/function, and BAR arbitration.

The bus is the one place that sees every BAR, so it decides what decodes.
Two BARs may be programmed to overlapping ranges (Linux does this while it
reassigns resources); only one of them decodes at a time. When a BAR starts
decoding at a new range the bus follows kvmtool's order
(pci_config_bar_wr, "Add reassignable BARs"):

    1. deactivate the BAR's old range
    2. deactivate every other BAR overlapping the new range
    3. write the register
    4. activate the new range
    5. reactivate BARs that were shadowed and now overlap nothing

and reports the result as BarDecodeChanged effects whose old/new ranges say
exactly what each BAR decodes after every step. A BAR that moves while
decoding is reported once, old range to new range, after the BARs it pushed
out, so a frontend's routing never holds two overlapping ranges.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..effects import AddressRange, BarDecodeChanged, BarKind, Effect
from ..errors import AccessError, ConfigError
from .function import PciFunction, validate_config_access
from .regs import EXT_CONFIG_SPACE_SIZE

MAX_BUSES = 256
MAX_SLOTS = 32
MAX_FUNCTIONS = 8


@dataclass(frozen=True, slots=True, order=True)
class BarKey:
    device_id: int
    bar: int


class PciBus:
    """Bus 0 of one PCI segment: single-function devices at stable slots."""

    def __init__(self, number: int = 0) -> None:
        self.number = number
        self._slots: dict[int, PciFunction] = {}
        self._by_id: dict[int, PciFunction] = {}
        # What each BAR's registers ask for, and what actually decodes.
        self._programmed: dict[BarKey, AddressRange] = {}
        self._active: dict[BarKey, AddressRange] = {}
        self.generation = 0

    # -- topology

    def plug(self, function: PciFunction, slot: int | None = None) -> int:
        """Place a function at `slot` (or the first free one); return its slot."""
        if slot is None:
            slot = next((s for s in range(1, MAX_SLOTS) if s not in self._slots), -1)
            if slot < 0:
                raise ConfigError(f"all {MAX_SLOTS - 1} slots of bus {self.number} are taken")
        if not 0 <= slot < MAX_SLOTS:
            raise ConfigError(f"slot {slot} is not 0..{MAX_SLOTS - 1}")
        if slot in self._slots:
            raise ConfigError(f"slot {slot} is already taken by {self._slots[slot].type_name}")
        # The device id is its slot: stable across runs for the same command line.
        function.device_id = slot
        self._slots[slot] = function
        self._by_id[slot] = function
        return slot

    def __iter__(self) -> Iterator[tuple[int, PciFunction]]:
        return iter(sorted(self._slots.items()))

    def function(self, device_id: int) -> PciFunction:
        function = self._by_id.get(device_id)
        if function is None:
            raise AccessError(f"no device with id {device_id}")
        return function

    def at(self, bus: int, device: int, function: int) -> PciFunction | None:
        if bus != self.number or function != 0:
            return None
        return self._slots.get(device)

    # -- config space

    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        _validate_address(bus, device, function)
        validate_config_access(offset, size, EXT_CONFIG_SPACE_SIZE)
        target = self.at(bus, device, function)
        if target is None:
            return (1 << (8 * size)) - 1  # master abort: all ones
        return target.config_read(offset, size)

    def config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> list[Effect]:
        _validate_address(bus, device, function)
        validate_config_access(offset, size, EXT_CONFIG_SPACE_SIZE)
        target = self.at(bus, device, function)
        if target is None:
            return []  # master abort: dropped
        effects = target.config_write(offset, size, value)
        return self._arbitrate(target) + effects

    def reset(self, device_id: int) -> list[Effect]:
        target = self.function(device_id)
        effects = target.reset()
        return self._arbitrate(target) + effects

    # -- BARs

    def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int:
        return self.function(device_id).bar_read(bar, offset, size)

    def bar_write(
        self, device_id: int, bar: int, offset: int, size: int, value: int
    ) -> list[Effect]:
        return self.function(device_id).bar_write(bar, offset, size, value)

    def take_effects(self, device_id: int) -> list[Effect]:
        """Effects a function produced outside a write (a read-to-clear register
        lowering INTx, work finished later); shells collect them after reads."""
        return self.function(device_id).take_effects()

    def decoding(self) -> dict[BarKey, AddressRange]:
        """What decodes now, by BAR."""
        return dict(self._active)

    def is_decoding(self, device_id: int, bar: int) -> bool:
        return BarKey(device_id, bar) in self._active

    def _arbitrate(self, function: PciFunction) -> list[Effect]:
        """Bring the bus in line with `function`'s registers; return the changes."""
        wanted = function.decoded()
        # Record every BAR's new range before moving any: one access can change
        # several BARs (command, reset), and step 5 of the first move must not
        # reactivate a sibling at a range its registers no longer program.
        changed: list[tuple[BarKey, AddressRange | None]] = []
        for spec in function.bars:
            key = BarKey(function.device_id, spec.index)
            new = wanted.get(spec.index)
            if self._programmed.get(key) == new:
                continue
            if new is None:
                del self._programmed[key]
            else:
                self._programmed[key] = new
            changed.append((key, new))
        effects: list[Effect] = []
        for key, new in changed:
            effects += self._move(key, function, new)
        return effects

    def _move(self, key: BarKey, function: PciFunction, new: AddressRange | None) -> list[Effect]:
        effects: list[Effect] = []
        spec = function.bar_spec(key.bar)
        io = spec.kind is BarKind.IO
        # 1. deactivate the old range (reported below, together with step 4)
        old = self._active.pop(key, None)
        if new is not None:
            # 2. deactivate whatever overlaps the new range
            for other, other_range in sorted(self._active.items()):
                if self._is_io(other) == io and other_range.overlaps(new):
                    del self._active[other]
                    effects.append(self._changed(other, other_range, None))
            # 3./4. the register is already written; activate the new range
            self._active[key] = new
        if old != new:
            effects.append(self._changed(key, old, new))
        # 5. reactivate BARs that were shadowed and now overlap nothing
        for other, other_range in sorted(self._programmed.items()):
            if other in self._active or self._is_io(other) != io:
                continue
            if not any(
                self._is_io(k) == io and r.overlaps(other_range) for k, r in self._active.items()
            ):
                self._active[other] = other_range
                effects.append(self._changed(other, None, other_range))
        return effects

    def _is_io(self, key: BarKey) -> bool:
        return self._by_id[key.device_id].bar_spec(key.bar).kind is BarKind.IO

    def _changed(
        self, key: BarKey, old: AddressRange | None, new: AddressRange | None
    ) -> BarDecodeChanged:
        spec = self._by_id[key.device_id].bar_spec(key.bar)
        self.generation += 1
        return BarDecodeChanged(
            device_id=key.device_id,
            bar=key.bar,
            kind=spec.kind,
            prefetchable=spec.prefetchable,
            old=old,
            new=new,
            backing=spec.backing,
            generation=self.generation,
        )


def _validate_address(bus: int, device: int, function: int) -> None:
    if not 0 <= bus < MAX_BUSES:
        raise AccessError(f"bus number {bus} is not 0..{MAX_BUSES - 1}")
    if not 0 <= device < MAX_SLOTS:
        raise AccessError(f"device number {device} is not 0..{MAX_SLOTS - 1}")
    if not 0 <= function < MAX_FUNCTIONS:
        raise AccessError(f"function number {function} is not 0..{MAX_FUNCTIONS - 1}")
