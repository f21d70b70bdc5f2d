"""The Attach stream: one frontend's session from its Hello to the stream's end.

One frontend is attached at a time; it owns the devices until its stream
ends. Each FrontendMessage is handled to the end before the next is read, and
everything it produced (events first, then the replies they precede) goes out
as one ServerMessage. A request no PCI bus could carry ends the stream with
INVALID_ARGUMENT naming the request; the server and its other streams go on.

From the Welcome on, the stream is read ahead of the serve loop
(dma_messages.ReadAhead): a worker thread blocked on a DMA reply holds its
device, so that reply must not wait behind the requests it delays. In
DMA_MESSAGES the session's guest memory is a MessageGuestMemory that sends
its DmaRequests on this stream; it is attached to each virtio function at
Hello and again after every MemoryMapUpdate.

When the stream ends, continuations stop after the bounded step they are in
(a worker thread cannot be cancelled), workers waiting for a DMA reply are
woken with an error, and only then does the guest memory go away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol, TypeAlias

import grpc

from devmodel.v1 import devmodel_pb2 as pb

from ..errors import AccessError, MemoryMapError
from .dma_messages import MessageGuestMemory, ReadAhead
from .requests import serve_request
from .session import RequestError, Session, map_error
from .stats import ServerCounters
from .virtio_runner import continue_work, serve_virtio, virtio_target

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage]


class Seat(Protocol):
    """What a stream needs of the servicer: the one place a frontend attaches."""

    counters: ServerCounters

    def open_session(self, first: pb.FrontendMessage) -> tuple[Session, int]:
        """Validate the Hello in `first` and seat its session: (session, Hello's seq)."""
        ...

    def welcome(self, session: Session, seq: int) -> pb.Reply: ...

    def wire_consoles(self, session: Session) -> None: ...

    def unwire_consoles(self, session: Session) -> None: ...

    def holds(self, session: Session) -> bool:
        """Whether `session` is the attached one."""
        ...

    def end_session(self, session: Session) -> None:
        """Unseat `session` and let go of what it holds."""
        ...


async def serve_attach(seat: Seat, context: Context) -> None:
    counters = seat.counters
    session: Session | None = None
    reader: ReadAhead | None = None
    try:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        assert isinstance(first, pb.FrontendMessage)
        session, welcome_seq = seat.open_session(first)
        seat.wire_consoles(session)
        _wire_stream(session, context)
        await context.write(
            pb.ServerMessage(items=[pb.ServerItem(reply=seat.welcome(session, welcome_seq))])
        )
        counters.server_messages += 1
        # Read ahead from here: a worker blocked on a DMA reply holds its
        # device, so the reply must not wait behind the requests it delays.
        messages = session.messages
        reader = ReadAhead(
            context.read,
            messages.resolve if messages is not None else lambda _: False,
            session.dma.fail_waiters,
            counters,
        )
        # Requests after Hello in the same message are handled like any other.
        await serve_message(session, first.requests[1:])
        while True:
            requests = await reader.next()
            if requests is None:
                return
            await serve_message(session, requests)
    except RequestError as e:
        counters.rejected_requests += 1
        log.warning("frontend stream ended: %s", e.message)
        if reader is not None:
            await reader.aclose()  # no read may be pending when the status goes out
        await context.abort(e.code, e.message)
    finally:
        if session is not None and seat.holds(session):
            log.info("session %d (%s) detached", session.session_id, session.frontend_name)
            # Continuations stop after the bounded step they are in (a worker
            # thread cannot be cancelled), before the memory goes away.
            session.closed = True
            # Workers waiting for a DMA reply wake now: none can come.
            session.dma.fail_waiters("the frontend's session ended")
            seat.unwire_consoles(session)
            tasks = [*session.continuations.values(), *session.rx_wakes.values()]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if reader is not None:
                await reader.aclose()
            for task in list(session.background):
                task.cancel()
            if session.messages is not None:
                await session.messages.aclose()
            seat.end_session(session)
        elif reader is not None:
            await reader.aclose()


def _wire_stream(session: Session, context: Context) -> None:
    """Give the session its stream to send on (DMA requests, DMA timeouts,
    continuations) and, in DMA_MESSAGES, the guest memory virtio devices use."""
    session.context = context
    if session.mode == pb.MEMORY_MODE_DMA_MESSAGES:
        session.messages = MessageGuestMemory(
            session.dma, asyncio.get_running_loop(), session.send, session.counters
        )
        session.attach_memory()


async def serve_message(session: Session, requests: Sequence[pb.Request]) -> None:
    """Serve one message's requests in order; send what they produced as one message."""
    items: list[pb.ServerItem] = []
    for request in requests:
        session.counters.requests += 1
        try:
            virtio = virtio_target(session, request)
            if virtio is None:
                serve_request(session, request, items)
            else:
                await serve_virtio(session, virtio, request, items)
        except MemoryMapError as e:
            raise map_error(e, f"request seq={request.seq}: ") from None
        except AccessError as e:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"request seq={request.seq}: {e}"
            ) from None
    if items:
        await session.write(items)
    for function in session.virtio_functions():
        if function.pending_work:
            continue_work(session, function)
    if items:
        # Let other streams (Topology, Stats, a refused second Attach) run
        # between messages of a busy frontend.
        await asyncio.sleep(0)
