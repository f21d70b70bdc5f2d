"""The VESA framebuffer (bochs-display) register model, played the way Linux's bochs driver does."""

from __future__ import annotations

from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devserver.config import build_bus, framebuffer_options, parse_device_spec
from devserver.devices import framebuffer as fb
from devserver.devices.edid import EDID_HEADER, EDID_SIZE, build_edid
from devserver.devices.framebuffer import BochsDisplay, DisplayMode, to_rgb
from devserver.effects import BarDecodeChanged, BarKind, SharedMemory
from devserver.errors import ConfigError
from devserver.pci.bus import PciBus
from devserver.pci.regs import PCI_BASE_ADDRESS_0, PCI_COMMAND, PCI_COMMAND_MEMORY

MIB = 1 << 20


class FakeVram:
    """A bytearray posing as the shell's memfd."""

    def __init__(self, size: int = 16 * MIB) -> None:
        self._bytes = bytearray(size)
        self._backing = SharedMemory("/proc/1/fd/99", 0, size)

    @property
    def backing(self) -> SharedMemory:
        return self._backing

    @property
    def view(self) -> memoryview:
        return memoryview(self._bytes)


def dispi(index: int) -> int:
    return fb.DISPI_OFFSET + 2 * index


def set_mode(dev: BochsDisplay, width: int, height: int, bpp: int = 32) -> None:
    """bochs_hw_setmode's register writes, in its order."""
    w = dev.write_bar
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_ENABLE), 2, 0)
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_BPP), 2, bpp)
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_XRES), 2, width)
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_YRES), 2, height)
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_BANK), 2, 0)
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_VIRT_WIDTH), 2, width)
    virt_height = dev.vram_size // (width * bpp // 8)
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_VIRT_HEIGHT), 2, min(virt_height, 0xFFFF))
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_X_OFFSET), 2, 0)
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_Y_OFFSET), 2, 0)
    enable = fb.VBE_DISPI_ENABLED | fb.VBE_DISPI_LFB_ENABLED
    w(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_ENABLE), 2, enable)


@pytest.fixture
def dev() -> BochsDisplay:
    return BochsDisplay(FakeVram())


# -- identity and BARs


def test_identity_is_bochs_display(dev: BochsDisplay) -> None:
    assert dev.config_read(0, 4) == 0x1111_1234
    assert dev.config_read(0x08, 4) == 0x0380_0000 | fb.REVISION
    assert dev.config_read(0x3D, 1) == 0  # no interrupt pin


def test_bar0_is_prefetchable_32bit_vram_with_backing(dev: BochsDisplay) -> None:
    spec = dev.bar_spec(fb.VRAM_BAR)
    assert (spec.kind, spec.size, spec.prefetchable) == (BarKind.MEM32, 16 * MIB, True)
    assert spec.backing == SharedMemory("/proc/1/fd/99", 0, 16 * MIB)
    dev.config_write(PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    assert dev.config_read(PCI_BASE_ADDRESS_0, 4) == (~(16 * MIB - 1) & 0xFFFF_FFFF) | 0x8


def test_bar2_is_4k_mmio(dev: BochsDisplay) -> None:
    spec = dev.bar_spec(fb.MMIO_BAR)
    assert (spec.kind, spec.size, spec.prefetchable, spec.backing) == (
        BarKind.MEM32,
        0x1000,
        False,
        None,
    )


def test_vram_bar_decodes_with_its_backing() -> None:
    bus = PciBus()
    vram = FakeVram(4 * MIB)
    device_id = bus.plug(BochsDisplay(vram), 3)
    bus.config_write(0, 3, 0, PCI_BASE_ADDRESS_0, 4, 0xE000_0000)
    effects = bus.config_write(0, 3, 0, PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    vram_events = [e for e in effects if isinstance(e, BarDecodeChanged) and e.bar == 0]
    assert len(vram_events) == 1
    assert vram_events[0].device_id == device_id
    assert vram_events[0].backing == vram.backing
    assert vram_events[0].prefetchable


def test_forwarded_vram_accesses_hit_the_shared_bytes() -> None:
    vram = FakeVram(MIB)
    dev = BochsDisplay(vram)
    dev.bar_write(fb.VRAM_BAR, MIB - 8, 8, 0x1122_3344_5566_7788)
    assert bytes(vram.view[MIB - 8 :]) == bytes.fromhex("8877665544332211")
    vram.view[16:20] = b"\x01\x02\x03\x04"
    assert dev.bar_read(fb.VRAM_BAR, 16, 4) == 0x0403_0201


# -- what Linux's bochs driver reads


def test_dispi_id_and_memory_size(dev: BochsDisplay) -> None:
    assert dev.bar_read(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_ID), 2) == 0xB0C5
    assert dev.bar_read(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_VIDEO_MEMORY_64K), 2) == 256
    dev.bar_write(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_ID), 2, 0xB0C0)
    dev.bar_write(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_VIDEO_MEMORY_64K), 2, 1)
    assert dev.bar_read(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_ID), 2) == 0xB0C5
    assert dev.bar_read(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_VIDEO_MEMORY_64K), 2) == 256


