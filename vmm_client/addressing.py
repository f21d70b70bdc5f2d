"""PCI configuration access decoders: mechanism #1 (0xCF8/0xCFC) and PCIe ECAM.

A frontend turns a guest's port or MMIO access into a `ConfigAddress` here and
forwards only `(bus, device, function, offset, size, value)` to the server
(frontend-kvm.md, "Frontend CF8/CFC rules" and §1.5):

- Configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2): a 32-bit address
  latch at 0xCF8 and a data window at 0xCFC..0xCFF, with AMD's IO-ECS
  extension (CF8 bits 27:24 = register bits 11:8, which Linux uses on AMD
  family >= 0x10 guests to reach extended config space).
- The reset control register at 0xCF9 (PIIX3/ICH RCR), which shares the
  address latch's ports but only on byte accesses.
- PCIe enhanced configuration access (PCIe 1.1 §7.2.2): a memory window in
  which `bus << 20 | device << 15 | function << 12 | register` addresses
  4 KiB of config space per function.

No I/O: callers read all-ones and drop writes whenever a decoder answers None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

CF8_PORT: Final = 0xCF8  # CONFIG_ADDRESS
RESET_CONTROL_PORT: Final = 0xCF9  # RCR, a byte register inside CONFIG_ADDRESS's dword
CFB_PORT: Final = 0xCFB  # Linux's pci_check_type1 does outb(0x01, 0xCFB) first
CFC_PORT: Final = 0xCFC  # CONFIG_DATA
CONFIG_ADDRESS_PORTS: Final = range(CF8_PORT, CF8_PORT + 4)
CONFIG_DATA_PORTS: Final = range(CFC_PORT, CFC_PORT + 4)

CF8_ENABLE: Final = 1 << 31
# Bits 1:0 of the register number are implied by the data port; 27:24 are AMD's.
CF8_REGISTER_MASK: Final = 0xFC
CF8_EXT_REGISTER_MASK: Final = 0x0F00_0000

# Reset control register bits (Intel ICH/PIIX3 RCR; QEMU's piix "rcr").
RCR_SYS_RST: Final = 0x02  # full (not CPU-only) reset; the only bit that reads back
RCR_RST_CPU: Final = 0x04  # writing 1 starts the reset: 0x06 and 0x0E both reboot

ECAM_BUS_SHIFT: Final = 20
ECAM_DEVICE_SHIFT: Final = 15
ECAM_FUNCTION_SHIFT: Final = 12
ECAM_BUS_SIZE: Final = 1 << ECAM_BUS_SHIFT  # 1 MiB of config space per bus
ECAM_MAX_SIZE: Final = 256 * ECAM_BUS_SIZE

MAX_BUS: Final = 255
MAX_DEVICE: Final = 31
MAX_FUNCTION: Final = 7
CONFIG_SPACE_END: Final = 4096

_ACCESS_SIZES: Final = (1, 2, 4)


def all_ones(size: int) -> int:
    """What a read of `size` bytes returns when nothing answers (master abort)."""
    return (1 << (8 * size)) - 1


@dataclass(frozen=True, slots=True)
class ConfigAddress:
    """One function's config register, as the server's ConfigRead/ConfigWrite name it."""

    bus: int
    device: int
    function: int
    offset: int

    def __post_init__(self) -> None:
        if not 0 <= self.bus <= MAX_BUS:
            raise ValueError(f"bus {self.bus} is not 0..{MAX_BUS}")
        if not 0 <= self.device <= MAX_DEVICE:
            raise ValueError(f"device {self.device} is not 0..{MAX_DEVICE}")
        if not 0 <= self.function <= MAX_FUNCTION:
            raise ValueError(f"function {self.function} is not 0..{MAX_FUNCTION}")
        if not 0 <= self.offset < CONFIG_SPACE_END:
            raise ValueError(f"config offset {self.offset:#x} is not 0..{CONFIG_SPACE_END - 1:#x}")

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}.{self.function}+{self.offset:#05x}"


def cf8_address(bus: int, device: int, function: int, offset: int) -> int:
    """The CONFIG_ADDRESS value a guest writes for a register (Linux PCI_CONF1_ADDRESS).

    Offsets >= 0x100 use the AMD IO-ECS bits 27:24 (Linux's PCI_CONF1_EXT_ADDRESS).
    """
    ConfigAddress(bus, device, function, offset)  # range checks
    return (
        CF8_ENABLE
        | ((offset & 0xF00) << 16)
        | (bus << 16)
        | (device << 11)
        | (function << 8)
        | (offset & CF8_REGISTER_MASK)
    )


def ecam_offset(bus: int, device: int, function: int, offset: int) -> int:
    """Where a register lives inside an ECAM window (PCIe 1.1 §7.2.2, table 7-1)."""
    ConfigAddress(bus, device, function, offset)  # range checks
    return (
        (bus << ECAM_BUS_SHIFT)
        | (device << ECAM_DEVICE_SHIFT)
        | (function << ECAM_FUNCTION_SHIFT)
        | offset
    )


def _check_access(port: int, size: int, ports: range) -> None:
    # A KVM exit never reports these; getting one is a caller bug, not guest input.
    if size not in _ACCESS_SIZES:
        raise ValueError(f"port access size {size} is not 1, 2 or 4")
    if port not in ports:
        raise ValueError(f"port {port:#x} is not {ports.start:#x}..{ports.stop - 1:#x}")


class Cf8Port:
    """Configuration mechanism #1: the CONFIG_ADDRESS latch and the data-port decoder.

    Only a 32-bit access at 0xCF8 is CONFIG_ADDRESS (PCI 3.0 §3.2.2.3.2: "only
    DWORD accesses"; QEMU ignores the rest). Narrower accesses to 0xCF8..0xCFB
    belong to other registers: a byte at 0xCF9 is the reset control register,
    and Linux's probe byte-writes 0xCFB, which must not disturb the latch.
    """

    __slots__ = ("_latch", "_reset_control")

    def __init__(self) -> None:
        self._latch = 0
        self._reset_control = 0

    @property
    def latch(self) -> int:
        """The raw CONFIG_ADDRESS value last written with a 32-bit access."""
        return self._latch

    @property
    def enabled(self) -> bool:
        return bool(self._latch & CF8_ENABLE)

    def write_address(self, size: int, value: int, port: int = CF8_PORT) -> bool:
        """Handle a guest OUT to 0xCF8..0xCFB; return True when it requests a system reset.

        The frontend, not the device server, owns the reset: on True it resets
        the VM (or reports the reboot) instead of forwarding anything.
        """
        _check_access(port, size, CONFIG_ADDRESS_PORTS)
        value &= all_ones(size)
        if port == CF8_PORT and size == 4:
            self._latch = value
            return False
        if port == RESET_CONTROL_PORT and size == 1:
            # QEMU piix_rcr: only SYS_RST is remembered; RST_CPU triggers and self-clears.
            self._reset_control = value & RCR_SYS_RST
            return bool(value & RCR_RST_CPU)
        return False  # outb 0x01 -> 0xCFB and friends: not a latch

    def read_address(self, size: int, port: int = CF8_PORT) -> int:
        """Handle a guest IN from 0xCF8..0xCFB.

        A 32-bit read of 0xCF8 returns the latch (Linux's pci_check_type1 writes
        0x80000000 and expects it back); a byte read of 0xCF9 returns the reset
        control register; anything else reads all-ones, which also makes
        Linux's mechanism #2 probe (inb 0xCF8 == 0) fail, as it should.
        """
        _check_access(port, size, CONFIG_ADDRESS_PORTS)
        if port == CF8_PORT and size == 4:
            return self._latch
        if port == RESET_CONTROL_PORT and size == 1:
            return self._reset_control
        return all_ones(size)

    def data_target(self, port: int, size: int) -> ConfigAddress | None:
        """Decode an access at 0xCFC..0xCFF against the latch.

        None when the enable bit is clear or when the access would run past
        0xCFF into the next dword: the caller then reads all-ones and drops
        writes, as a bus with nothing there does.
        """
        _check_access(port, size, CONFIG_DATA_PORTS)
        latch = self._latch
        if not latch & CF8_ENABLE:
            return None
        byte = port - CFC_PORT
        if byte + size > 4:
            return None
        offset = ((latch & CF8_REGISTER_MASK) | ((latch >> 16) & 0xF00)) + byte
        return ConfigAddress(
            bus=(latch >> 16) & 0xFF,
            device=(latch >> 11) & 0x1F,
            function=(latch >> 8) & 0x7,
            offset=offset,
        )


def _check_window(window_base: int, window_size: int) -> None:
    if window_base < 0:
        raise ValueError(f"ECAM window base {window_base:#x} is negative")
    if not 0 < window_size <= ECAM_MAX_SIZE or window_size % ECAM_BUS_SIZE:
        raise ValueError(
            f"ECAM window size {window_size:#x} is not a multiple of 1 MiB up to 256 MiB"
        )


def ecam_decode(
    window_base: int, window_size: int, address: int, size: int
) -> ConfigAddress | None:
    """Decode a guest MMIO access inside an ECAM window whose first bus is bus 0.

    None outside the window, or when the access crosses a 4-byte boundary
    (PCIe 1.1 §7.2.2.1: such accesses are not supported; an 8-byte access
    always crosses one), so the caller reads all-ones and drops writes.
    """
    _check_window(window_base, window_size)
    if size < 1:
        raise ValueError(f"access size {size} is not positive")
    offset = address - window_base
    if offset < 0 or offset + size > window_size:
        return None
    if (offset & 3) + size > 4:
        return None
    return ConfigAddress(
        bus=offset >> ECAM_BUS_SHIFT,
        device=(offset >> ECAM_DEVICE_SHIFT) & 0x1F,
        function=(offset >> ECAM_FUNCTION_SHIFT) & 0x7,
        offset=offset & (CONFIG_SPACE_END - 1),
    )


@dataclass(frozen=True, slots=True)
class EcamWindow:
    """An ECAM window at `base` covering `size // 1 MiB` buses from bus 0 (an MCFG entry)."""

    base: int
    size: int

    def __post_init__(self) -> None:
        _check_window(self.base, self.size)

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.base + self.size

    @property
    def bus_count(self) -> int:
        return self.size // ECAM_BUS_SIZE

    def contains(self, address: int, size: int = 1) -> bool:
        return self.base <= address and address + size <= self.end

    def decode(self, address: int, size: int) -> ConfigAddress | None:
        return ecam_decode(self.base, self.size, address, size)
