"""Configuration mechanism #1 (0xCF8/0xCFC, AMD IO-ECS, 0xCF9 reset) and ECAM decoding."""

from __future__ import annotations

import pytest

from vmm_client.addressing import (
    CF8_ENABLE,
    CF8_PORT,
    CFB_PORT,
    CFC_PORT,
    ECAM_BUS_SIZE,
    ECAM_MAX_SIZE,
    RESET_CONTROL_PORT,
    Cf8Port,
    ConfigAddress,
    EcamWindow,
    all_ones,
    cf8_address,
    ecam_decode,
    ecam_offset,
)

# ---------------------------------------------------------------- CF8 latch


def test_latch_starts_disabled() -> None:
    cf8 = Cf8Port()
    assert cf8.latch == 0
    assert not cf8.enabled
    assert cf8.data_target(CFC_PORT, 4) is None


def test_32bit_write_latches_and_reads_back() -> None:
    # Linux pci_check_type1: outl(0x80000000, 0xCF8) and expect inl to return it.
    cf8 = Cf8Port()
    assert cf8.write_address(4, 0x8000_0000) is False
    assert cf8.read_address(4) == 0x8000_0000
    assert cf8.enabled


def test_latch_keeps_raw_value_truncated_to_32_bits() -> None:
    cf8 = Cf8Port()
    cf8.write_address(4, 0x1_FFFF_FFFF)
    assert cf8.read_address(4) == 0xFFFF_FFFF


@pytest.mark.parametrize(("port", "size"), [(0xCF8, 1), (0xCF8, 2), (0xCFA, 2), (0xCFA, 1)])
def test_narrow_writes_do_not_latch(port: int, size: int) -> None:
    cf8 = Cf8Port()
    cf8.write_address(4, 0x8000_0810)
    assert cf8.write_address(size, 0, port) is False
    assert cf8.latch == 0x8000_0810


def test_linux_type1_probe_sequence() -> None:
    # arch/x86/pci/direct.c:pci_check_type1, exactly.
    cf8 = Cf8Port()
    cf8.write_address(4, 0x8000_0000)  # something a previous user left
    assert cf8.write_address(1, 0x01, CFB_PORT) is False  # outb(0x01, 0xCFB)
    saved = cf8.read_address(4)  # tmp = inl(0xCF8)
    assert saved == 0x8000_0000
    cf8.write_address(4, 0x8000_0000)
    assert cf8.read_address(4) == 0x8000_0000
    cf8.write_address(4, saved)  # outl(tmp, 0xCF8)
    assert cf8.latch == saved


def test_type2_probe_fails() -> None:
    # pci_check_type2 wants inb(0xCF8) == 0 and inb(0xCFA) == 0: we are not type 2.
    cf8 = Cf8Port()
    cf8.write_address(1, 0x00, CFB_PORT)
    cf8.write_address(1, 0x00, CF8_PORT)
    cf8.write_address(1, 0x00, 0xCFA)
    assert cf8.read_address(1, CF8_PORT) == 0xFF
    assert cf8.read_address(1, 0xCFA) == 0xFF


@pytest.mark.parametrize(("port", "size"), [(0xCF8, 1), (0xCF8, 2), (0xCFA, 2), (0xCFB, 1)])
def test_narrow_reads_are_all_ones(port: int, size: int) -> None:
    cf8 = Cf8Port()
    cf8.write_address(4, 0x8000_0000)
    assert cf8.read_address(size, port) == all_ones(size)


# ---------------------------------------------------------------- 0xCF9 reset control


@pytest.mark.parametrize("value", [0x04, 0x06, 0x0E, 0xFF])
def test_cf9_rst_cpu_requests_reset(value: int) -> None:
    cf8 = Cf8Port()
    cf8.write_address(4, 0x8000_0000)
    assert cf8.write_address(1, value, RESET_CONTROL_PORT) is True
    assert cf8.latch == 0x8000_0000  # not a latch write


@pytest.mark.parametrize("value", [0x00, 0x02, 0x08, 0x0A])
def test_cf9_without_rst_cpu_is_not_a_reset(value: int) -> None:
    cf8 = Cf8Port()
    assert cf8.write_address(1, value, RESET_CONTROL_PORT) is False
    assert cf8.latch == 0