def test_qemu_extended_registers(dev: BochsDisplay) -> None:
    assert dev.bar_read(fb.MMIO_BAR, fb.QEXT_OFFSET, 4) == 8
    assert dev.bar_read(fb.MMIO_BAR, fb.QEXT_OFFSET + 4, 4) == fb.QEXT_LITTLE_ENDIAN
    dev.bar_write(fb.MMIO_BAR, fb.QEXT_OFFSET + 4, 4, fb.QEXT_BIG_ENDIAN)
    assert dev.bar_read(fb.MMIO_BAR, fb.QEXT_OFFSET + 4, 4) == fb.QEXT_BIG_ENDIAN
    dev.bar_write(fb.MMIO_BAR, fb.QEXT_OFFSET + 4, 4, 0x1234)  # not a byte-order mark
    assert dev.bar_read(fb.MMIO_BAR, fb.QEXT_OFFSET + 4, 4) == fb.QEXT_BIG_ENDIAN
    dev.bar_write(fb.MMIO_BAR, fb.QEXT_OFFSET, 4, 0)  # SIZE is read-only
    assert dev.bar_read(fb.MMIO_BAR, fb.QEXT_OFFSET, 4) == 8


def test_edid_is_readable_bytewise(dev: BochsDisplay) -> None:
    edid = bytes(dev.bar_read(fb.MMIO_BAR, i, 1) for i in range(EDID_SIZE))
    assert edid == build_edid(serial=0)
    assert dev.bar_read(fb.MMIO_BAR, 0, 8) == int.from_bytes(EDID_HEADER, "little")
    assert dev.bar_read(fb.MMIO_BAR, 0x200, 4) == 0  # past the block, inside the window


def test_edid_off_reads_zeroes() -> None:
    dev = BochsDisplay(FakeVram(MIB), edid=False)
    assert dev.bar_read(fb.MMIO_BAR, 0, 8) == 0


def test_edid_block_is_valid() -> None:
    edid = build_edid("a long display name", serial=7)
    assert len(edid) == EDID_SIZE
    assert edid[:8] == EDID_HEADER
    assert sum(edid) % 256 == 0
    assert edid[18:20] == b"\x01\x04"
    # the preferred timing: 1024x768
    dtd = edid[54:72]
    assert dtd[2] | (dtd[4] >> 4) << 8 == 1024
    assert dtd[5] | (dtd[7] >> 4) << 8 == 768


def test_linux_mode_set_gives_the_mode(dev: BochsDisplay) -> None:
    assert dev.mode() is None
    set_mode(dev, 1024, 768)
    assert dev.mode() == DisplayMode(1024, 768, 32, 4096, 0, big_endian=False)
    # panning (bochs_hw_setbase): Y_OFFSET moves the visible rectangle down
    dev.write_bar(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_Y_OFFSET), 2, 768)
    mode = dev.mode()
    assert mode is not None
    assert mode.offset == 768 * 4096


def test_registers_read_back(dev: BochsDisplay) -> None:
    set_mode(dev, 800, 600, 16)
    regs = {i: dev.bar_read(fb.MMIO_BAR, dispi(i), 2) for i in range(fb.VBE_DISPI_INDEX_NB)}
    assert regs[fb.VBE_DISPI_INDEX_XRES] == 800
    assert regs[fb.VBE_DISPI_INDEX_YRES] == 600
    assert regs[fb.VBE_DISPI_INDEX_BPP] == 16
    assert regs[fb.VBE_DISPI_INDEX_ENABLE] == 0x41


