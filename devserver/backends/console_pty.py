"""A virtio-console port's host end on a pseudo-terminal (QEMU's `-chardev pty`;
virtio 1.2 §5.3 Console Device).

The server opens a pty pair at start and logs the slave's path; `pty-link=PATH`
also makes PATH a symlink to it (replaced on each start, removed at stop), so a
user's `screen PATH` or `picocom PATH` needs no log reading. The server keeps
the slave open itself, in raw mode: the master then never reads EIO between
users, and a user who opens the slave gets the bytes unchanged. The pty starts
at the configured cols x rows; a user's terminal resizing it is seen by the
size poll (console_fd.py) and reaches the guest as a console size change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tty

from ..errors import ConfigError
from .console_fd import FdConsole, set_terminal_size

log = logging.getLogger(__name__)


class PtyConsole(FdConsole):
    kind = "pty"

    def __init__(self, *, cols: int, rows: int, link: str = "", label: str = "") -> None:
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            if cols and rows:
                set_terminal_size(master, cols, rows)
            path = os.ttyname(slave)
            if link:
                _make_link(link, path)
            os.set_blocking(master, False)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self.master = master
        self.slave = slave
        self.path = path
        self.link = link
        super().__init__(master, master, master)
        log.info(
            "virtio-console %s: pty %s%s", label or "port", path, f" (link {link})" if link else ""
        )

    def close(self) -> None:
        fds, self.master, self.slave = (self.master, self.slave), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if self.link:
            with contextlib.suppress(OSError):
                if os.path.islink(self.link) and os.readlink(self.link) == self.path:
                    os.unlink(self.link)

    async def aclose(self) -> None:
        self._stop()
        self.close()


def _make_link(link: str, target: str) -> None:
    if os.path.lexists(link) and not os.path.islink(link):
        raise ConfigError(f"virtio-console pty-link={link!r} exists and is not a symlink")
    tmp = f"{link}.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"cannot make virtio-console pty-link={link!r}: {e}") from None