def test_cf9_reads_back_sys_rst_only() -> None:
    cf8 = Cf8Port()
    cf8.write_address(1, 0x0E, RESET_CONTROL_PORT)
    assert cf8.read_address(1, RESET_CONTROL_PORT) == 0x02
    cf8.write_address(1, 0x00, RESET_CONTROL_PORT)
    assert cf8.read_address(1, RESET_CONTROL_PORT) == 0x00


def test_cf9_word_write_is_not_reset() -> None:
    cf8 = Cf8Port()
    assert cf8.write_address(2, 0x0606, RESET_CONTROL_PORT) is False


# ---------------------------------------------------------------- data port


def test_enable_bit_clear_decodes_nothing() -> None:
    cf8 = Cf8Port()
    cf8.write_address(4, cf8_address(0, 3, 0, 0x10) & ~CF8_ENABLE)
    for port in range(CFC_PORT, CFC_PORT + 4):
        assert cf8.data_target(port, 1) is None


def test_bus_device_function_extraction() -> None:
    cf8 = Cf8Port()
    cf8.write_address(4, 0x80AB_FD3C)  # bus 0xab, dev 31, fn 5, reg 0x3c
    assert cf8.data_target(CFC_PORT, 4) == ConfigAddress(0xAB, 31, 5, 0x3C)


def test_low_two_latch_bits_are_ignored() -> None:
    cf8 = Cf8Port()
    cf8.write_address(4, cf8_address(0, 1, 0, 0x10) | 0x3)
    assert cf8.data_target(CFC_PORT, 4) == ConfigAddress(0, 1, 0, 0x10)


@pytest.mark.parametrize("ext", range(16))
def test_amd_extended_bits_reach_offsets_above_0xff(ext: int) -> None:
    cf8 = Cf8Port()
    offset = (ext << 8) | 0x44
    cf8.write_address(4, cf8_address(0, 2, 0, offset))
    assert cf8.latch & 0x0F00_0000 == ext << 24
    target = cf8.data_target(CFC_PORT + 2, 2)
    assert target == ConfigAddress(0, 2, 0, offset + 2)


def test_extended_offset_0x100() -> None:
    # Linux reads dword 0x100 to decide whether extended space exists.
    cf8 = Cf8Port()
    cf8.write_address(4, 0x8000_0000 | (0x1 << 24) | (3 << 11))
    target = cf8.data_target(CFC_PORT, 4)
    assert target is not None
    assert target.offset == 0x100
    assert target.device == 3


@pytest.mark.parametrize("port", range(CFC_PORT, CFC_PORT + 4))
@pytest.mark.parametrize("size", [1, 2, 4])
def test_every_data_port_and_size(port: int, size: int) -> None:
    cf8 = Cf8Port()
    cf8.write_address(4, cf8_address(0, 7, 1, 0xF8))
    target = cf8.data_target(port, size)
    byte = port - CFC_PORT
    if byte + size > 4:
        assert target is None  # would cross into the next dword
    else:
        assert target == ConfigAddress(0, 7, 1, 0xF8 + byte)


def test_data_port_at_top_of_extended_space() -> None:
    cf8 = Cf8Port()
    cf8.write_address(4, cf8_address(0, 0, 0, 0xFFC))
    assert cf8.data_target(0xCFF, 1) == ConfigAddress(0, 0, 0, 0xFFF)
    assert cf8.data_target(0xCFE, 2) == ConfigAddress(0, 0, 0, 0xFFE)


@pytest.mark.parametrize(
    ("port", "size"), [(0xCFB, 1), (0xD00, 1), (CFC_PORT, 3), (CFC_PORT, 8), (CFC_PORT, 0)]
)
def test_data_target_rejects_caller_bugs(port: int, size: int) -> None:
    with pytest.raises(ValueError):
        Cf8Port().data_target(port, size)


@pytest.mark.parametrize(("port", "size"), [(0xCF7, 1), (0xCFC, 4), (CF8_PORT, 3)])
def test_address_port_rejects_caller_bugs(port: int, size: int) -> None:
    cf8 = Cf8Port()
    with pytest.raises(ValueError):
        cf8.write_address(size, 0, port)
    with pytest.raises(ValueError):
        cf8.read_address(size, port)


def test_cf8_address_matches_linux_macro() -> None:
    # PCI_CONF1_EXT_ADDRESS(bus, devfn, reg) from arch/x86/pci/direct.c
    bus, dev, fn, reg = 0x12, 0x1F, 0x7, 0xABC
    devfn = dev << 3 | fn
    linux = 0x8000_0000 | ((reg & 0xF00) << 16) | (bus << 16) | (devfn << 8) | (reg & 0xFC)
    assert cf8_address(bus, dev, fn, reg) == linux