def test_byte_and_dword_register_writes_merge(dev: BochsDisplay) -> None:
    xres = dispi(fb.VBE_DISPI_INDEX_XRES)
    dev.write_bar(fb.MMIO_BAR, xres, 1, 0x20)
    dev.write_bar(fb.MMIO_BAR, xres + 1, 1, 0x03)
    assert dev.regs[fb.VBE_DISPI_INDEX_XRES] == 0x320
    # a dword write covers XRES and YRES
    dev.write_bar(fb.MMIO_BAR, xres, 4, 0x0258_0320)
    assert dev.regs[fb.VBE_DISPI_INDEX_YRES] == 0x258
    assert dev.bar_read(fb.MMIO_BAR, xres, 4) == 0x0258_0320


def test_reset_clears_registers_but_keeps_vram() -> None:
    vram = FakeVram(MIB)
    dev = BochsDisplay(vram)
    set_mode(dev, 256, 256)
    vram.view[0] = 0xAB
    dev.reset()
    assert dev.mode() is None
    assert vram.view[0] == 0xAB


# -- a hostile guest (reliability.md C11)


@pytest.mark.parametrize(
    ("width", "height", "bpp"),
    [
        pytest.param(0xFFFF, 0xFFFF, 32, id="huge"),
        pytest.param(4096, 4097, 32, id="one row too many"),
        pytest.param(1024, 768, 24, id="24 bpp"),
        pytest.param(1024, 768, 8, id="8 bpp"),
        pytest.param(63, 768, 32, id="too narrow"),
        pytest.param(1024, 0, 32, id="no rows"),
    ],
)
def test_modes_that_do_not_fit_are_refused(
    dev: BochsDisplay, width: int, height: int, bpp: int
) -> None:
    set_mode(dev, width, height, bpp)
    assert dev.mode() is None
    assert dev.screendump() == (None, 0, b"")


def test_largest_mode_that_fits_is_taken() -> None:
    dev = BochsDisplay(FakeVram(MIB))
    set_mode(dev, 512, 512)  # exactly 1 MiB
    assert dev.mode() is not None


def test_offsets_past_vram_are_refused(dev: BochsDisplay) -> None:
    set_mode(dev, 1024, 768)
    dev.write_bar(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_X_OFFSET), 2, 0xFFFF)
    dev.write_bar(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_Y_OFFSET), 2, 0xFFFF)
    assert dev.mode() is None
    dev.write_bar(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_X_OFFSET), 2, 0)
    dev.write_bar(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_Y_OFFSET), 2, 16 * MIB // 4096 - 768)
    assert dev.mode() is not None  # ends exactly at the end of VRAM
    dev.write_bar(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_X_OFFSET), 2, 1)
    assert dev.mode() is None


def test_huge_virtual_width_is_refused(dev: BochsDisplay) -> None:
    set_mode(dev, 1024, 768)
    dev.write_bar(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_VIRT_WIDTH), 2, 0xFFFF)
    assert dev.mode() is None  # 0xffff * 4 * 768 > 16 MiB


MMIO_ACCESS = st.tuples(
    st.sampled_from([1, 2, 4, 8]).flatmap(
        lambda size: st.tuples(
            st.integers(0, 0x1000 - size),
            st.just(size),
            st.integers(0, (1 << (8 * size)) - 1),
        )
    )
)
DISPI_WRITE = st.tuples(st.integers(0, fb.VBE_DISPI_INDEX_NB - 1), st.integers(0, 0xFFFF)).map(
    lambda t: (fb.DISPI_OFFSET + 2 * t[0], 2, t[1])
)


