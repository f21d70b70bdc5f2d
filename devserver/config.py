"""Device specs from the command line: `TYPE,key=value,...`.

Parsing is strict and its errors name the fix, because a typo in a device
spec is the most common way to start the server wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .devices.balloon import VirtioBalloon
from .devices.blk import MAX_QUEUES as BLK_MAX_QUEUES
from .devices.blk import VirtioBlk
from .devices.console import ConsoleHostEnd, VirtioConsole
from .devices.framebuffer import DEFAULT_VRAM_MIB, BochsDisplay, vram_size_from_mib
from .devices.net import DEFAULT_MTU, VirtioNet, default_mac, parse_mac
from .devices.p9 import Virtio9p
from .devices.scsi import MAX_DISKS as SCSI_MAX_DISKS
from .devices.scsi import VirtioScsi
from .devices.testdev import PciTestDevice
from .errors import ConfigError
from .pci.bus import MAX_SLOTS, PciBus
from .pci.function import PciFunction, Presentation
from .ports import BlockBackend, P9Export, PacketPort, SharedFramebuffer
from .virtio.pci_transport import VirtioPciFunction

# Keys every device takes; device-specific keys are listed per type.
COMMON_KEYS = frozenset({"slot", "name"})
REPEAT_SEP = "\n"


@dataclass(frozen=True, slots=True)
class SpecBackends:
    """What the shell opened for one spec: a disk image, a console's stream."""

    block: BlockBackend | None = None
    stream: ConsoleHostEnd | None = None
    framebuffer: SharedFramebuffer | None = None
    console_ports: tuple[tuple[str, ConsoleHostEnd], ...] = ()  # named ports, in order
    packet_port: PacketPort | None = None  # a virtio-net's tap
    disks: tuple[BlockBackend, ...] = ()  # a virtio-scsi's disk images, in order
    p9_export: P9Export | None = None  # a virtio-9p's directory


@dataclass(frozen=True, slots=True)
class DeviceType:
    name: str
    summary: str
    keys: frozenset[str]
    build: Callable[[Mapping[str, str], Presentation, int, SpecBackends], PciFunction]
    # Keys that may be given more than once: their values, in order, are joined
    # by REPEAT_SEP in the options mapping (a virtio-console's port=).
    repeatable: frozenset[str] = frozenset()


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
    discard: bool = True  # offer DISCARD and unmapping WRITE_ZEROES (QEMU's discard=)
    num_queues: int = 1  # request queues (VIRTIO_BLK_F_MQ when more than one)
    # QEMU's cache=: writeback (host page cache), none (O_DIRECT), directsync
    # (O_DIRECT|O_DSYNC, every write durable: the guest is offered no FLUSH).
    cache: str = "writeback"


# virtio-blk cache= modes (QEMU's names and meanings; file_block.py opens them).
CACHE_MODES = ("writeback", "none", "directsync")


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
    discard = options.get("discard", "on")
    if discard not in ("on", "off"):
        raise ConfigError(f"virtio-blk discard={discard!r}: use discard=on or discard=off")
    raw = options.get("num-queues", "1")
    try:
        num_queues = int(raw, 10)
    except ValueError:
        raise ConfigError(f"virtio-blk num-queues={raw!r} is not a number") from None
    if not 1 <= num_queues <= BLK_MAX_QUEUES:
        raise ConfigError(f"virtio-blk num-queues={num_queues} is not 1..{BLK_MAX_QUEUES}")
    cache = options.get("cache", "writeback")
    if cache not in CACHE_MODES:
        raise ConfigError(f"virtio-blk cache={cache!r}: use one of {', '.join(CACHE_MODES)}")
    return BlockOptions(path, readonly == "on", serial, discard == "on", num_queues, cache)


