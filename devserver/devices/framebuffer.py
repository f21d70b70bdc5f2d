"""A VESA framebuffer compatible with QEMU's `bochs-display` (Linux: drm/tiny/bochs.c).

PCI 1234:1111, class 0x0380 (display, other), revision 2 (so Linux looks for
the QEMU extended registers), no interrupt.

BAR0  prefetchable 32-bit memory: the VRAM, `vram_size` bytes (a power of two),
      backed by shared memory (ports.SharedFramebuffer). A frontend maps it
      (the BAR's `backing`), so guest pixel stores never leave the guest; the
      accesses a frontend forwards instead land in the same bytes.
BAR2  4 KiB of MMIO registers:
      0x000-0x3ff  EDID (devices/edid.py), read-only; Linux reads it when the
                   first 8 bytes are the EDID header
      0x400-0x4ff  VGA ports of QEMU's stdvga: not on this device (read 0)
      0x500-0x515  Bochs VBE DISPI registers, 16 bits each, index = (offset - 0x500) / 2
      0x600-0x607  QEMU extended registers: SIZE (RO, 8), BYTEORDER (RW)

DISPI registers: ID reads 0xB0C5 (VBE_DISPI_ID5; writes ignored),
VIDEO_MEMORY_64K reads the VRAM size in 64 KiB units (RO); XRES, YRES, BPP,
ENABLE, BANK, VIRT_WIDTH, VIRT_HEIGHT, X_OFFSET, Y_OFFSET hold what the guest
wrote (16 bits). Like QEMU's bochs-display, nothing is checked at write time;
the displayed mode is derived from them (`mode()`) and refused as a whole when
it does not fit: ENABLED off, BPP not 16 or 32, XRES or YRES under 64, or the
visible rectangle (offset + stride * YRES) past the end of VRAM (reliability.md
C11: the VBE integer overflows of CVE-2016-3712 cannot happen with Python ints,
but the bounds check must). There is no banked window, so BANK is only stored.
The guest-visible VRAM is never touched by a register write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..effects import BarKind
from ..errors import ConfigError
from ..pci.bars import BarSpec
from ..pci.function import PciFunction, PciIdentity, Presentation
from ..ports import SharedFramebuffer
from .edid import build_edid

VENDOR_ID: Final = 0x1234
DEVICE_ID: Final = 0x1111
CLASS_CODE: Final = 0x038000  # display controller, other
REVISION: Final = 2  # Linux's bochs driver reads the extended registers from revision 2

VRAM_BAR: Final = 0
MMIO_BAR: Final = 2
MMIO_SIZE: Final = 0x1000
DEFAULT_VRAM_MIB: Final = 16
MAX_VRAM_MIB: Final = 256  # VIDEO_MEMORY_64K is 16 bits: 4 GiB - 64 KiB at most; keep it sane

EDID_OFFSET: Final = 0x000
EDID_WINDOW: Final = 0x400
DISPI_OFFSET: Final = 0x500
QEXT_OFFSET: Final = 0x600

# Bochs VBE DISPI register indices (Bochs vbe.h; QEMU include/hw/display/bochs-vbe.h).
VBE_DISPI_INDEX_ID: Final = 0x0
VBE_DISPI_INDEX_XRES: Final = 0x1
VBE_DISPI_INDEX_YRES: Final = 0x2
VBE_DISPI_INDEX_BPP: Final = 0x3
VBE_DISPI_INDEX_ENABLE: Final = 0x4
VBE_DISPI_INDEX_BANK: Final = 0x5
VBE_DISPI_INDEX_VIRT_WIDTH: Final = 0x6
VBE_DISPI_INDEX_VIRT_HEIGHT: Final = 0x7
VBE_DISPI_INDEX_X_OFFSET: Final = 0x8
VBE_DISPI_INDEX_Y_OFFSET: Final = 0x9
VBE_DISPI_INDEX_VIDEO_MEMORY_64K: Final = 0xA
VBE_DISPI_INDEX_NB: Final = 0xB
DISPI_SIZE: Final = 2 * VBE_DISPI_INDEX_NB

VBE_DISPI_ID5: Final = 0xB0C5
VBE_DISPI_ENABLED: Final = 0x01
VBE_DISPI_LFB_ENABLED: Final = 0x40

# QEMU extended registers (QEMU hw/display/vga_int.h PCI_VGA_QEXT_*).
QEXT_REG_SIZE: Final = 0x0
QEXT_REG_BYTEORDER: Final = 0x4
QEXT_SIZE: Final = 8
QEXT_LITTLE_ENDIAN: Final = 0x1E1E1E1E
QEXT_BIG_ENDIAN: Final = 0xBEBEBEBE

MIN_DIMENSION: Final = 64  # QEMU's bochs-display shows nothing smaller
SUPPORTED_BPP: Final = (16, 32)


@dataclass(frozen=True, slots=True)
class DisplayMode:
    """What the display shows: `height` rows of `width` pixels, each row
    `stride` bytes after the previous one, from VRAM byte `offset`."""

    width: int
    height: int
    bpp: int
    stride: int
    offset: int
    big_endian: bool

    @property
    def bytes_per_pixel(self) -> int:
        return self.bpp // 8


def vram_size_from_mib(raw: str) -> int:
    """The `vram=` option (MiB, a power of two, 1..MAX_VRAM_MIB) in bytes."""
    try:
        mib = int(raw, 10)
    except ValueError:
        raise ConfigError(f"vesa-fb vram={raw!r} is not a number of MiB") from None
    if not 1 <= mib <= MAX_VRAM_MIB or mib & (mib - 1):
        raise ConfigError(f"vesa-fb vram={mib}: use a power of two from 1 to {MAX_VRAM_MIB} MiB")
    return mib << 20


class BochsDisplay(PciFunction):
    """The framebuffer device; the VRAM is the shell's shared memory."""

    type_name = "vesa-fb"

    def __init__(
        self,
        vram: SharedFramebuffer,
        presentation: Presentation = Presentation(),
        serial: int = 0,
        *,
        edid: bool = True,
    ) -> None:
        backing = vram.backing
        size = backing.size
        if size < 1 << 20 or size & (size - 1) or size > MAX_VRAM_MIB << 20:
            raise ConfigError(f"vesa-fb VRAM of {size:#x} bytes is not a power of two MiB")
        if len(vram.view) != size:
            raise ConfigError("vesa-fb VRAM view and backing differ in size")
        super().__init__(
            PciIdentity(
                vendor_id=VENDOR_ID,
                device_id=DEVICE_ID,
                class_code=CLASS_CODE,
                revision=REVISION,
                subsystem_vendor_id=0x1AF4,  # QEMU's defaults for its own PCI devices
                subsystem_id=0x1100,
                interrupt_pin=0,
            ),
            [
                BarSpec(VRAM_BAR, BarKind.MEM32, size, prefetchable=True, backing=backing),
                BarSpec(MMIO_BAR, BarKind.MEM32, MMIO_SIZE),
            ],
            presentation=presentation,
            serial=serial,
        )
        self.vram = vram.view
        self.vram_size = size
        self.edid = build_edid(serial=serial) if edid else b""
        self.regs = [0] * VBE_DISPI_INDEX_NB
        self.byteorder = QEXT_LITTLE_ENDIAN

    def on_reset(self) -> None:
        # The VRAM keeps its contents, as real VRAM does across a function reset.
        self.regs = [0] * VBE_DISPI_INDEX_NB
        self.byteorder = QEXT_LITTLE_ENDIAN

    # -- DISPI registers

    def dispi_read(self, index: int) -> int:
        if index == VBE_DISPI_INDEX_ID:
            return VBE_DISPI_ID5
        if index == VBE_DISPI_INDEX_VIDEO_MEMORY_64K:
            return self.vram_size >> 16
        if 0 <= index < VBE_DISPI_INDEX_NB:
            return self.regs[index]
        return 0

    def dispi_write(self, index: int, value: int) -> None:
        if index in (VBE_DISPI_INDEX_ID, VBE_DISPI_INDEX_VIDEO_MEMORY_64K):
            return  # read-only here (bochs-display has one fixed ID)
        if 0 <= index < VBE_DISPI_INDEX_NB:
            self.regs[index] = value & 0xFFFF

    def mode(self) -> DisplayMode | None:
        """The mode the registers describe, or None when the display is off or
        the mode is refused (see the module docstring)."""
        regs = self.regs
        if not regs[VBE_DISPI_INDEX_ENABLE] & VBE_DISPI_ENABLED:
            return None
        bpp = regs[VBE_DISPI_INDEX_BPP]
        if bpp not in SUPPORTED_BPP:
            return None
        width, height = regs[VBE_DISPI_INDEX_XRES], regs[VBE_DISPI_INDEX_YRES]
        if width < MIN_DIMENSION or height < MIN_DIMENSION:
            return None
        bytes_per_pixel = bpp // 8
        stride = max(regs[VBE_DISPI_INDEX_VIRT_WIDTH], width) * bytes_per_pixel
        offset = (
            regs[VBE_DISPI_INDEX_X_OFFSET] * bytes_per_pixel
            + regs[VBE_DISPI_INDEX_Y_OFFSET] * stride
        )
        # The last row ends at offset + stride * (height - 1) + width * bpp;
        # QEMU asks for the whole last stride, and so do we.
        if offset + stride * height > self.vram_size:
            return None
        return DisplayMode(width, height, bpp, stride, offset, self.byteorder == QEXT_BIG_ENDIAN)

    # -- BAR accesses a frontend forwards

    def read_bar(self, bar: int, offset: int, size: int) -> int:
        # The base class has checked offset + size against the BAR's size.
        if bar == VRAM_BAR:
            return int.from_bytes(self.vram[offset : offset + size], "little")
        if bar != MMIO_BAR:
            return 0
        return int.from_bytes(bytes(self._mmio_byte(offset + i) for i in range(size)), "little")

    def write_bar(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar == VRAM_BAR:
            self.vram[offset : offset + size] = value.to_bytes(size, "little")
            return
        if bar != MMIO_BAR:
            return
        data = value.to_bytes(size, "little")
        end = offset + size
        if offset < DISPI_OFFSET + DISPI_SIZE and end > DISPI_OFFSET:
            # Each 16-bit register the access covers, merged with the bytes it
            # does not cover (a byte write changes one half).
            first = max(offset, DISPI_OFFSET) & ~1
            for reg_offset in range(first, min(end, DISPI_OFFSET + DISPI_SIZE), 2):
                index = (reg_offset - DISPI_OFFSET) // 2
                current = self.dispi_read(index).to_bytes(2, "little")
                merged = bytes(
                    data[reg_offset + i - offset] if offset <= reg_offset + i < end else current[i]
                    for i in range(2)
                )
                self.dispi_write(index, int.from_bytes(merged, "little"))
        reg = QEXT_OFFSET + QEXT_REG_BYTEORDER
        if offset == reg and size == 4 and value in (QEXT_LITTLE_ENDIAN, QEXT_BIG_ENDIAN):
            self.byteorder = value

    def _mmio_byte(self, offset: int) -> int:
        if EDID_OFFSET <= offset < EDID_OFFSET + EDID_WINDOW:
            at = offset - EDID_OFFSET
            return self.edid[at] if at < len(self.edid) else 0
        if DISPI_OFFSET <= offset < DISPI_OFFSET + DISPI_SIZE:
            at = offset - DISPI_OFFSET
            return self.dispi_read(at // 2) >> (8 * (at & 1)) & 0xFF
        if QEXT_OFFSET <= offset < QEXT_OFFSET + QEXT_SIZE:
            at = offset - QEXT_OFFSET
            word = QEXT_SIZE if at < QEXT_REG_BYTEORDER else self.byteorder
            return word >> (8 * (at & 3)) & 0xFF
        return 0

    # -- what the display shows

    def screendump(
        self, first_row: int = 0, max_rows: int | None = None
    ) -> tuple[DisplayMode | None, int, bytes]:
        """Rows [first_row, first_row + n) of the picture as 8-bit RGB triples
        (a PPM P6 body), n = min(max_rows, rows left); (None, 0, b"") when the
        display is off. Reads VRAM only inside the checked mode's rectangle."""
        mode = self.mode()
        if mode is None:
            return None, 0, b""
        first = min(max(first_row, 0), mode.height)
        rows = (
            mode.height - first if max_rows is None else min(max(max_rows, 0), mode.height - first)
        )
        line = mode.width * mode.bytes_per_pixel
        pixels = bytearray(line * rows)
        for row in range(rows):
            start = mode.offset + (first + row) * mode.stride
            pixels[row * line : (row + 1) * line] = self.vram[start : start + line]
        return mode, rows, to_rgb(bytes(pixels), mode.bpp, big_endian=mode.big_endian)


def _table(function: Callable[[int], int]) -> bytes:
    return bytes(function(b) & 0xFF for b in range(256))


# RGB565 little-endian: low byte GGGBBBBB, high byte RRRRRGGG; 5/6-bit
# channels widen to 8 bits by repeating their top bits.
_R_FROM_HIGH = _table(lambda b: (b >> 3) << 3 | (b >> 5))
_G_FROM_HIGH = _table(lambda b: (b & 7) << 5 | (b & 7) >> 1)
_G_FROM_LOW = _table(lambda b: (b >> 5) << 2)
_B_FROM_LOW = _table(lambda b: (b & 31) << 3 | (b & 31) >> 2)


def to_rgb(pixels: bytes, bpp: int, *, big_endian: bool = False) -> bytes:
    """Packed pixels (XRGB8888 or RGB565, in the given byte order) as RGB triples.
    Works on whole channels with slices and tables, never per pixel in Python."""
    out = bytearray(len(pixels) // (bpp // 8) * 3)
    if bpp == 32:
        red, green, blue = (1, 2, 3) if big_endian else (2, 1, 0)
        out[0::3] = pixels[red::4]
        out[1::3] = pixels[green::4]
        out[2::3] = pixels[blue::4]
    elif bpp == 16:
        high, low = (pixels[0::2], pixels[1::2]) if big_endian else (pixels[1::2], pixels[0::2])
        count = len(high)
        out[0::3] = high.translate(_R_FROM_HIGH)
        green = int.from_bytes(high.translate(_G_FROM_HIGH), "big") | int.from_bytes(
            low.translate(_G_FROM_LOW), "big"
        )
        out[1::3] = green.to_bytes(count, "big")
        out[2::3] = low.translate(_B_FROM_LOW)
    else:
        raise ValueError(f"{bpp} bits per pixel is not 16 or 32")
    return bytes(out)
