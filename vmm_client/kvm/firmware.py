"""What a PC's firmware does for a framebuffer before Linux starts, done by the VMM.

The 64-bit boot protocol skips the real-mode setup code that would ask the
VESA BIOS for a linear framebuffer, so the VMM does the BIOS's part itself
when the device server serves a vesa-fb (Bochs DISPI compatible): it places
the VRAM BAR and the register BAR in the 32-bit PCI hole, turns memory
decoding on, sets a 32 bpp mode through the DISPI registers, and describes it
in boot_params.screen_info (linux.screen_info: VIDEO_TYPE_VLFB), which
Linux's sysfb turns into a "vesa-framebuffer" for vesafb.

vesafb maps screen_info.lfb_base once and never follows a BAR move
(frontend-kvm.md §3.6), so the BAR must be assigned here, where Linux keeps
it: an address it can claim (inside no e820 entry) that it has no reason to
move. The VRAM is a shared-memory BAR: as soon as it decodes, the frontend's
PciHost maps it as a memslot (memslots.py), before the kernel's first pixel.
"""

from __future__ import annotations

from typing import Final, Protocol

from devmodel.v1 import devmodel_pb2 as pb

from .linux import Framebuffer

FB_VENDOR: Final = 0x1234
FB_DEVICE: Final = 0x1111
FB_VRAM_BAR: Final = 0
FB_MMIO_BAR: Final = 2
# In the PCI hole, naturally aligned for any VRAM up to 256 MiB; the register
# BAR follows the VRAM. Linux assigns the BARs nobody set from the bottom of
# the hole up, so these stay where they are.
FB_BASE: Final = 0xE000_0000
PCI_COMMAND: Final = 0x04
PCI_COMMAND_MEMORY: Final = 0x2
PCI_BAR0: Final = 0x10
DISPI_OFFSET: Final = 0x500
DISPI_XRES: Final = 1
DISPI_YRES: Final = 2
DISPI_BPP: Final = 3
DISPI_ENABLE: Final = 4
DISPI_ENABLED_LFB: Final = 0x41  # VBE_DISPI_ENABLED | VBE_DISPI_LFB_ENABLED
BPP: Final = 32
# Largest first; the first that fits the VRAM (a 1 MiB VRAM gets 512x384).
MODES: Final = ((1024, 768), (800, 600), (640, 480), (512, 384), (320, 240))


class FirmwareSession(Protocol):
    """The part of a session firmware needs (SyncSession has it)."""

    def config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> object: ...
    def bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None: ...
    def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int: ...


def find_framebuffer(topology: pb.Topology) -> pb.DeviceInfo | None:
    """The first vesa-fb on bus 0 whose VRAM BAR is shared memory, if any."""
    for d in topology.devices:
        if (d.bus, d.function, d.vendor_id, d.product_id) != (0, 0, FB_VENDOR, FB_DEVICE):
            continue
        bars = {b.index: b for b in d.bars}
        vram = bars.get(FB_VRAM_BAR)
        if vram is not None and vram.shared_memory and FB_MMIO_BAR in bars:
            return d
    return None


def pick_mode(vram_size: int) -> tuple[int, int] | None:
    for width, height in MODES:
        if width * height * BPP // 8 <= vram_size:
            return width, height
    return None


def setup_framebuffer(session: FirmwareSession, topology: pb.Topology) -> Framebuffer | None:
    """Assign, enable and set a mode on the served vesa-fb; its screen_info description."""
    device = find_framebuffer(topology)
    if device is None:
        return None
    bars = {b.index: b for b in device.bars}
    vram_size = bars[FB_VRAM_BAR].size
    mode = pick_mode(vram_size)
    if mode is None or vram_size > 1 << 28 or bars[FB_MMIO_BAR].size > 1 << 20:
        return None  # a VRAM or register BAR this layout cannot place: no boot framebuffer
    width, height = mode
    slot = device.device
    session.config_write(0, slot, 0, PCI_BAR0 + 4 * FB_VRAM_BAR, 4, FB_BASE)
    session.config_write(0, slot, 0, PCI_BAR0 + 4 * FB_MMIO_BAR, 4, FB_BASE + vram_size)
    session.config_write(0, slot, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    for index, value in (
        (DISPI_XRES, width),
        (DISPI_YRES, height),
        (DISPI_BPP, BPP),
        (DISPI_ENABLE, DISPI_ENABLED_LFB),
    ):
        session.bar_write(device.device_id, FB_MMIO_BAR, DISPI_OFFSET + 2 * index, 2, value)
    # A read orders after the posted writes: the mode is set when we return.
    session.bar_read(device.device_id, FB_MMIO_BAR, DISPI_OFFSET + 2 * DISPI_ENABLE, 2)
    return Framebuffer(
        base=FB_BASE, width=width, height=height, stride=width * BPP // 8, size=vram_size
    )
