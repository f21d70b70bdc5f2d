"""Device specs from the command line: strict parsing whose errors name the fix."""

from __future__ import annotations

import pytest

from devserver.config import (
    ConsoleOptions,
    DeviceSpec,
    build_bus,
    console_options,
    parse_device_spec,
)
from devserver.devices.testdev import PciTestDevice
from devserver.errors import ConfigError
from devserver.pci.function import Presentation


def test_bare_type_has_no_name_and_no_slot() -> None:
    assert parse_device_spec("pci-testdev") == DeviceSpec("pci-testdev")


def test_slot_and_name_are_parsed() -> None:
    spec = parse_device_spec("pci-testdev,slot=5,name=td")
    assert (spec.type, spec.name, spec.slot, dict(spec.options)) == ("pci-testdev", "td", 5, {})


def test_slot_accepts_hex() -> None:
    assert parse_device_spec("pci-testdev,slot=0x1f").slot == 31


def test_whitespace_around_parts_is_ignored() -> None:
    assert parse_device_spec(" pci-testdev , slot=2 ").slot == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "missing device type", id="empty"),
        pytest.param(",slot=1", "missing device type", id="no type"),
        pytest.param("virtio-nope", "unknown device type", id="unknown type"),
        pytest.param("pci-testdev,colour=red", "has no option 'colour'", id="unknown key"),
        pytest.param("pci-testdev,slot", "is not key=value", id="missing value"),
        pytest.param("pci-testdev,=3", "is not key=value", id="missing key"),
        pytest.param("pci-testdev,slot=two", "is not a number", id="slot not a number"),
        pytest.param("pci-testdev,slot=0", "slot 0 is not", id="slot 0 is the host bridge"),
        pytest.param("pci-testdev,slot=32", "slot 32 is not", id="slot past 31"),
        pytest.param("pci-testdev,slot=-1", "slot -1 is not", id="negative slot"),
        pytest.param("pci-testdev,slot=1,slot=2", "given twice", id="duplicate key"),
        pytest.param("pci-testdev,name=a,name=b", "given twice", id="duplicate name key"),
        pytest.param("pci-testdev,name=", "name= is empty", id="empty name"),
    ],
)
def test_bad_spec_raises_config_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_device_spec(text)


def test_unknown_type_error_lists_the_known_types() -> None:
    with pytest.raises(ConfigError, match="pci-testdev"):
        parse_device_spec("virtio-nope")


def test_build_bus_rejects_duplicate_names() -> None:
    specs = [parse_device_spec("pci-testdev,name=x"), parse_device_spec("pci-testdev,name=x")]
    with pytest.raises(ConfigError, match="two devices are named 'x'"):
        build_bus(specs)


def test_default_names_count_per_type() -> None:
    specs = [parse_device_spec("pci-testdev") for _ in range(2)]
    assert [f.name for _, f in build_bus(specs)] == ["pci-testdev0", "pci-testdev1"]


def test_explicit_name_clashing_with_a_default_one_is_rejected() -> None:
    specs = [parse_device_spec("pci-testdev"), parse_device_spec("pci-testdev,name=pci-testdev0")]
    with pytest.raises(ConfigError, match="two devices are named"):
        build_bus(specs)


def test_build_bus_rejects_two_devices_in_one_slot() -> None:
    specs = [parse_device_spec("pci-testdev,slot=3"), parse_device_spec("pci-testdev,slot=3")]
    with pytest.raises(ConfigError, match="slot 3 is already taken"):
        build_bus(specs)


def test_fixed_slots_are_placed_before_automatic_ones() -> None:
    # The automatic device would take slot 1 if placed first.
    specs = [parse_device_spec("pci-testdev,name=auto"), parse_device_spec("pci-testdev,slot=1")]
    bus = build_bus(specs)
    assert {f.name: slot for slot, f in bus} == {"pci-testdev0": 1, "auto": 2}


def test_build_bus_honours_the_presentation() -> None:
    bus = build_bus([parse_device_spec("pci-testdev,slot=1")], Presentation(msix=False))
    function = bus.function(1)
    assert isinstance(function, PciTestDevice)
    assert function.msix is None
    assert function.presentation == Presentation(msix=False)


def test_devices_get_distinct_serial_numbers() -> None:
    bus = build_bus([parse_device_spec("pci-testdev") for _ in range(3)])
    serials = {f.config_read(0x104, 4) for _, f in bus}
    assert len(serials) == 3


def test_console_options_are_checked() -> None:
    spec = parse_device_spec("virtio-console,socket=/run/c.sock,cols=132")
    assert console_options(spec.options) == ConsoleOptions("/run/c.sock", 132, 25)
    with pytest.raises(ConfigError, match="socket=PATH"):
        console_options(parse_device_spec("virtio-console").options)
    with pytest.raises(ConfigError, match="not a number"):
        console_options(parse_device_spec("virtio-console,socket=/x,rows=tall").options)
    with pytest.raises(ConfigError, match=r"0\.\.65535"):
        console_options(parse_device_spec("virtio-console,socket=/x,cols=70000").options)
    with pytest.raises(ConfigError, match="no option 'path'"):
        parse_device_spec("virtio-console,path=/x")


def test_a_console_needs_its_stream() -> None:
    with pytest.raises(ConfigError, match="socket was not opened"):
        build_bus([parse_device_spec("virtio-console,socket=/x")])