# ---------------------------------------------------------------- ConfigAddress


@pytest.mark.parametrize(
    "fields", [(256, 0, 0, 0), (0, 32, 0, 0), (0, 0, 8, 0), (0, 0, 0, 4096), (-1, 0, 0, 0)]
)
def test_config_address_range_checks(fields: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        ConfigAddress(*fields)


def test_config_address_str() -> None:
    assert str(ConfigAddress(0, 3, 1, 0x104)) == "00:03.1+0x104"


# ---------------------------------------------------------------- ECAM

BASE = 0xB000_0000
SIZE = ECAM_MAX_SIZE


def test_ecam_first_byte() -> None:
    assert ecam_decode(BASE, SIZE, BASE, 1) == ConfigAddress(0, 0, 0, 0)
    assert ecam_decode(BASE, SIZE, BASE, 4) == ConfigAddress(0, 0, 0, 0)


def test_ecam_last_dword_and_byte() -> None:
    end = BASE + SIZE
    assert ecam_decode(BASE, SIZE, end - 4, 4) == ConfigAddress(255, 31, 7, 0xFFC)
    assert ecam_decode(BASE, SIZE, end - 1, 1) == ConfigAddress(255, 31, 7, 0xFFF)


def test_ecam_outside_the_window() -> None:
    end = BASE + SIZE
    assert ecam_decode(BASE, SIZE, end, 1) is None  # one past the end
    assert ecam_decode(BASE, SIZE, end, 4) is None
    assert ecam_decode(BASE, SIZE, BASE - 1, 1) is None
    assert ecam_decode(BASE, SIZE, BASE - 4, 4) is None
    assert ecam_decode(BASE, SIZE, 0, 4) is None


def test_ecam_small_window_covers_fewer_buses() -> None:
    size = 4 * ECAM_BUS_SIZE
    assert ecam_decode(BASE, size, BASE + 3 * ECAM_BUS_SIZE, 4) == ConfigAddress(3, 0, 0, 0)
    assert ecam_decode(BASE, size, BASE + 4 * ECAM_BUS_SIZE, 4) is None


@pytest.mark.parametrize(
    ("bus", "dev", "fn", "reg"),
    [(0, 0, 0, 0), (0, 1, 0, 0x10), (1, 0, 0, 0), (0, 0, 1, 0), (0x5A, 0x15, 0x3, 0x7F8)],
)
def test_ecam_bus_device_function_extraction(bus: int, dev: int, fn: int, reg: int) -> None:
    address = BASE + ecam_offset(bus, dev, fn, reg)
    assert address == BASE + (bus << 20 | dev << 15 | fn << 12 | reg)
    assert ecam_decode(BASE, SIZE, address, 4) == ConfigAddress(bus, dev, fn, reg)


@pytest.mark.parametrize("byte", range(4))
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_ecam_never_crosses_a_dword(byte: int, size: int) -> None:
    address = BASE + ecam_offset(0, 2, 0, 0x40) + byte
    target = ecam_decode(BASE, SIZE, address, size)
    if byte + size > 4:
        assert target is None
    else:
        assert target == ConfigAddress(0, 2, 0, 0x40 + byte)


@pytest.mark.parametrize(
    ("base", "size"),
    [(BASE, 0), (BASE, ECAM_BUS_SIZE - 1), (BASE, 2 * SIZE), (-ECAM_BUS_SIZE, SIZE)],
)
def test_ecam_rejects_bad_windows(base: int, size: int) -> None:
    with pytest.raises(ValueError):
        ecam_decode(base, size, BASE, 4)
    with pytest.raises(ValueError):
        EcamWindow(base, size)


def test_ecam_rejects_nonpositive_size() -> None:
    with pytest.raises(ValueError):
        ecam_decode(BASE, SIZE, BASE, 0)


def test_ecam_window() -> None:
    window = EcamWindow(BASE, 16 * ECAM_BUS_SIZE)
    assert window.bus_count == 16
    assert window.end == BASE + 16 * ECAM_BUS_SIZE
    assert window.contains(BASE)
    assert not window.contains(window.end - 2, 4)
    assert window.decode(BASE + ecam_offset(15, 31, 7, 0xFFC), 4) == ConfigAddress(15, 31, 7, 0xFFC)
    assert window.decode(window.end, 4) is None
