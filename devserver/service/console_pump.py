"""virtio-console host ends, served on the event loop (virtio 1.2 §5.3).

Every port's host end (a UNIX socket, a pty, the server's stdio:
backends/console_ends.py) opens when the server starts and lives as long as
it; each session's console devices are joined to them at attach. Something
happening at a host end (bytes arrived, a socket client came or went, a
terminal was resized) wakes the device: a task per device, under the device's
lock, runs its receive side in a worker thread (the same path as a driver's kick
of receiveq0, so nothing moves unless the driver is running) and the servicer
sends the interrupts it raised. Wakes coalesce: one task runs at a time per
device and goes round again if another wake came meanwhile.

Bytes a host end refuses (no client, a client that does not read) are counted
per device in the server's counters (`console_bytes_dropped`), across sessions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Protocol

from ..backends.console_ends import ConsoleEnds, HostEnd, open_console_ends
from ..config import DeviceSpec
from ..devices.console import RECEIVEQ, ConsoleHostEnd, VirtioConsole
from ..effects import Effect
from ..pci.bus import PciBus
from ..virtio.pci_transport import VirtioPciFunction
from .stats import ServerCounters

log = logging.getLogger(__name__)

# The servicer's way to send a woken device's effects (and continue its work).
Deliver = Callable[[VirtioPciFunction, list[Effect]], Awaitable[None]]


class ConsoleSession(Protocol):
    """What the pump uses of the servicer's Session."""

    closed: bool
    device_locks: dict[int, asyncio.Lock]
    rx_wakes: dict[int, asyncio.Task[None]]
    rx_again: set[int]

    def virtio_functions(self) -> list[VirtioPciFunction]: ...


class ConsolePump:
    """The console host ends of one server, and their wakes per session."""

    def __init__(self, specs: Sequence[DeviceSpec], counters: ServerCounters) -> None:
        self.counters = counters
        self.ends: dict[int, ConsoleEnds] = open_console_ends(specs)

    # -- for build_bus

    @property
    def streams(self) -> dict[int, ConsoleHostEnd]:
        """Port 0's host end, by spec index."""
        return {i: ends.console for i, ends in self.ends.items()}

    @property
    def ports(self) -> dict[int, list[tuple[str, ConsoleHostEnd]]]:
        """The named ports' host ends, by spec index."""
        return {i: list(ends.ports) for i, ends in self.ends.items()}

    def _all(self) -> Iterator[HostEnd]:
        for ends in self.ends.values():
            yield from ends.all()

    # -- server lifetime

    def count_drops(self, bus: PciBus) -> None:
        """Count each host end's refused bytes against its device (device ids
        are the same on every session's bus: the specs decide them)."""
        for function, device in _consoles(bus):
            sink = functools.partial(_add_dropped, self.counters, function.device_id)
            for port in device.ports:
                end = port.stream
                if isinstance(end, HostEnd):
                    end.drop_sink = sink

    async def start(self) -> None:
        for end in self._all():
            await end.start()

    async def aclose(self) -> None:
        ends, self.ends = list(self._all()), {}
        for end in ends:
            await end.aclose()

    def close(self) -> None:
        ends, self.ends = list(self._all()), {}
        for end in ends:
            end.close()

    def pty_paths(self, bus: PciBus) -> dict[int, dict[str, str]]:
        """device id → port name ("" port 0) → pty path, for ports on a pty."""
        out: dict[int, dict[str, str]] = {}
        for function, device in _consoles(bus):
            for ends in self.ends.values():
                if ends.console is device.stream and ends.pty_paths():
                    out[function.device_id] = ends.pty_paths()
        return out

    # -- sessions

    def wire(self, session: ConsoleSession, deliver: Deliver) -> None:
        """Wake `session`'s console devices when their host ends have news."""
        for function, device in _consoles_of(session):
            wake = functools.partial(
                wake_receiveq, session, function, deliver, RECEIVEQ, "console host ends"
            )
            for port in device.ports:
                end = port.stream
                if isinstance(end, HostEnd):
                    end.on_readable = end.on_resize = wake

    def unwire(self, session: ConsoleSession) -> None:
        for _, device in _consoles_of(session):
            for port in device.ports:
                end = port.stream
                if isinstance(end, HostEnd):
                    end.on_readable = end.on_resize = None


def wake_receiveq(
    session: ConsoleSession,
    function: VirtioPciFunction,
    deliver: Deliver,
    queue: int,
    what: str,
) -> None:
    """A host end has something for `function`: run its receive side soon.

    Wakes coalesce: one task per device, which goes round again while wakes
    arrived during its step (virtio-console's host ends, virtio-net's tap)."""
    if session.closed:
        return
    session.rx_again.add(function.device_id)
    task = session.rx_wakes.get(function.device_id)
    if task is not None and not task.done():
        return
    session.rx_wakes[function.device_id] = asyncio.get_running_loop().create_task(
        _drain(session, function, deliver, queue, what)
    )


async def _drain(
    session: ConsoleSession,
    function: VirtioPciFunction,
    deliver: Deliver,
    queue: int,
    what: str,
) -> None:
    lock = session.device_locks.setdefault(function.device_id, asyncio.Lock())
    try:
        while function.device_id in session.rx_again and not session.closed:
            session.rx_again.discard(function.device_id)
            async with lock:
                if session.closed:
                    return
                effects = await asyncio.to_thread(host_step, function, queue)
            if not session.closed:
                await deliver(function, effects)
            await asyncio.sleep(0)
    except Exception:
        log.exception("device %s: serving its %s failed", function.name, what)


def host_step(function: VirtioPciFunction, queue: int) -> list[Effect]:
    """The device takes what its host end has as if its driver kicked the
    receive queue (nothing moves unless the driver is running); returns the
    effects (interrupts)."""
    function.kick(queue)
    return function.take_effects()


def _add_dropped(counters: ServerCounters, device_id: int, n: int) -> None:
    counters.devices[device_id].console_bytes_dropped += n


def _consoles(bus: PciBus) -> list[tuple[VirtioPciFunction, VirtioConsole]]:
    return [
        (f, f.device)
        for _, f in bus
        if isinstance(f, VirtioPciFunction) and isinstance(f.device, VirtioConsole)
    ]


def _consoles_of(session: ConsoleSession) -> list[tuple[VirtioPciFunction, VirtioConsole]]:
    return [
        (f, f.device) for f in session.virtio_functions() if isinstance(f.device, VirtioConsole)
    ]