def _build_blk(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    backend = backends.block
    if backend is None:
        raise ConfigError("virtio-blk: the disk image was not opened (no backend given)")
    checked = block_options(options)
    device = VirtioBlk(
        backend,
        serial=checked.serial,
        discard=checked.discard,
        num_queues=checked.num_queues,
        write_cache=checked.cache != "directsync",
    )
    return VirtioPciFunction(device, presentation=presentation, serial=serial)


CONSOLE_CHARDEVS = ("socket", "pty", "stdio")


@dataclass(frozen=True, slots=True)
class ConsolePortOption:
    """One named port (`port=NAME:socket:PATH`, `NAME:pty[:LINK]`, `NAME:stdio`)."""

    name: str
    kind: str  # one of CONSOLE_CHARDEVS
    path: str = ""  # socket: its path; pty: a symlink to make ("" none)


@dataclass(frozen=True, slots=True)
class ConsoleOptions:
    """virtio-console's keys, checked (the shell opens the host ends).

    Port 0 (hvc0) is `chardev=socket:PATH|pty|stdio` (`socket=PATH` is the same
    as `chardev=socket:PATH`; `pty-link=PATH` names a symlink to the pty);
    every `port=` adds a named port (multiport, virtio-serial)."""

    socket: str  # port 0's socket path ("" when it is no socket)
    cols: int
    rows: int
    kind: str = "socket"  # port 0's host end, one of CONSOLE_CHARDEVS
    pty_link: str = ""
    ports: tuple[ConsolePortOption, ...] = ()

    def ends(self) -> list[ConsolePortOption]:
        """Every port's host end, port 0 first (named "")."""
        path = self.socket if self.kind == "socket" else self.pty_link
        return [ConsolePortOption("", self.kind, path), *self.ports]


def _console_chardev(text: str, what: str) -> tuple[str, str]:
    kind, _, rest = text.partition(":")
    if kind == "socket" and rest:
        return kind, rest
    if kind == "pty":
        return kind, rest
    if kind == "stdio" and not rest:
        return kind, ""
    raise ConfigError(
        f"virtio-console {what}{text!r}: use socket:PATH, pty (pty:LINK for a port) or stdio"
    )


def console_options(options: Mapping[str, str]) -> ConsoleOptions:
    path = options.get("socket", "")
    chardev = options.get("chardev", "")
    if path and chardev:
        raise ConfigError("virtio-console: give socket=PATH or chardev=..., not both")
    if not path and not chardev:
        raise ConfigError(
            "virtio-console needs chardev=socket:PATH|pty|stdio "
            "(or socket=PATH, a UNIX socket the server listens on)"
        )
    kind = "socket"
    if chardev:
        kind, path = _console_chardev(chardev, "chardev=")
        if kind == "pty" and path:
            raise ConfigError("virtio-console chardev=pty takes its symlink as pty-link=PATH")
    pty_link = options.get("pty-link", "")
    if pty_link and kind != "pty":
        raise ConfigError("virtio-console pty-link= needs chardev=pty")
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
    ports: list[ConsolePortOption] = []
    raw_ports = options.get("port", "")
    for item in raw_ports.split(REPEAT_SEP) if raw_ports else []:
        name, sep, rest = item.partition(":")
        if not sep or not name:
            raise ConfigError(
                f"virtio-console port={item!r}: use port=NAME:socket:PATH, NAME:pty or NAME:stdio"
            )
        if any(p.name == name for p in ports):
            raise ConfigError(f"virtio-console has two ports named {name!r}")
        port_kind, port_path = _console_chardev(rest, f"port={name}:")
        ports.append(ConsolePortOption(name, port_kind, port_path))
    checked = ConsoleOptions(
        path if kind == "socket" else "", sizes[0], sizes[1], kind, pty_link, tuple(ports)
    )
    if [e.kind for e in checked.ends()].count("stdio") > 1:
        raise ConfigError("virtio-console: only one port can take the server's stdio")
    sockets = [e.path for e in checked.ends() if e.kind == "socket"]
    if len(set(sockets)) != len(sockets):
        raise ConfigError("virtio-console: two ports on the same socket path")
    return checked


def _build_console(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    if backends.stream is None:
        raise ConfigError(
            "virtio-console: its socket was not opened (no host end given: socket, pty or stdio)"
        )
    checked = console_options(options)
    if len(backends.console_ports) != len(checked.ports):
        raise ConfigError("virtio-console: its named ports' host ends were not opened")
    device = VirtioConsole(
        backends.stream, cols=checked.cols, rows=checked.rows, ports=backends.console_ports
    )
    return VirtioPciFunction(device, presentation=presentation, serial=serial)


@dataclass(frozen=True, slots=True)
class FramebufferOptions:
    """vesa-fb's keys, checked (the shell creates `vram_size` bytes of shared memory)."""

    vram_size: int
    edid: bool


def framebuffer_options(options: Mapping[str, str]) -> FramebufferOptions:
    vram = vram_size_from_mib(options.get("vram", str(DEFAULT_VRAM_MIB)))
    edid = options.get("edid", "on")
    if edid not in ("on", "off"):
        raise ConfigError(f"vesa-fb edid={edid!r}: use edid=on or edid=off")
    return FramebufferOptions(vram, edid == "on")


def _build_framebuffer(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    if backends.framebuffer is None:
        raise ConfigError("vesa-fb: its shared memory was not created (no framebuffer given)")
    checked = framebuffer_options(options)
    return BochsDisplay(backends.framebuffer, presentation, serial, edid=checked.edid)


@dataclass(frozen=True, slots=True)
class NetOptions:
    """virtio-net's keys, checked (the shell opens the tap `tap`)."""

    tap: str
    mac: bytes | None  # None: derived from the device's number
    mtu: int = DEFAULT_MTU


def net_options(options: Mapping[str, str]) -> NetOptions:
    tap = options.get("tap", "")
    if not tap:
        raise ConfigError("virtio-net needs tap=NAME (a tap interface the server opens)")
    raw_mac = options.get("mac")
    mac = parse_mac(raw_mac) if raw_mac is not None else None
    raw = options.get("mtu", str(DEFAULT_MTU))
    try:
        mtu = int(raw, 10)
    except ValueError:
        raise ConfigError(f"virtio-net mtu={raw!r} is not a number") from None
    return NetOptions(tap, mac, mtu)


def _build_net(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    if backends.packet_port is None:
        raise ConfigError("virtio-net: its tap was not opened (no packet port given)")
    checked = net_options(options)
    mac = checked.mac if checked.mac is not None else default_mac(serial & 0xFFFF)
    device = VirtioNet(backends.packet_port, mac=mac, mtu=checked.mtu)
    return VirtioPciFunction(device, presentation=presentation, serial=serial)


def _build_balloon(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    return VirtioPciFunction(VirtioBalloon(), presentation=presentation, serial=serial)


@dataclass(frozen=True, slots=True)
class ScsiOptions:
    """virtio-scsi's keys, checked (the shell opens every `disks` image)."""

    disks: tuple[str, ...]  # image paths: disk N is target N, LUN 0
    readonly: bool


def scsi_options(options: Mapping[str, str]) -> ScsiOptions:
    raw = options.get("disk", "")
    disks = tuple(raw.split(REPEAT_SEP)) if raw else ()
    if not disks or not all(disks):
        raise ConfigError("virtio-scsi needs disk=IMAGE (a raw disk image), once per disk")
    if len(disks) > SCSI_MAX_DISKS:
        raise ConfigError(f"virtio-scsi takes at most {SCSI_MAX_DISKS} disks")
    readonly = options.get("readonly", "off")
    if readonly not in ("on", "off"):
        raise ConfigError(f"virtio-scsi readonly={readonly!r}: use readonly=on or readonly=off")
    return ScsiOptions(disks, readonly == "on")


def _build_scsi(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    checked = scsi_options(options)
    if len(backends.disks) != len(checked.disks):
        raise ConfigError("virtio-scsi: its disk images were not opened (no backends given)")
    # Unit serial numbers (VPD 0x80) unique per device and disk: Linux's by-id names.
    serials = [f"DM{serial & 0xFFFFFFFF:08X}T{n}" for n in range(len(checked.disks))]
    device = VirtioScsi(backends.disks, serials=serials)
    return VirtioPciFunction(device, presentation=presentation, serial=serial)


@dataclass(frozen=True, slots=True)
class P9Options:
    """virtio-9p's keys, checked (the shell opens the directory `path`)."""

    path: str
    tag: str
    readonly: bool


def p9_options(options: Mapping[str, str]) -> P9Options:
    path = options.get("path", "")
    if not path:
        raise ConfigError("virtio-9p needs path=DIR (the host directory to export)")
    tag = options.get("tag", "")
    if not tag:
        raise ConfigError("virtio-9p needs tag=TAG (the guest mounts it: mount -t 9p TAG DIR)")
    readonly = options.get("readonly", "off")
    if readonly not in ("on", "off"):
        raise ConfigError(f"virtio-9p readonly={readonly!r}: use readonly=on or readonly=off")
    return P9Options(path, tag, readonly == "on")


def _build_p9(
    options: Mapping[str, str],
    presentation: Presentation,
    serial: int,
    backends: SpecBackends,
) -> PciFunction:
    checked = p9_options(options)
    if backends.p9_export is None:
        raise ConfigError("virtio-9p: its directory was not opened (no export given)")
    device = Virtio9p(backends.p9_export, tag=checked.tag)
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
            "virtio block device over a raw image file: path=IMAGE[,readonly=on][,serial=ID]"
            f"[,discard=on|off][,num-queues=1..{BLK_MAX_QUEUES}]"
            "[,cache=writeback|none|directsync]",
            frozenset({"path", "readonly", "serial", "discard", "num-queues", "cache"}),
            _build_blk,
        ),
        DeviceType(
            "virtio-console",
            "virtio console: hvc0 on chardev=socket:PATH|pty|stdio (or socket=PATH)"
            "[,pty-link=PATH][,cols=80][,rows=25], and named ports (virtio-serial) "
            "[,port=NAME:socket:PATH|NAME:pty[:LINK]|NAME:stdio]...",
            frozenset({"socket", "chardev", "pty-link", "cols", "rows", "port"}),
            _build_console,
            repeatable=frozenset({"port"}),
        ),
        DeviceType(
            "vesa-fb",
            "VESA framebuffer (QEMU bochs-display compatible; Linux's bochs driver) with "
            "shared-memory VRAM: [vram=MiB (power of two, default 16)][,edid=on|off]",
            frozenset({"vram", "edid"}),
            _build_framebuffer,
        ),
        DeviceType(
            "virtio-net",
            "virtio network device on a tap interface: tap=NAME"
            "[,mac=52:54:00:xx:xx:xx (default from the device number)][,mtu=1500]",
            frozenset({"tap", "mac", "mtu"}),
            _build_net,
        ),
        DeviceType(
            "virtio-balloon",
            "virtio memory balloon (stats queue, deflate on OOM); its target is set "
            "with the Balloon RPC (python -m devserver.service.balloon ADDR ID --target MiB)",
            frozenset(),
            _build_balloon,
        ),
        DeviceType(
            "virtio-scsi",
            "virtio SCSI host with disks on raw image files (disk N is target N, LUN 0; "
            "UNMAP on writable ones): disk=IMAGE[,disk=IMAGE2...][,readonly=on]",
            frozenset({"disk", "readonly"}),
            _build_scsi,
            repeatable=frozenset({"disk"}),
        ),
        DeviceType(
            "virtio-9p",
            "virtio 9P (9P2000.L) export of a host directory: path=DIR,tag=TAG[,readonly=on] "
            "(in the guest: mount -t 9p -o trans=virtio,version=9p2000.L TAG /mnt)",
            frozenset({"path", "tag", "readonly"}),
            _build_p9,
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
        if key in options and key in dtype.repeatable and REPEAT_SEP not in value:
            options[key] += REPEAT_SEP + value
            continue
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
    streams: Mapping[int, ConsoleHostEnd] | None = None,
    framebuffers: Mapping[int, SharedFramebuffer] | None = None,
    console_ports: Mapping[int, Sequence[tuple[str, ConsoleHostEnd]]] | None = None,
    packet_ports: Mapping[int, PacketPort] | None = None,
    scsi_disks: Mapping[int, Sequence[BlockBackend]] | None = None,
    p9_exports: Mapping[int, P9Export] | None = None,
) -> PciBus:
    """Build bus 0 with every device, presented as the frontend can take them.
    `block_backends` maps a spec's index to the disk the shell opened for it,
    `streams` to a console's host stream, `framebuffers` to a vesa-fb's VRAM."""
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
        backends = SpecBackends(
            blocks.get(i),
            opened.get(i),
            (framebuffers or {}).get(i),
            tuple((console_ports or {}).get(i, ())),
            (packet_ports or {}).get(i),
            disks=tuple((scsi_disks or {}).get(i, ())),
            p9_export=(p9_exports or {}).get(i),
        )
        function = dtype.build(spec.options, presentation, 0x5EED_0000 + i, backends)
        function.name = names[i]
        bus.plug(function, spec.slot)
    return bus


def _types() -> str:
    return ", ".join(sorted(DEVICE_TYPES))
