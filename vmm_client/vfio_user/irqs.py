"""Interrupts towards QEMU: vfio-user SET_IRQS eventfds (INTx, MSI, MSI-X, ERR, REQ).

QEMU hands an eventfd per (IRQ index, vector); the bridge writes to it when
the device server raises that interrupt. INTx is a level with auto-mask and
unmask (QEMU's EOI emulation); the others have per-vector mask and pending.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from .protocol import (
    IrqIndex,
)

log = logging.getLogger(__name__)

_EVENTFD_ONE: Final = (1).to_bytes(8, "little")


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def is_eventfd(fd: int) -> bool:
    """Only eventfds may become interrupts: a pipe could block our writes."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def signal_eventfd(fd: int) -> None:
    try:
        os.write(fd, _EVENTFD_ONE)
    except BlockingIOError:
        pass  # the counter is saturated: the interrupt is pending anyway
    except OSError as e:
        log.debug("eventfd %d: %s", fd, e)


class ReceivedFds:
    """The descriptors of one message: handlers take the ones they keep; the rest close."""

    __slots__ = ("fds", "taken")

    def __init__(self, fds: Sequence[int]) -> None:
        self.fds = list(fds)
        self.taken: set[int] = set()

    def __len__(self) -> int:
        return len(self.fds)

    def take(self, i: int) -> int:
        self.taken.add(i)
        return self.fds[i]

    def close_rest(self) -> None:
        close_fds(fd for i, fd in enumerate(self.fds) if i not in self.taken)
        self.taken = set(range(len(self.fds)))


# ---------------------------------------------------------------- interrupts


@dataclass(slots=True)
class _Vector:
    fd: int | None = None
    masked: bool = False
    pending: bool = False


class IrqTable:
    """Eventfds per (IRQ index, vector) with mask and pending state.

    INTx is level-triggered and auto-masked (IRQ_INFO_AUTOMASKED): signalling
    it masks it, and the client's UNMASK (QEMU's EOI emulation) re-signals if
    the line is still asserted. The other indexes are edge-like: a vector
    raised while masked, or while it has no eventfd, is pending and delivered
    when it is unmasked or gets one (QEMU assigns an MSI-X eventfd only when
    the guest unmasks the vector).
    """

    def __init__(self) -> None:
        self._vectors: dict[tuple[int, int], _Vector] = {}
        self.intx_unmask_fd: int | None = None  # a resample eventfd (KVM irqfd route)

    def vector(self, index: int, vector: int) -> _Vector:
        key = (index, vector)
        entry = self._vectors.get(key)
        if entry is None:
            entry = self._vectors[key] = _Vector()
        return entry

    def fds(self) -> list[int]:
        out = [v.fd for v in self._vectors.values() if v.fd is not None]
        if self.intx_unmask_fd is not None:
            out.append(self.intx_unmask_fd)
        return out

    def assigned(self, index: int) -> list[int]:
        return sorted(v for (i, v), e in self._vectors.items() if i == index and e.fd is not None)

    def assign(self, index: int, vector: int, fd: int | None, *, level: bool = False) -> None:
        entry = self.vector(index, vector)
        if entry.fd is not None and entry.fd != fd:
            close_fds([entry.fd])
        entry.fd = fd
        if fd is None:
            return
        if index == IrqIndex.INTX:
            entry.masked = False
            if level:
                self.fire_intx(level=True)
        elif entry.pending and not entry.masked:
            entry.pending = False
            signal_eventfd(fd)

    def disable(self, index: int) -> list[int]:
        """Close every eventfd of the index; returns the vectors that had one."""
        vectors = []
        for (i, v), entry in list(self._vectors.items()):
            if i != index:
                continue
            if entry.fd is not None:
                close_fds([entry.fd])
                vectors.append(v)
            del self._vectors[(i, v)]
        return sorted(vectors)

    def fire(self, index: int, vector: int) -> None:
        """An edge on a non-INTx vector."""
        entry = self.vector(index, vector)
        if entry.fd is None or entry.masked:
            entry.pending = True
        else:
            signal_eventfd(entry.fd)

    def fire_intx(self, *, level: bool) -> None:
        """The INTx line is (still) asserted: signal once, then stay masked until UNMASK."""
        entry = self.vector(IrqIndex.INTX, 0)
        if level and entry.fd is not None and not entry.masked:
            entry.masked = True
            signal_eventfd(entry.fd)

    def mask(self, index: int, vector: int) -> None:
        self.vector(index, vector).masked = True

    def unmask(self, index: int, vector: int, *, level: bool = False) -> None:
        entry = self.vector(index, vector)
        entry.masked = False
        if index == IrqIndex.INTX:
            self.fire_intx(level=level)
        elif entry.pending and entry.fd is not None:
            entry.pending = False
            signal_eventfd(entry.fd)

    def close(self) -> None:
        close_fds(self.fds())
        self._vectors.clear()
        self.intx_unmask_fd = None


# ---------------------------------------------------------------- DMA windows