@given(
    st.lists(
        st.one_of(DISPI_WRITE, MMIO_ACCESS.map(lambda t: t[0])),
        max_size=40,
    )
)
def test_any_register_writes_keep_the_mode_inside_vram(
    writes: list[tuple[int, int, int]],
) -> None:
    dev = BochsDisplay(FakeVram(MIB))
    for offset, size, value in writes:
        dev.bar_write(fb.MMIO_BAR, offset, size, value)
        dev.bar_read(fb.MMIO_BAR, offset, size)
    mode = dev.mode()
    if mode is None:
        return
    assert mode.bpp in (16, 32)
    assert mode.width >= 64 and mode.height >= 64
    assert mode.stride >= mode.width * mode.bytes_per_pixel
    assert mode.offset + mode.stride * mode.height <= MIB
    shown, rows, rgb = dev.screendump(max_rows=4)
    assert shown == mode
    assert rows == 4
    assert len(rgb) == 4 * mode.width * 3


# -- the picture


def test_screendump_converts_xrgb8888() -> None:
    vram = FakeVram(MIB)
    dev = BochsDisplay(vram)
    set_mode(dev, 64, 64)
    vram.view[0:8] = bytes((0x10, 0x20, 0x30, 0xFF, 0x01, 0x02, 0x03, 0x00))  # B G R X
    mode, rows, rgb = dev.screendump()
    assert mode is not None and rows == 64
    assert rgb[:6] == bytes((0x30, 0x20, 0x10, 0x03, 0x02, 0x01))
    assert len(rgb) == 64 * 64 * 3


def test_screendump_rows_window_and_stride() -> None:
    vram = FakeVram(MIB)
    dev = BochsDisplay(vram)
    set_mode(dev, 64, 64)
    dev.write_bar(fb.MMIO_BAR, dispi(fb.VBE_DISPI_INDEX_VIRT_WIDTH), 2, 128)  # stride 512
    for row in range(64):
        vram.view[row * 512 : row * 512 + 4] = bytes((0, 0, row, 0))
    mode, rows, rgb = dev.screendump(first_row=10, max_rows=3)
    assert mode is not None and mode.stride == 512
    assert rows == 3
    assert [rgb[i * 64 * 3] for i in range(3)] == [10, 11, 12]
    assert dev.screendump(first_row=1000)[1] == 0


def _rgb565_reference(value: int) -> tuple[int, int, int]:
    r, g, b = value >> 11, (value >> 5) & 63, value & 31
    return (r << 3 | r >> 2, g << 2 | g >> 4, b << 3 | b >> 2)


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64), st.booleans())
def test_rgb565_conversion_matches_per_pixel_reference(pixels: list[int], big: bool) -> None:
    order: Literal["big", "little"] = "big" if big else "little"
    packed = b"".join(p.to_bytes(2, order) for p in pixels)
    rgb = to_rgb(packed, 16, big_endian=big)
    expected = b"".join(bytes(_rgb565_reference(p)) for p in pixels)
    assert rgb == expected


def test_xrgb8888_big_endian() -> None:
    assert to_rgb(bytes((0, 1, 2, 3)), 32, big_endian=True) == bytes((1, 2, 3))


# -- configuration


def test_spec_options() -> None:
    spec = parse_device_spec("vesa-fb,vram=4,edid=off")
    checked = framebuffer_options(spec.options)
    assert (checked.vram_size, checked.edid) == (4 * MIB, False)
    assert framebuffer_options({}).vram_size == 16 * MIB


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vesa-fb,vram=3", "power of two"),
        ("vesa-fb,vram=0", "power of two"),
        ("vesa-fb,vram=512", "power of two"),
        ("vesa-fb,vram=lots", "not a number"),
        ("vesa-fb,edid=maybe", "edid=on or edid=off"),
    ],
)
def test_bad_spec_options_name_the_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        framebuffer_options(parse_device_spec(text).options)


def test_build_bus_needs_the_shells_memory() -> None:
    spec = parse_device_spec("vesa-fb,vram=1")
    with pytest.raises(ConfigError, match="shared memory was not created"):
        build_bus([spec])
    bus = build_bus([spec], framebuffers={0: FakeVram(MIB)})
    (_, function), *_ = list(bus)
    assert isinstance(function, BochsDisplay)
    assert function.name == "vesa-fb0"


def test_vram_size_must_match_a_power_of_two_mib() -> None:
    with pytest.raises(ConfigError, match="power of two"):
        BochsDisplay(FakeVram(3 * MIB))
