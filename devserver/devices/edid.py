"""A VESA EDID 1.4 base block (VESA E-EDID Release A, Revision 2) for our display.

One 128-byte block, no extensions: the established 640x480, 800x600 and
1024x768 modes, a preferred detailed timing (VESA DMT 1024x768 at 60 Hz), a
range-limits and a product-name descriptor. Linux's bochs driver reads it from
BAR2 (offset 0) when the first 8 bytes are the EDID header, and checks the
checksum; without it the driver offers its own mode list.
"""

from __future__ import annotations

from typing import Final

EDID_SIZE: Final = 128
EDID_HEADER: Final = bytes((0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00))

# VESA DMT 1024x768 @ 60 Hz: 65 MHz, blanking 320 x 38, sync offset/width
# 24/136 pixels and 3/6 lines, both syncs negative.
_PIXEL_CLOCK_10KHZ: Final = 6500
_H_ACTIVE, _H_BLANK, _H_SYNC_OFFSET, _H_SYNC_WIDTH = 1024, 320, 24, 136
_V_ACTIVE, _V_BLANK, _V_SYNC_OFFSET, _V_SYNC_WIDTH = 768, 38, 3, 6
_IMAGE_MM: Final = (325, 244)  # a 16-inch 4:3 panel: only for DPI guesses

# sRGB primaries and D65 white point (CIE xy), stored as 10-bit fractions.
_CHROMATICITY: Final = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060), (0.3127, 0.3290))


def _manufacturer(letters: str) -> bytes:
    """Three letters A..Z packed 5 bits each, big-endian (E-EDID §3.4.1)."""
    code = 0
    for letter in letters:
        code = code << 5 | (ord(letter) - ord("A") + 1)
    return code.to_bytes(2, "big")


def _chromaticity() -> bytes:
    tenths = [round(v * 1024) & 0x3FF for point in _CHROMATICITY for v in point]
    rx, ry, gx, gy, bx, by, wx, wy = tenths
    low_rg = (rx & 3) << 6 | (ry & 3) << 4 | (gx & 3) << 2 | (gy & 3)
    low_bw = (bx & 3) << 6 | (by & 3) << 4 | (wx & 3) << 2 | (wy & 3)
    return bytes((low_rg, low_bw, *(v >> 2 for v in tenths)))


def _detailed_timing() -> bytes:
    h_mm, v_mm = _IMAGE_MM
    return bytes(
        (
            _PIXEL_CLOCK_10KHZ & 0xFF,
            _PIXEL_CLOCK_10KHZ >> 8,
            _H_ACTIVE & 0xFF,
            _H_BLANK & 0xFF,
            (_H_ACTIVE >> 8) << 4 | (_H_BLANK >> 8),
            _V_ACTIVE & 0xFF,
            _V_BLANK & 0xFF,
            (_V_ACTIVE >> 8) << 4 | (_V_BLANK >> 8),
            _H_SYNC_OFFSET & 0xFF,
            _H_SYNC_WIDTH & 0xFF,
            (_V_SYNC_OFFSET & 0xF) << 4 | (_V_SYNC_WIDTH & 0xF),
            (_H_SYNC_OFFSET >> 8) << 6
            | (_H_SYNC_WIDTH >> 8) << 4
            | (_V_SYNC_OFFSET >> 4) << 2
            | (_V_SYNC_WIDTH >> 4),
            h_mm & 0xFF,
            v_mm & 0xFF,
            (h_mm >> 8) << 4 | (v_mm >> 8),
            0,  # no borders
            0,
            0x18,  # digital separate sync, both polarities negative
        )
    )


def _descriptor(tag: int, payload: bytes) -> bytes:
    """An 18-byte display descriptor: 0, 0, 0, tag, 0, then 13 bytes."""
    assert len(payload) <= 13
    return bytes((0, 0, 0, tag, 0)) + payload.ljust(13, b"\x20")


def build_edid(name: str = "devmodel", serial: int = 0) -> bytes:
    """The 128-byte block, checksummed."""
    block = bytearray()
    block += EDID_HEADER
    block += _manufacturer("DVM")
    block += (0x1111).to_bytes(2, "little")  # product code: the PCI device id
    block += (serial & 0xFFFF_FFFF).to_bytes(4, "little")
    block += bytes((0, 2026 - 1990))  # week unknown, model year
    block += bytes((1, 4))  # EDID 1.4
    block += bytes((0x80,))  # digital input, depth and interface not given
    block += bytes((_IMAGE_MM[0] // 10, _IMAGE_MM[1] // 10))
    block += bytes((120,))  # gamma 2.2: (2.2 * 100) - 100
    block += bytes((0x06,))  # sRGB default, preferred timing is the native mode, RGB 4:4:4
    block += _chromaticity()
    # Established timings: 640x480@60, 800x600@60 (byte 0), 1024x768@60 (byte 1).
    block += bytes((0x21, 0x08, 0x00))
    block += b"\x01\x01" * 8  # no standard timings
    block += _detailed_timing()
    # Range limits: 50-125 Hz vertical, 30-160 kHz horizontal, 300 MHz, no formula.
    block += _descriptor(0xFD, bytes((50, 125, 30, 160, 30, 0x01, 0x0A)))
    block += _descriptor(0xFC, name.encode("ascii", "replace")[:12] + b"\n")
    block += _descriptor(0x10, b"\x00" * 13)  # dummy
    block += bytes((0,))  # no extension blocks
    assert len(block) == EDID_SIZE - 1
    block += bytes(((-sum(block)) & 0xFF,))
    return bytes(block)
