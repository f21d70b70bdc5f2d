"""A PCI Express function: config space, BARs, capabilities and interrupts.

Device models subclass `PciFunction` and implement `read_bar`/`write_bar`
with BAR-relative offsets (they never see where a BAR is mapped), `on_reset`,
and raise interrupts with `signal`. Every entry point returns the effects it
caused; BAR decode changes are computed by the bus, which sees every function.

DMA is sans-I/O too: `request_dma_read`/`request_dma_write` return a token
and queue a `DmaRequested` effect; the shell performs it (shared RAM, or a
round trip to the frontend) and calls `dma_completed(token, data, error)`,
which runs the device's `on_dma_completed` hook and returns what that caused.
A function may master the bus only with Bus Master Enable set (PCI Local Bus
3.0, 6.2.2, command register bit 2), so a request without it is refused here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..effects import AddressRange, BarKind, DmaRequested, Effect, IntxChanged, MsiRaised
from ..errors import AccessError, ConfigError
from .bars import BarRegisters, BarSpec
from .capabilities import (
    CapabilityList,
    add_device_serial_number,
    add_pci_express,
    add_power_management,
)
from .config_space import ConfigSpace
from .msix import Msix
from .regs import (
    PCI_CACHE_LINE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_WRITABLE,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_INTERRUPT,
    PCI_STATUS_W1C,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    ROM_BAR_INDEX,
)

CONFIG_ACCESS_SIZES = (1, 2, 4)
BAR_ACCESS_SIZES = (1, 2, 4, 8)
_ADDRESS_SPACE = 1 << 64


@dataclass(frozen=True, slots=True)
class _PendingDma:
    address: int
    length: int
    write: bool


@dataclass(frozen=True, slots=True)
class PciIdentity:
    vendor_id: int
    device_id: int
    class_code: int  # base << 16 | sub << 8 | prog-if
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    interrupt_pin: int = 1  # INTA#; 0 = no INTx

    def __post_init__(self) -> None:
        for name, value, bits in (
            ("vendor_id", self.vendor_id, 16),
            ("device_id", self.device_id, 16),
            ("class_code", self.class_code, 24),
            ("revision", self.revision, 8),
            ("subsystem_vendor_id", self.subsystem_vendor_id, 16),
            ("subsystem_id", self.subsystem_id, 16),
        ):
            if not 0 <= value < 1 << bits:
                raise ConfigError(f"{name} {value:#x} does not fit in {bits} bits")
        if self.vendor_id in (0, 0xFFFF):
            raise ConfigError(f"vendor id {self.vendor_id:#06x} means 'no device'")
        if not 0 <= self.interrupt_pin <= 4:
            raise ConfigError(f"interrupt pin {self.interrupt_pin} is not 0..4")


@dataclass(frozen=True, slots=True)
class Presentation:
    """How the attached frontend can take our devices (from its handshake)."""

    msix: bool = True
    bar64: bool = True


@dataclass(frozen=True, slots=True)
class MsixLayout:
    vectors: int
    bar: int
    table_offset: int
    pba_offset: int


def validate_config_access(offset: int, size: int, space: int) -> None:
    if size not in CONFIG_ACCESS_SIZES:
        raise AccessError(f"config access size {size} is not 1, 2 or 4")
    if not 0 <= offset <= space - size:
        raise AccessError(f"config offset {offset:#x} (+{size}) is outside 0..{space - 1:#x}")
    if offset % size:
        raise AccessError(f"config access of {size} bytes at {offset:#x} is not naturally aligned")


class PciFunction:
    """Base class of every device function on our bus."""

    # The --device type it was made from ("virtio-blk"); a class default a
    # function may refine per instance (a virtio transport takes its device's).
    type_name: str = "pci-function"

    def __init__(
        self,
        identity: PciIdentity,
        bars: Sequence[BarSpec],
        *,
        presentation: Presentation = Presentation(),
        msix: MsixLayout | None = None,
        rom: bytes = b"",
        serial: int = 0,
    ) -> None:
        self.identity = identity
        self.presentation = presentation
        self.device_id = -1  # given by the bus when plugged
        self.name = self.type_name
        self.cs = ConfigSpace()
        self._effects: list[Effect] = []
        self._intx_line = False  # what the device drives
        self._intx_asserted = False  # what the frontend was last told
        self._dma_pending: dict[int, _PendingDma] = {}
        self._next_dma_token = 1

        if not presentation.bar64:
            bars = [_as_32bit(spec) for spec in bars]
        self.bars = BarRegisters(self.cs, bars)
        if rom:
            rom_bar = self.bars.specs.get(ROM_BAR_INDEX)
            if rom_bar is None or len(rom) > rom_bar.size:
                raise ConfigError("ROM contents need an expansion ROM BAR at least as large")
        self.rom = bytes(rom)

        self._write_header()
        caps = CapabilityList(self.cs)
        add_power_management(self.cs, caps)
        self.msix: Msix | None = None
        if msix is not None and presentation.msix:
            bar = self.bars.specs.get(msix.bar)
            if bar is None or bar.kind is BarKind.IO or bar.kind is BarKind.ROM:
                raise ConfigError(f"MSI-X table BAR{msix.bar} must be a memory BAR")
            self.msix = Msix(
                self.cs, caps, msix.vectors, msix.bar, msix.table_offset, msix.pba_offset
            )
            if not AddressRange(0, bar.size).contains(self.msix.table.base, self.msix.table.size):
                raise ConfigError("MSI-X table does not fit in its BAR")
            if not AddressRange(0, bar.size).contains(self.msix.pba.base, self.msix.pba.size):
                raise ConfigError("MSI-X PBA does not fit in its BAR")
        self.add_capabilities(caps)
        add_pci_express(self.cs, caps)
        add_device_serial_number(self.cs, caps, serial)
        self._power_on = self.cs.snapshot()

    # -- hooks for device models

    def add_capabilities(self, caps: CapabilityList) -> None:
        """Add device-specific capabilities (virtio's vendor caps) to the list."""

    def read_bar(self, bar: int, offset: int, size: int) -> int:
        """A read inside one of the device's own BARs (not MSI-X windows, not ROM)."""
        return 0

    def write_bar(self, bar: int, offset: int, size: int, value: int) -> None:
        """A write inside one of the device's own BARs."""

    def on_reset(self) -> None:
        """Return device state to power-on; called after config space is reset."""

    def on_dma_completed(self, token: int, data: bytes | None, error: str | None) -> None:
        """A DMA this function requested finished: `error` None means it worked, and
        for a read `data` holds exactly the bytes asked for."""

    # -- helpers for device models

    def signal(self, vector: int) -> None:
        """Raise an interrupt: MSI-X vector `vector` if enabled, else assert INTx."""
        if self.msix is not None and self.msix.enabled:
            message = self.msix.fire(vector)
            if message is not None:
                self._effects.append(
                    MsiRaised(self.device_id, vector, message.address, message.data)
                )
            return
        self.set_intx(True)

    def set_intx(self, level: bool) -> None:
        """Drive the INTx line; the frontend hears of changes not hidden by INTx-disable."""
        self._intx_line = level
        status = self.cs.get(PCI_STATUS, 2)
        if level:
            status |= PCI_STATUS_INTERRUPT
        else:
            status &= ~PCI_STATUS_INTERRUPT
        self.cs.set(PCI_STATUS, 2, status)
        self._update_intx()

    @property
    def bus_master(self) -> bool:
        return bool(self.cs.get(PCI_COMMAND, 2) & PCI_COMMAND_MASTER)

    def request_dma_read(self, address: int, length: int) -> int | None:
        """Ask for guest memory [address, address + length); the bytes come to
        `on_dma_completed` with the returned token. None: refused at once (Bus
        Master Enable is off, or the range is empty or wraps past 2^64)."""
        return self._request_dma(address, length, write=False, data=b"")

    def request_dma_write(self, address: int, data: bytes) -> int | None:
        """Ask for `data` to be written to guest memory at `address` (see request_dma_read)."""
        return self._request_dma(address, len(data), write=True, data=bytes(data))

    def _request_dma(self, address: int, length: int, *, write: bool, data: bytes) -> int | None:
        if not self.bus_master:
            return None
        # A request's end is checked against 2^64 here, so no shell ever sees a wrap.
        if length <= 0 or not 0 <= address < _ADDRESS_SPACE or length > _ADDRESS_SPACE - address:
            return None
        token = self._next_dma_token
        self._next_dma_token += 1
        self._dma_pending[token] = _PendingDma(address, length, write)
        self._effects.append(DmaRequested(self.device_id, token, address, length, write, data))
        return token

    def dma_completed(self, token: int, data: bytes | None, error: str | None) -> list[Effect]:
        """The shell's answer to a DmaRequested effect; returns what finishing it caused.

        A token this function no longer knows (a reset forgot it) is dropped, as
        a function drops completions for requests issued before its reset. A
        read that brought back the wrong number of bytes completes with an error.
        """
        pending = self._dma_pending.pop(token, None)
        if pending is None:
            return []
        if error is None and not pending.write and (data is None or len(data) != pending.length):
            got = "nothing" if data is None else f"{len(data)} bytes"
            error = f"a DMA read of {pending.length} bytes returned {got}"
        if error is not None or pending.write:
            data = None
        self.on_dma_completed(token, data, error)
        return self.take_effects()

    @property
    def dma_outstanding(self) -> int:
        return len(self._dma_pending)

    def take_effects(self) -> list[Effect]:
        effects, self._effects = self._effects, []
        return effects

    # -- config space

    @property
    def command(self) -> int:
        return self.cs.get(PCI_COMMAND, 2)

    def decoded(self) -> dict[int, AddressRange]:
        return self.bars.decoded(self.command)

    def config_read(self, offset: int, size: int) -> int:
        validate_config_access(offset, size, self.cs.size)
        return self.cs.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> list[Effect]:
        validate_config_access(offset, size, self.cs.size)
        value &= (1 << (8 * size)) - 1
        if BarRegisters.is_bar_register(offset):
            # Sub-dword BAR writes merge into the register, then apply whole.
            register = offset & ~3
            shift = 8 * (offset - register)
            mask = ((1 << (8 * size)) - 1) << shift
            current = self.cs.get(register, 4)
            self.bars.write_register(register, (current & ~mask) | (value << shift))
        else:
            self.cs.write(offset, size, value)
        msix = self.msix
        if msix is not None and msix.owns_config(offset, size):
            self._deliver_pending()
        if offset < PCI_COMMAND + 2 and offset + size > PCI_COMMAND:
            self._update_intx()
        self.config_written(offset, size)
        return self.take_effects()

    def config_written(self, offset: int, size: int) -> None:
        """Hook: a guest config write landed (after masks applied)."""

    # -- BARs

    def bar_spec(self, bar: int) -> BarSpec:
        spec = self.bars.specs.get(bar)
        if spec is None:
            raise AccessError(f"device {self.device_id} has no BAR {bar}")
        return spec

    def _check_bar_access(self, bar: int, offset: int, size: int) -> BarSpec:
        spec = self.bar_spec(bar)
        if size not in BAR_ACCESS_SIZES:
            raise AccessError(f"BAR access size {size} is not 1, 2, 4 or 8")
        if not 0 <= offset <= spec.size - size:
            raise AccessError(
                f"BAR{bar} offset {offset:#x} (+{size}) is outside its {spec.size:#x} bytes"
            )
        return spec

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self._check_bar_access(bar, offset, size)
        if bar == ROM_BAR_INDEX:
            chunk = self.rom[offset : offset + size] if offset < len(self.rom) else b""
            return int.from_bytes(chunk.ljust(size, b"\0"), "little")
        msix = self.msix
        if msix is not None and bar == self._msix_bar:
            if msix.table.contains(offset, size):
                return msix.read_table(offset - msix.table.base, size)
            if msix.pba.contains(offset, size):
                return msix.read_pba(offset - msix.pba.base, size)
        return self.read_bar(bar, offset, size) & ((1 << (8 * size)) - 1)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> list[Effect]:
        self._check_bar_access(bar, offset, size)
        value &= (1 << (8 * size)) - 1
        if bar == ROM_BAR_INDEX:
            return []  # read-only memory
        msix = self.msix
        if msix is not None and bar == self._msix_bar:
            if msix.table.contains(offset, size):
                msix.write_table(offset - msix.table.base, size, value)
                self._deliver_pending()
                return self.take_effects()
            if msix.pba.contains(offset, size):
                return []  # the PBA is read-only
        self.write_bar(bar, offset, size, value)
        return self.take_effects()

    @property
    def _msix_bar(self) -> int:
        assert self.msix is not None
        return self.cs.get(self.msix.cap_offset + 4, 4) & 0x7

    # -- reset

    def reset(self) -> list[Effect]:
        """Function-level reset: config space and device state back to power-on."""
        self.cs.set_bytes(0, self._power_on)
        self._dma_pending.clear()  # completions of earlier requests are dropped
        if self.msix is not None:
            self.msix.reset()
        self.on_reset()
        self.set_intx(False)
        return self.take_effects()

    # -- internals

    def _write_header(self) -> None:
        ident, cs = self.identity, self.cs
        cs.set(PCI_VENDOR_ID, 2, ident.vendor_id)
        cs.set(PCI_DEVICE_ID, 2, ident.device_id)
        cs.set(PCI_COMMAND, 2, 0)
        cs.set_writable(PCI_COMMAND, 2, PCI_COMMAND_WRITABLE)
        cs.set(PCI_STATUS, 2, cs.get(PCI_STATUS, 2) & ~(PCI_STATUS_W1C | PCI_STATUS_INTERRUPT))
        cs.set_w1c(PCI_STATUS, 2, PCI_STATUS_W1C)
        cs.set(PCI_REVISION_ID, 1, ident.revision)
        cs.set(PCI_CLASS_PROG, 3, ident.class_code)
        cs.set(PCI_CACHE_LINE_SIZE, 1, 0)
        cs.set_writable(PCI_CACHE_LINE_SIZE, 1, 0xFF)
        cs.set(PCI_HEADER_TYPE, 1, 0x00)  # type 0, single function
        cs.set(PCI_SUBSYSTEM_VENDOR_ID, 2, ident.subsystem_vendor_id)
        cs.set(PCI_SUBSYSTEM_ID, 2, ident.subsystem_id)
        cs.set(PCI_INTERRUPT_LINE, 1, 0)
        cs.set_writable(PCI_INTERRUPT_LINE, 1, 0xFF)
        cs.set(PCI_INTERRUPT_PIN, 1, ident.interrupt_pin)
        self._intx_line = False

    def _update_intx(self) -> None:
        if not self.identity.interrupt_pin:
            return
        asserted = self._intx_line and not self.command & PCI_COMMAND_INTX_DISABLE
        if asserted != self._intx_asserted:
            self._intx_asserted = asserted
            self._effects.append(IntxChanged(self.device_id, self.identity.interrupt_pin, asserted))

    def _deliver_pending(self) -> None:
        assert self.msix is not None
        for vector, message in self.msix.deliverable_pending():
            self._effects.append(MsiRaised(self.device_id, vector, message.address, message.data))


def _as_32bit(spec: BarSpec) -> BarSpec:
    if spec.kind is not BarKind.MEM64:
        return spec
    if spec.size > 1 << 31:
        raise ConfigError(
            f"BAR{spec.index} ({spec.size:#x} bytes) needs 64-bit addressing, "
            "which this frontend does not offer"
        )
    return BarSpec(spec.index, BarKind.MEM32, spec.size, spec.prefetchable, spec.backing)
