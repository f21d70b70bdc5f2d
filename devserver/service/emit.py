"""Effects out to the stream: events, with DMA carried out on the way.

`emit` turns what the core returned into ServerItems in order. A
DmaRequested effect (the test device's DMA engine) is carried out here, by
memory mode (Hello.memory.mode):
  SHARED        at once, against the frontend's RAM files mapped by
                SharedGuestMemory, and completed before anything else the
                same request caused goes out;
  DMA_MESSAGES  as a DmaRequest event; the frontend's DmaReply (any time
                later, matched by request_id) completes it (`dma_reply`).
                Nothing waits for the reply: the vCPU may be blocked on a read
                that must be answered meanwhile (qemu-vfio-user.md §4, caveat
                3). At most MAX_DMA_OUTSTANDING are owed (dma_messages.DmaChannel);
                one unanswered for the DMA timeout fails (`dma_timed_out`); a
                session's end fails them;
  NONE          completed at once with an error.
An address outside guest RAM completes the transfer with an error, which the
device turns into its error status; it never ends the stream.

A DeviceNeedsReset effect is also logged on the server, rate-limited per
device (needs_reset_log.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from devmodel.v1 import devmodel_pb2 as pb

from ..effects import (
    BarDecodeChanged,
    DeviceNeedsReset,
    DmaRequested,
    Effect,
    IntxChanged,
    MsiRaised,
)
from ..errors import AccessError
from ..memory import perform_dma
from .convert import event_to_pb
from .dma_messages import PendingDma, reply_outcome
from .guest_memory import SharedGuestMemory
from .protocol import MAX_DMA_BYTES
from .session import Session

log = logging.getLogger(__name__)

# DMA a single request may set off in SHARED mode, where each completion runs
# at once and may start another transfer: a device model that chains forever
# is cut off here (and logged) instead of spinning the event loop.
MAX_DMA_PER_REQUEST = 256


def emit(session: Session, effects: list[Effect], items: list[pb.ServerItem]) -> None:
    """Stream `effects` as events, in order; DMA requests are carried out on the way."""
    counters = session.counters.devices
    queue = deque(effects)
    budget = MAX_DMA_PER_REQUEST
    while queue:
        effect = queue.popleft()
        if isinstance(effect, DmaRequested):
            budget -= 1
            if budget < 0:
                log.error(
                    "device %d keeps starting DMA from its DMA completions; dropped "
                    "request %d (the device stays busy until reset)",
                    effect.device_id,
                    effect.token,
                )
                continue
            # What finishing it caused comes next, before anything later.
            queue.extendleft(reversed(_dma(session, effect, items)))
            continue
        match effect:
            case BarDecodeChanged():
                counters[effect.device_id].bar_decode_changes += 1
            case MsiRaised():
                counters[effect.device_id].msis += 1
            case IntxChanged():
                counters[effect.device_id].intx_changes += 1
            case DeviceNeedsReset():
                name = session.bus.function(effect.device_id).name
                session.needs_reset_log.latched(effect.device_id, name, effect.reason)
            case _:
                pass
        session.counters.events += 1
        items.append(pb.ServerItem(event=event_to_pb(effect)))


def _dma(session: Session, dma: DmaRequested, items: list[pb.ServerItem]) -> list[Effect]:
    """Carry out (or send out) one DmaRequested; returns what an immediate completion caused."""
    session.counters.devices[dma.device_id].dma_requests += 1
    if dma.length > MAX_DMA_BYTES:
        return _complete(
            session,
            dma.device_id,
            dma.token,
            None,
            f"a transfer of {dma.length} bytes is over the {MAX_DMA_BYTES}-byte limit",
        )
    if session.mode == pb.MEMORY_MODE_SHARED:
        assert isinstance(session.memory, SharedGuestMemory)
        data, error = perform_dma(session.memory, dma)
        return _complete(session, dma.device_id, dma.token, data, error)
    if session.mode == pb.MEMORY_MODE_DMA_MESSAGES:
        request_id = session.dma.allocate(
            PendingDma(dma.device_id, dma.token, dma.length, dma.write)
        )
        if request_id is None:
            return _complete(session, dma.device_id, dma.token, None, session.dma.refusal())
        if session.messages is not None:  # the loop's clock; None only before the stream
            timer = session.messages.loop.call_later(
                session.dma.timeout, dma_timed_out, session, request_id
            )
            session.dma.set_timer(request_id, timer)
        session.counters.events += 1
        items.append(pb.ServerItem(event=event_to_pb(dma, request_id)))
        return []
    return _complete(
        session,
        dma.device_id,
        dma.token,
        None,
        "the frontend gave the server no access to guest memory (MEMORY_MODE_NONE)",
    )


def dma_reply(session: Session, reply: pb.DmaReply, items: list[pb.ServerItem]) -> None:
    """The frontend's answer to a DmaRequest: a worker's, or an engine's to complete."""
    if session.messages is not None and session.messages.resolve(reply):
        return  # a worker's (read ahead normally takes those) or a late one
    pending = session.dma.take(reply.request_id)
    if not isinstance(pending, PendingDma):
        raise AccessError(
            f"DmaReply for request {reply.request_id}, "
            "but no DMA request with that id is outstanding"
        )
    data, error = reply_outcome(reply, pending.length, pending.write)
    effects = _complete(session, pending.device_id, pending.token, data, error)
    emit(session, effects, items)


def dma_timed_out(session: Session, request_id: int) -> None:
    """The frontend left an engine's transfer unanswered: it fails, and what
    that causes (the error status, an interrupt) goes out on its own."""
    pending = session.dma.expire(request_id)
    if not isinstance(pending, PendingDma) or session.closed:
        return
    effects = _complete(
        session,
        pending.device_id,
        pending.token,
        None,
        f"the frontend did not answer DMA request {request_id} within {session.dma.timeout:g} s",
    )
    items: list[pb.ServerItem] = []
    emit(session, effects, items)
    if items and session.context is not None:
        task = asyncio.get_running_loop().create_task(session.send(items))
        session.background.add(task)
        task.add_done_callback(session.background.discard)


def _complete(
    session: Session, device_id: int, token: int, data: bytes | None, error: str | None
) -> list[Effect]:
    function = session.bus.function(device_id)
    if error is not None:
        session.counters.devices[device_id].dma_errors += 1
        log.debug("device %d: DMA %d failed: %s", device_id, token, error)
    return function.dma_completed(token, data, error)
