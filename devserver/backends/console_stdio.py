"""A virtio-console port's host end on the server's own stdin and stdout (QEMU's
`-chardev stdio`; virtio 1.2 §5.3 Console Device). One port of one device at
most may take it (config.py checks).

When stdin is a terminal it goes to raw mode for the server's life (keys reach
the guest as typed, no local echo) but keeps ISIG, so Ctrl-C still stops the
server; the terminal's settings and the descriptors' blocking flags come back
at close. Its size is the console size (polled; console_fd.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
from typing import Any

from .console_fd import FdConsole

STDIN = 0
STDOUT = 1


class StdioConsole(FdConsole):
    kind = "stdio"

    def __init__(self, stdin: int = STDIN, stdout: int = STDOUT) -> None:
        self._in = stdin
        self._out = stdout
        self._saved_tty: list[Any] | None = None  # termios.tcgetattr's own type
        self._saved_blocking: dict[int, bool] = {}
        size_fd = next((fd for fd in (stdout, stdin) if os.isatty(fd)), None)
        super().__init__(stdin, stdout, size_fd)

    async def start(self) -> None:
        for fd in dict.fromkeys((self._in, self._out)):  # once each (may be one fd)
            with contextlib.suppress(OSError):
                self._saved_blocking[fd] = os.get_blocking(fd)
                os.set_blocking(fd, False)
        if os.isatty(self._in):
            with contextlib.suppress(termios.error):
                attrs = termios.tcgetattr(self._in)
                self._saved_tty = list(attrs)
                raw = list(attrs)
                raw[0] &= ~(termios.ICRNL | termios.IXON | termios.INLCR | termios.IGNCR)
                raw[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)
                termios.tcsetattr(self._in, termios.TCSANOW, raw)
        sys.stdout.flush()
        await super().start()

    def close(self) -> None:
        saved, self._saved_tty = self._saved_tty, None
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._in, termios.TCSADRAIN, saved)
        blocking, self._saved_blocking = self._saved_blocking, {}
        for fd, was in blocking.items():
            with contextlib.suppress(OSError):
                os.set_blocking(fd, was)
