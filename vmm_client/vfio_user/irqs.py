"""Interrupts towards QEMU: vfio-user SET_IRQS eventfds (INTx, MSI, MSI-X, ERR, REQ).

QEMU hands an eventfd per (IRQ index, vector) with DEVICE_SET_IRQS; the
bridge writes to it when the device server raises that interrupt. INTx is a
level with auto-mask and unmask (QEMU's EOI emulation); the others have
per-vector mask and pending. `IrqTable` is the eventfd state,
`DeviceInterrupts` one connection's SET_IRQS handling and event delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from dataclasses import dataclass
from typing import Final

from .device import Device
from .fd_passing import ReceivedFds, close_fds
from .link import ServerLink
from .msix_mirror import MsixMirror
from .protocol import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IrqIndex,
    IrqSet,
    ProtocolError,
)

log = logging.getLogger(__name__)

_EVENTFD_ONE: Final = (1).to_bytes(8, "little")
_PCI_STATUS: Final = 0x06


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


class DeviceInterrupts:
    """One connection's interrupts: DEVICE_SET_IRQS, the server's events, INTx EOI."""

    def __init__(self, device: Device, link: ServerLink, *, mirror_msix_mask: bool = True) -> None:
        self.device = device
        self.link = link
        self.table = IrqTable()
        self.msix = MsixMirror(device, link, enabled=mirror_msix_mask)
        self._tasks: set[asyncio.Task[None]] = set()

    async def set_irqs(self, request: IrqSet, fds: ReceivedFds) -> None:
        """Carry out one DEVICE_SET_IRQS; ProtocolError for what the device lacks."""
        info = self.device.layout.irq(request.index)
        index = request.index
        if len(fds) and request.data_type != IRQ_SET_DATA_EVENTFD:
            raise ProtocolError("DEVICE_SET_IRQS carries descriptors without DATA_EVENTFD")
        if request.disables_all:
            if request.action == IRQ_SET_ACTION_TRIGGER:
                vectors = self.table.disable(index)
                if index == IrqIndex.INTX:
                    self._set_intx_unmask_fd(None)
                if index == IrqIndex.MSIX:
                    await self.msix.mirror(vectors, masked=True)
            return
        if request.start + request.count > info.count:
            raise ProtocolError(
                f"vectors {request.start}..{request.start + request.count - 1} of IRQ index "
                f"{index} do not exist (it has {info.count})"
            )
        if request.data_type == IRQ_SET_DATA_EVENTFD:
            await self._set_eventfds(request, fds)
            return
        # DATA_NONE or DATA_BOOL: act on the selected vectors now.
        for vector in request.selected():
            if request.action == IRQ_SET_ACTION_TRIGGER:
                if index == IrqIndex.INTX:
                    self.table.fire_intx(level=True)
                else:
                    self.table.fire(index, vector)
            elif request.action == IRQ_SET_ACTION_MASK:
                self.table.mask(index, vector)
            elif request.action == IRQ_SET_ACTION_UNMASK:
                if index == IrqIndex.INTX:
                    await self.unmask_intx()
                else:
                    self.table.unmask(index, vector)

    async def _set_eventfds(self, request: IrqSet, fds: ReceivedFds) -> None:
        index = request.index
        if len(fds) not in (0, request.count):
            raise ProtocolError(
                f"DEVICE_SET_IRQS for {request.count} vectors carries {len(fds)} eventfds"
            )
        if not all(is_eventfd(fd) for fd in fds.fds):
            raise ProtocolError("DEVICE_SET_IRQS descriptors must be eventfds")
        if request.action == IRQ_SET_ACTION_TRIGGER:
            assigned: list[int] = []
            removed: list[int] = []
            for i in range(request.count):
                vector = request.start + i
                fd = fds.take(i) if len(fds) else None
                self.table.assign(index, vector, fd, level=self.device.intx_level)
                (assigned if fd is not None else removed).append(vector)
            if index == IrqIndex.MSIX:
                await self.msix.mirror(removed, masked=True)
                await self.msix.mirror(assigned, masked=False)
        elif request.action == IRQ_SET_ACTION_UNMASK and index == IrqIndex.INTX:
            # An eventfd the client signals to unmask: KVM's resample fd.
            self._set_intx_unmask_fd(fds.take(0) if len(fds) else None)
        else:
            raise ProtocolError(
                f"DATA_EVENTFD with action {request.action:#x} on IRQ index {index} "
                "is not supported",
                errno.ENOTTY,
            )

    async def unmask_intx(self) -> None:
        """The client's EOI: re-signal if the line is still asserted.

        The guest's handler usually acknowledged the device with a posted write
        just before; the line's level we hold may predate it. A read round trip
        orders after every posted write, and the events a write caused arrive
        before that read's reply, so after it our level is the device's.
        """
        if self.device.intx_level:
            await self.link.config_read(self.device.info, [(_PCI_STATUS, 2)])
        self.table.unmask(IrqIndex.INTX, 0, level=self.device.intx_level)

    def _set_intx_unmask_fd(self, fd: int | None) -> None:
        old = self.table.intx_unmask_fd
        if old is not None:
            asyncio.get_running_loop().remove_reader(old)
            close_fds([old])
        self.table.intx_unmask_fd = fd
        if fd is not None:
            asyncio.get_running_loop().add_reader(fd, self._on_intx_unmask_fd)

    def _on_intx_unmask_fd(self) -> None:
        fd = self.table.intx_unmask_fd
        if fd is None:
            return
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return
        except OSError as e:
            log.debug("INTx unmask eventfd: %s", e)
            return
        task = asyncio.create_task(self.unmask_intx(), name=f"{self.device.name} INTx unmask")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def after_reset(self) -> None:
        """The reset masked every vector of the server's MSI-X table; vectors QEMU
        still has eventfds for must stay deliverable."""
        await self.msix.mirror(self.table.assigned(IrqIndex.MSIX), masked=False)

    def on_intx(self, asserted: bool) -> None:
        if asserted:
            self.table.fire_intx(level=True)

    def on_msi(self, vector: int) -> None:
        if 0 <= vector < self.device.layout.irqs[IrqIndex.MSIX].count:
            self.table.fire(IrqIndex.MSIX, vector)

    def close(self) -> None:
        """Close every eventfd the client gave us."""
        for task in self._tasks:
            task.cancel()
        if self.table.intx_unmask_fd is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self.table.intx_unmask_fd)
        self.table.close()
