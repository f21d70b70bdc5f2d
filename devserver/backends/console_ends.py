"""Open every virtio-console port's host end at server start (virtio 1.2 §5.3):
a UNIX socket (console_socket.py), a pty (console_pty.py) or the server's stdio
(console_stdio.py), as config.py's ConsoleOptions say. A bad one (a path that
is not a socket, stdio taken twice) is a ConfigError now, with everything opened
so far closed again, rather than at attach.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..config import ConsolePortOption, DeviceSpec, console_options
from ..errors import ConfigError
from .console_pty import PtyConsole
from .console_socket import SocketConsole
from .console_stdio import StdioConsole

HostEnd = SocketConsole | PtyConsole | StdioConsole


@dataclass(slots=True)
class ConsoleEnds:
    """One virtio-console spec's host ends: port 0's and the named ports'."""

    console: HostEnd
    ports: list[tuple[str, HostEnd]] = field(default_factory=list)

    def all(self) -> Iterator[HostEnd]:
        yield self.console
        for _, end in self.ports:
            yield end

    def pty_paths(self) -> dict[str, str]:
        """Port name ("" for port 0) → the pty's path, for the ports on a pty."""
        out = {"": self.console.path} if isinstance(self.console, PtyConsole) else {}
        out.update((name, end.path) for name, end in self.ports if isinstance(end, PtyConsole))
        return out


def _open(option: ConsolePortOption, cols: int, rows: int, label: str) -> HostEnd:
    if option.kind == "socket":
        return SocketConsole(option.path)
    if option.kind == "pty":
        return PtyConsole(cols=cols, rows=rows, link=option.path, label=label)
    return StdioConsole()


def open_console_ends(specs: Sequence[DeviceSpec]) -> dict[int, ConsoleEnds]:
    """Every virtio-console spec's host ends, by spec index."""
    opened: dict[int, ConsoleEnds] = {}
    stdio_taken = False
    unnamed = 0
    try:
        for i, spec in enumerate(specs):
            if spec.type != "virtio-console":
                continue
            checked = console_options(spec.options)
            # The device's name as build_bus gives it (logged with a pty's path).
            label = spec.name or f"virtio-console{unnamed}"
            unnamed += spec.name is None
            ends: list[HostEnd] = []
            try:
                for option in checked.ends():
                    if option.kind == "stdio":
                        if stdio_taken:
                            raise ConfigError(
                                "only one virtio-console port can take the server's stdio"
                            )
                        stdio_taken = True
                    port_label = f"{label} port {option.name}" if option.name else label
                    ends.append(_open(option, checked.cols, checked.rows, port_label))
            except BaseException:
                for end in ends:
                    end.close()
                raise
            opened[i] = ConsoleEnds(
                ends[0], [(p.name, end) for p, end in zip(checked.ports, ends[1:], strict=True)]
            )
    except BaseException:
        for console in opened.values():
            for end in console.all():
                end.close()
        raise
    return opened
