"""Enumerate and program a bus through the stream, the way Linux's PCI core does.

This is what a guest kernel does at boot (drivers/pci/probe.c): read the
vendor ID of every slot, size each BAR with decoding turned off around the
probe (`__pci_read_base`), walk the capability lists, then assign addresses
and turn decoding on. The device server sees exactly the config traffic a
real guest would cause, and the BAR events it sends back keep a routing
table current. `python -m vmm_client probe` prints the result like `lspci -vv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from devserver.effects import BarKind, Effect
from devserver.pci import regs

from .client import AsyncSession

_CAP_NAMES = {
    regs.PCI_CAP_ID_PM: "Power Management",
    regs.PCI_CAP_ID_VNDR: "Vendor Specific Information",
    regs.PCI_CAP_ID_EXP: "Express",
    regs.PCI_CAP_ID_MSIX: "MSI-X",
}
_EXT_CAP_NAMES = {regs.PCI_EXT_CAP_ID_DSN: "Device Serial Number"}

# Where addresses are handed out (a q35-like layout below 4 GiB; 64-bit BARs above).
IO_WINDOW = (0xC000, 0x10000)
MEM32_WINDOW = (0xE000_0000, 0xFEC0_0000)
MEM64_WINDOW = (0x8_0000_0000, 0x10_0000_0000)


@dataclass(slots=True)
class ProbedBar:
    index: int
    kind: BarKind
    size: int
    prefetchable: bool
    address: int = 0


@dataclass(slots=True)
class ProbedFunction:
    bus: int
    device: int
    function: int
    vendor_id: int
    device_id: int
    class_code: int
    revision: int
    subsystem_vendor_id: int
    subsystem_id: int
    interrupt_pin: int
    bars: list[ProbedBar] = field(default_factory=list)
    capabilities: list[tuple[int, int]] = field(default_factory=list)  # (offset, id)
    ext_capabilities: list[tuple[int, int, int]] = field(default_factory=list)  # + version
    command: int = 0


async def _size_bar(s: AsyncSession, bdf: tuple[int, int, int], register: int) -> tuple[int, int]:
    """Write all-ones, read back, restore: (original, read-back)."""
    original = await s.config_read(*bdf, register, 4)
    await s.config_write(*bdf, register, 4, 0xFFFF_FFFF)
    mask = await s.config_read(*bdf, register, 4)
    await s.config_write(*bdf, register, 4, original)
    return original, mask


async def probe_function(
    s: AsyncSession, bus: int, device: int, function: int
) -> ProbedFunction | None:
    bdf = (bus, device, function)
    vendor = await s.config_read(*bdf, regs.PCI_VENDOR_ID, 2)
    if vendor in (0xFFFF, 0x0000):
        return None
    class_rev = await s.config_read(*bdf, regs.PCI_REVISION_ID, 4)
    found = ProbedFunction(
        bus,
        device,
        function,
        vendor_id=vendor,
        device_id=await s.config_read(*bdf, regs.PCI_DEVICE_ID, 2),
        class_code=class_rev >> 8,
        revision=class_rev & 0xFF,
        subsystem_vendor_id=await s.config_read(*bdf, regs.PCI_SUBSYSTEM_VENDOR_ID, 2),
        subsystem_id=await s.config_read(*bdf, regs.PCI_SUBSYSTEM_ID, 2),
        interrupt_pin=await s.config_read(*bdf, regs.PCI_INTERRUPT_PIN, 1),
    )
    # Decoding off while sizing, as Linux does, so no probe value ever decodes.
    command = await s.config_read(*bdf, regs.PCI_COMMAND, 2)
    await s.config_write(*bdf, regs.PCI_COMMAND, 2, command & ~0x3)
    index = 0
    while index < regs.NUM_BARS:
        register = regs.PCI_BASE_ADDRESS_0 + 4 * index
        original, mask = await _size_bar(s, bdf, register)
        if mask == 0:
            index += 1
            continue
        if mask & regs.PCI_BASE_ADDRESS_SPACE_IO:
            size = (~(mask & regs.PCI_BASE_ADDRESS_IO_MASK) + 1) & 0xFFFF_FFFF
            found.bars.append(ProbedBar(index, BarKind.IO, size, False, original & ~0x3))
            index += 1
            continue
        prefetch = bool(mask & regs.PCI_BASE_ADDRESS_MEM_PREFETCH)
        if mask & regs.PCI_BASE_ADDRESS_MEM_TYPE_64:
            high_original, high_mask = await _size_bar(s, bdf, register + 4)
            full = (high_mask << 32) | (mask & regs.PCI_BASE_ADDRESS_MEM_MASK)
            size = (~full + 1) & 0xFFFF_FFFF_FFFF_FFFF
            address = (high_original << 32) | (original & ~0xF)
            found.bars.append(ProbedBar(index, BarKind.MEM64, size, prefetch, address))
            index += 2
        else:
            size = (~(mask & regs.PCI_BASE_ADDRESS_MEM_MASK) + 1) & 0xFFFF_FFFF
            found.bars.append(ProbedBar(index, BarKind.MEM32, size, prefetch, original & ~0xF))
            index += 1
    rom_original = await s.config_read(*bdf, regs.PCI_ROM_ADDRESS, 4)
    await s.config_write(*bdf, regs.PCI_ROM_ADDRESS, 4, regs.PCI_ROM_ADDRESS_MASK)
    rom_mask = await s.config_read(*bdf, regs.PCI_ROM_ADDRESS, 4) & regs.PCI_ROM_ADDRESS_MASK
    await s.config_write(*bdf, regs.PCI_ROM_ADDRESS, 4, rom_original)
    if rom_mask:
        rom_size = (~rom_mask + 1) & 0xFFFF_FFFF
        found.bars.append(
            ProbedBar(regs.ROM_BAR_INDEX, BarKind.ROM, rom_size, False, rom_original & ~0x7FF)
        )
    await s.config_write(*bdf, regs.PCI_COMMAND, 2, command)
    found.command = command
    # Capabilities: bounded walks, so a looping list cannot hang us.
    status = await s.config_read(*bdf, regs.PCI_STATUS, 2)
    at = await s.config_read(*bdf, regs.PCI_CAPABILITY_LIST, 1) if status & 0x10 else 0
    for _ in range(48):
        at &= 0xFC
        if at < 0x40:
            break
        header = await s.config_read(*bdf, at, 2)
        found.capabilities.append((at, header & 0xFF))
        at = header >> 8
    if any(cap_id == regs.PCI_CAP_ID_EXP for _, cap_id in found.capabilities):
        at = 0x100
        for _ in range(960):
            header = await s.config_read(*bdf, at, 4)
            if header in (0, 0xFFFF_FFFF):
                break
            found.ext_capabilities.append((at, header & 0xFFFF, (header >> 16) & 0xF))
            at = header >> 20
            if at < 0x100:
                break
    return found


async def probe_bus(s: AsyncSession, bus: int = 0) -> list[ProbedFunction]:
    """Probe all 32 slots of `bus` (function 0: our devices are single-function)."""
    found = []
    for device in range(32):
        function = await probe_function(s, bus, device, 0)
        if function is not None:
            found.append(function)
    return found


class Allocator:
    """Naturally aligned bump allocation in one window."""

    def __init__(self, start: int, end: int) -> None:
        self.next, self.end = start, end

    def take(self, size: int) -> int:
        base = (self.next + size - 1) & ~(size - 1)
        if base + size > self.end:
            raise RuntimeError(f"no room for {size:#x} bytes below {self.end:#x}")
        self.next = base + size
        return base


async def assign_and_enable(s: AsyncSession, functions: list[ProbedFunction]) -> list[Effect]:
    """Give every BAR an address, then turn on IO, MEM and bus mastering."""
    io, mem32, mem64 = Allocator(*IO_WINDOW), Allocator(*MEM32_WINDOW), Allocator(*MEM64_WINDOW)
    events: list[Effect] = []
    for f in functions:
        bdf = (f.bus, f.device, f.function)
        # Largest first, like Linux's pbus_size_mem, so alignment wastes little.
        for bar in sorted(f.bars, key=lambda b: -b.size):
            if bar.kind is BarKind.IO:
                bar.address = io.take(bar.size)
            elif bar.kind is BarKind.MEM64:
                bar.address = mem64.take(bar.size)
            else:
                bar.address = mem32.take(bar.size)
            register = (
                regs.PCI_ROM_ADDRESS
                if bar.kind is BarKind.ROM
                else regs.PCI_BASE_ADDRESS_0 + 4 * bar.index
            )
            events += await s.config_write(*bdf, register, 4, bar.address & 0xFFFF_FFFF)
            if bar.kind is BarKind.MEM64:
                events += await s.config_write(*bdf, register + 4, 4, bar.address >> 32)
        f.command = regs.PCI_COMMAND_IO | regs.PCI_COMMAND_MEMORY | regs.PCI_COMMAND_MASTER
        events += await s.config_write(*bdf, regs.PCI_COMMAND, 2, f.command)
    return events


def _size_text(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def format_lspci(f: ProbedFunction) -> str:
    """An `lspci -vv`-shaped description of a probed function."""
    io_on = "+" if f.command & regs.PCI_COMMAND_IO else "-"
    mem_on = "+" if f.command & regs.PCI_COMMAND_MEMORY else "-"
    master = "+" if f.command & regs.PCI_COMMAND_MASTER else "-"
    lines = [
        f"{f.bus:02x}:{f.device:02x}.{f.function} Class [{f.class_code >> 8:04x}]: "
        f"Device [{f.vendor_id:04x}:{f.device_id:04x}] (rev {f.revision:02x})",
        f"\tSubsystem: Device [{f.subsystem_vendor_id:04x}:{f.subsystem_id:04x}]",
        f"\tControl: I/O{io_on} Mem{mem_on} BusMaster{master}",
    ]
    if f.interrupt_pin:
        lines.append(f"\tInterrupt: pin {'ABCD'[f.interrupt_pin - 1]}")
    for bar in f.bars:
        size = _size_text(bar.size)
        if bar.kind is BarKind.IO:
            lines.append(f"\tRegion {bar.index}: I/O ports at {bar.address:x} [size={size}]")
        elif bar.kind is BarKind.ROM:
            lines.append(f"\tExpansion ROM at {bar.address:x} [disabled] [size={size}]")
        else:
            width = "64-bit" if bar.kind is BarKind.MEM64 else "32-bit"
            pref = "prefetchable" if bar.prefetchable else "non-prefetchable"
            lines.append(
                f"\tRegion {bar.index}: Memory at {bar.address:x} ({width}, {pref}) [size={size}]"
            )
    for offset, cap_id in f.capabilities:
        lines.append(f"\tCapabilities: [{offset:x}] {_CAP_NAMES.get(cap_id, f'#{cap_id:02x}')}")
    for offset, cap_id, version in f.ext_capabilities:
        name = _EXT_CAP_NAMES.get(cap_id, f"#{cap_id:04x}")
        lines.append(f"\tCapabilities: [{offset:x} v{version}] {name}")
    return "\n".join(lines)
