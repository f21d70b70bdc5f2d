"""Device specs from the command line: `TYPE,key=value,...`.

Parsing is strict and its errors name the fix, because a typo in a device
spec is the most common way to start the server wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .devices.blk import VirtioBlk
from .devices.console import VirtioConsole
from .devices.testdev import PciTestDevice
from .errors import ConfigError
from .pci.bus import MAX_SLOTS, PciBus
from .pci.function import PciFunction, Presentation
from .ports import BlockBackend, ByteStream
from .virtio.pci_transport import VirtioPciFunction

# Keys every device takes; device-specific keys are listed per type.
COMMON_KEYS = frozenset({"slot", "name"})


@dataclass(frozen=True, slots=True)
class SpecBackends:
    """What the shell opened for one spec: a disk image, a console's stream."""

    block: BlockBackend | None = None
    stream: ByteStream | None = None


@dataclass(frozen=True, slots=True)
class DeviceType:
    name: str
    summary: str
    keys: frozenset[str]
    build: Callable[[Mapping[str, str], Presentation, int, SpecBackends], PciFunction]


def _build_testdev(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    return PciTestDevice(presentation, serial)


@dataclass(frozen=True, slots=True)
class BlockOptions:
    """virtio-blk's keys, checked (the shell opens `path`; config.py does no I/O)."""

    path: str
    readonly: bool
    serial: str


def block_options(options: Mapping[str, str]) -> BlockOptions:
    path = options.get("path", "")
    if not path:
        raise ConfigError("virtio-blk needs path=IMAGE (a raw disk image)")
    readonly = options.get("readonly", "off")
    if readonly not in ("on", "off"):
        raise ConfigError(f"virtio-blk readonly={readonly!r}: use readonly=on or readonly=off")
    serial = options.get("serial", "")
    if len(serial.encode()) > 20:
        raise ConfigError(f"virtio-blk serial={serial!r} is longer than 20 bytes")
    return BlockOptions(path, readonly == "on", serial)


def _build_blk(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    backend = backends.block
    if backend is None:
        raise ConfigError("virtio-blk: the disk image was not opened (no backend given)")
    device = VirtioBlk(backend, serial=block_options(options).serial)
    return VirtioPciFunction(device, presentation=presentation, serial=serial)


@dataclass(frozen=True, slots=True)
class ConsoleOptions:
    """virtio-console's keys, checked (the shell listens on `socket`)."""

    socket: str
    cols: int
    rows: int


def console_options(options: Mapping[str, str]) -> ConsoleOptions:
    path = options.get("socket", "")
    if not path:
        raise ConfigError("virtio-console needs socket=PATH (a UNIX socket the server listens on)")
    sizes: list[int] = []
    for key, default in (("cols", 80), ("rows", 25)):
        raw = options.get(key, str(default))
        try:
            value = int(raw, 10)
        except ValueError:
            raise ConfigError(f"virtio-console {key}={raw!r} is not a number") from None
        if not 0 <= value <= 0xFFFF:
            raise ConfigError(f"virtio-console {key}={value} is not 0..65535")
        sizes.append(value)
    return ConsoleOptions(path, sizes[0], sizes[1])


def _build_console(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    if backends.stream is None:
        raise ConfigError("virtio-console: its socket was not opened (no stream given)")
    checked = console_options(options)
    device = VirtioConsole(backends.stream, cols=checked.cols, rows=checked.rows)
    return VirtioPciFunction(device, presentation=presentation, serial=serial)


DEVICE_TYPES: dict[str, DeviceType] = {
    t.name: t
    for t in (
        DeviceType(
            "pci-testdev",
            "PCI test device: IO, 64-bit prefetchable and MSI-X BARs, ROM, doorbell interrupts",
            frozenset(),
            _build_testdev,
        ),
        DeviceType(
            "virtio-blk",
            "virtio block device over a raw image file: path=IMAGE[,readonly=on][,serial=ID]",
            frozenset({"path", "readonly", "serial"}),
            _build_blk,
        ),
        DeviceType(
            "virtio-console",
            "virtio console (one port) on a UNIX socket the server listens on: "
            "socket=PATH[,cols=80][,rows=25]",
            frozenset({"socket", "cols", "rows"}),
            _build_console,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    type: str
    name: str | None = None  # None: TYPE + a per-type counter
    slot: int | None = None
    options: Mapping[str, str] = field(default_factory=dict)


def parse_device_spec(text: str) -> DeviceSpec:
    """Parse `TYPE,key=value,...` (the --device flag)."""
    parts = [p.strip() for p in text.split(",")]
    type_name = parts[0]
    if not type_name:
        raise ConfigError(f"--device {text!r}: missing device type (one of {_types()})")
    dtype = DEVICE_TYPES.get(type_name)
    if dtype is None:
        raise ConfigError(
            f"--device {text!r}: unknown device type {type_name!r}; use one of {_types()}"
        )
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ConfigError(f"--device {text!r}: {part!r} is not key=value")
        if key not in COMMON_KEYS | dtype.keys:
            allowed = ", ".join(sorted(COMMON_KEYS | dtype.keys))
            raise ConfigError(
                f"--device {text!r}: {type_name} has no option {key!r} (it takes {allowed})"
            )
        if key in options:
            raise ConfigError(f"--device {text!r}: {key!r} given twice")
        options[key] = value
    slot: int | None = None
    if "slot" in options:
        raw = options.pop("slot")
        try:
            slot = int(raw, 0)
        except ValueError:
            raise ConfigError(f"--device {text!r}: slot={raw!r} is not a number") from None
        if not 1 <= slot < MAX_SLOTS:
            raise ConfigError(
                f"--device {text!r}: slot {slot} is not 1..{MAX_SLOTS - 1} "
                "(slot 0 is the host bridge's)"
            )
    name = options.pop("name", None)
    if name is not None and not name:
        raise ConfigError(f"--device {text!r}: name= is empty")
    return DeviceSpec(type_name, name, slot, options)


def build_bus(
    specs: Sequence[DeviceSpec],
    presentation: Presentation = Presentation(),
    block_backends: Mapping[int, BlockBackend] | None = None,
    streams: Mapping[int, ByteStream] | None = None,
) -> PciBus:
    """Build bus 0 with every device, presented as the frontend can take them.
    `block_backends` maps a spec's index to the disk the shell opened for it,
    `streams` to a console's host stream."""
    blocks = block_backends or {}
    opened = streams or {}
    bus = PciBus()
    names: list[str] = []
    counters: dict[str, int] = {}
    for spec in specs:
        if spec.name is None:
            number = counters.get(spec.type, 0)
            counters[spec.type] = number + 1
            names.append(f"{spec.type}{number}")
        else:
            names.append(spec.name)
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two devices are named {name!r}; give one a name=...")
    # Devices with a fixed slot first, so automatic slots never take theirs.
    order = sorted(range(len(specs)), key=lambda i: specs[i].slot is None)
    for i in order:
        spec = specs[i]
        dtype = DEVICE_TYPES[spec.type]
        backends = SpecBackends(blocks.get(i), opened.get(i))
        function = dtype.build(spec.options, presentation, 0x5EED_0000 + i, backends)
        function.name = names[i]
        bus.plug(function, spec.slot)
    return bus


def _types() -> str:
    return ", ".join(sorted(DEVICE_TYPES))
