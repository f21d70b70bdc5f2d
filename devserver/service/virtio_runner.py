"""Serving virtio functions (virtio 1.2 §4.1): where each access runs, and the
queue work a kick left over.

Virtio functions run their rings in the session's guest memory: shared RAM,
or in DMA_MESSAGES a MessageGuestMemory whose reads and writes block the
calling thread on a DmaRequest round trip (dma_messages.py; it refuses to from
the event loop). So an access that can run the device (a notify write: queue
work with disk I/O and guest memory; a status write or a function reset: the
device's activate and reset hooks) runs in a worker thread. Everything else
(common configuration, ISR and device-configuration registers, the MSI-X table
and PBA, every read) only moves transport state and is served on the loop: a
thread hop costs more than the access. The function decides from its layout
(`VirtioPciFunction.access_may_block`, `config_access_may_block`).

One asyncio.Lock per device keeps its accesses, its continuations and its
console wakes from ever interleaving on its state (reliability.md C7), wherever
each runs. A kick does bounded work (QUEUE_WEIGHT chains, C8); what remains
runs as a continuation task on the loop, each turn one more bounded step in a
worker thread, its interrupts sent as their own message.
"""

from __future__ import annotations

import asyncio
import logging

from devmodel.v1 import devmodel_pb2 as pb

from ..effects import Effect
from ..pci.function import PciFunction
from ..virtio.pci_transport import VirtioPciFunction
from .emit import emit
from .requests import serve_request
from .session import Session

log = logging.getLogger(__name__)

# True: every write to a virtio function goes through a worker thread, as
# before accesses were sorted (bench/virtio_registers.py measures both ways).
THREAD_EVERY_WRITE = False

_WRITES = ("bar_write", "config_write", "reset_device")


def virtio_target(session: Session, request: pb.Request) -> VirtioPciFunction | None:
    """The virtio function an access goes to, if it goes to one."""
    kind = request.WhichOneof("kind")
    function: PciFunction | None = None
    if kind in ("bar_write", "bar_read", "reset_device"):
        access = getattr(request, kind)
        function = next((f for _, f in session.bus if f.device_id == access.device_id), None)
    elif kind in ("config_read", "config_write"):
        c = getattr(request, kind)
        function = session.bus.at(c.bus, c.device, c.function)
    return function if isinstance(function, VirtioPciFunction) else None


def may_block(function: VirtioPciFunction, request: pb.Request) -> bool:
    """Whether serving `request` can run the device (and so must leave the loop)."""
    kind = request.WhichOneof("kind")
    if THREAD_EVERY_WRITE and kind in _WRITES:
        return True
    if kind == "bar_write":
        return function.access_may_block(request.bar_write.bar, request.bar_write.offset, True)
    if kind == "config_write":
        w = request.config_write
        return function.config_access_may_block(w.offset, w.size, True)
    # A function reset runs the device's reset hook; reads only read.
    return kind == "reset_device"


async def serve_virtio(
    session: Session,
    function: VirtioPciFunction,
    request: pb.Request,
    items: list[pb.ServerItem],
) -> None:
    """One access to a virtio function, under its lock; in a worker thread if it
    may run the device (disk I/O, DMA by message), else right here."""
    async with session.device_lock(function.device_id):
        if may_block(function, request):
            await asyncio.to_thread(serve_request, session, request, items)
        else:
            serve_request(session, request, items)


def continue_work(session: Session, function: VirtioPciFunction) -> None:
    """Schedule (once) the rest of a device's work as bounded steps on the loop."""
    task = session.continuations.get(function.device_id)
    if task is not None and not task.done():
        return
    session.continuations[function.device_id] = asyncio.get_running_loop().create_task(
        _run_pending(session, function)
    )


async def _run_pending(session: Session, function: VirtioPciFunction) -> None:
    lock = session.device_lock(function.device_id)
    try:
        while function.pending_work and not session.closed:
            async with lock:
                if session.closed:
                    return
                effects = await asyncio.to_thread(function.run_pending)
                items: list[pb.ServerItem] = []
                emit(session, effects, items)
            if items and not session.closed:
                await session.write(items)
            await asyncio.sleep(0)  # one bounded step a turn: other streams run between
    except Exception:
        # The stream is gone (or broke); the session's end cleans up.
        log.exception("device %s: continuing its queue work failed", function.name)


async def deliver(session: Session, function: VirtioPciFunction, effects: list[Effect]) -> None:
    """Send what something other than a request (a console's host ends) woke a
    device to do; continue its work."""
    items: list[pb.ServerItem] = []
    emit(session, effects, items)
    if items and not session.closed:
        await session.write(items)
    if function.pending_work and not session.closed:
        continue_work(session, function)
