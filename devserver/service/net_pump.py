"""virtio-net taps, served on the event loop (virtio 1.2 §5.1).

Every virtio-net spec's tap (backends/net_tap.py) opens when the server starts
and lives as long as it; each session's net devices are joined to them at
attach. A frame arriving at a tap wakes its device the way a console's host
end does (console_pump.py, whose session bookkeeping this shares: the wake
tasks and their coalescing are per device id): a task per device, under the
device's lock, runs its receive side in a worker thread as if the driver had
kicked receiveq, and the servicer sends the interrupts it raised.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..backends.net_tap import TapPort
from ..config import DeviceSpec, net_options
from ..devices.net import RECEIVEQ, VirtioNet
from ..errors import ConfigError
from ..ports import PacketPort
from ..virtio.pci_transport import VirtioPciFunction
from .console_pump import ConsoleSession, Deliver, wake_receiveq


def open_taps(specs: Sequence[DeviceSpec]) -> dict[int, TapPort]:
    """Every virtio-net spec's tap, by spec index; a bad one is a ConfigError
    now (with every tap opened so far closed again), not at attach."""
    opened: dict[int, TapPort] = {}
    try:
        for i, spec in enumerate(specs):
            if spec.type != "virtio-net":
                continue
            checked = net_options(spec.options)
            if any(tap.name == checked.tap for tap in opened.values()):
                raise ConfigError(f"virtio-net: two devices on tap={checked.tap}")
            opened[i] = TapPort(checked.tap)
    except BaseException:
        for tap in opened.values():
            tap.close()
        raise
    return opened


class NetPump:
    """The taps of one server, and their wakes per session."""

    def __init__(self, specs: Sequence[DeviceSpec]) -> None:
        self.taps: dict[int, TapPort] = open_taps(specs)

    @property
    def ports(self) -> dict[int, PacketPort]:
        """Each spec's tap, for build_bus."""
        return dict(self.taps)

    async def start(self) -> None:
        for tap in self.taps.values():
            await tap.start()

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        taps, self.taps = list(self.taps.values()), {}
        for tap in taps:
            tap.close()

    # -- sessions

    def wire(self, session: ConsoleSession, deliver: Deliver) -> None:
        """Wake `session`'s net devices when their taps have frames."""
        for function, device in _nets_of(session):
            port = device.port
            if isinstance(port, TapPort):
                port.on_readable = functools.partial(
                    wake_receiveq, session, function, deliver, RECEIVEQ, "tap"
                )

    def unwire(self, session: ConsoleSession) -> None:
        for _, device in _nets_of(session):
            port = device.port
            if isinstance(port, TapPort):
                port.on_readable = None


def _nets_of(session: ConsoleSession) -> list[tuple[VirtioPciFunction, VirtioNet]]:
    return [(f, f.device) for f in session.virtio_functions() if isinstance(f.device, VirtioNet)]
