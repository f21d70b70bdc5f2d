"""One attached frontend's session: its devices, its guest memory, its stream.

A Session lives from the frontend's Hello to the end of its Attach stream
(attach.py). It holds what every part of serving that stream shares: the bus
as presented to this frontend, the guest memory by Hello.memory.mode (shared
RAM files mapped here, or the announced map for DMA_MESSAGES and NONE), what
the frontend owes in DMA replies, the per-device locks that keep a device's
accesses and its continuations from interleaving (reliability.md C7), and the
stream's write side (writes are serialised by a lock: replies, continuation
interrupts and DMA requests all go out on it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from devmodel.v1 import devmodel_pb2 as pb

from ..errors import MemoryMapError
from ..memory import MAX_REGIONS, MemoryTable
from ..pci.bus import PciBus
from ..virtio.pci_transport import VirtioPciFunction
from .convert import region_from_pb, split_items
from .dma_messages import DmaChannel, MessageGuestMemory
from .guest_memory import SharedGuestMemory
from .needs_reset_log import NeedsResetLog
from .stats import ServerCounters

_MODES = (pb.MEMORY_MODE_SHARED, pb.MEMORY_MODE_DMA_MESSAGES, pb.MEMORY_MODE_NONE)


class RequestError(Exception):
    """A request that ends the stream: (gRPC status, message for a person)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def map_error(error: MemoryMapError, prefix: str = "") -> RequestError:
    code = (
        grpc.StatusCode.FAILED_PRECONDITION
        if error.unreachable
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    return RequestError(code, f"{prefix}{error}")


def open_memory(memory: pb.GuestMemoryAccess) -> SharedGuestMemory | MemoryTable:
    """The session's guest memory from Hello.memory, validated like any input
    (reliability.md C12); in SHARED mode every region is mapped."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if memory.mode == pb.MEMORY_MODE_UNSPECIFIED:
        raise RequestError(bad, "Hello.memory.mode is unset: choose SHARED, DMA_MESSAGES or NONE")
    if memory.mode not in _MODES:
        raise RequestError(bad, f"Hello.memory.mode {memory.mode} is not a MemoryMode")
    if len(memory.regions) > MAX_REGIONS:
        raise RequestError(
            bad, f"Hello.memory has {len(memory.regions)} regions; at most {MAX_REGIONS}"
        )
    table = SharedGuestMemory() if memory.mode == pb.MEMORY_MODE_SHARED else MemoryTable()
    try:
        table.update([region_from_pb(r) for r in memory.regions], add_name="Hello.memory.regions")
    except MemoryMapError as e:
        table.close()
        raise map_error(e) from None
    return table


@dataclass(slots=True)
class Session:
    session_id: int
    frontend_name: str
    bus: PciBus
    mode: int  # pb.MemoryMode
    memory: SharedGuestMemory | MemoryTable
    # DMA_MESSAGES: what the frontend owes (the servicer sizes it at session start)
    dma: DmaChannel
    # The server's, shared by its sessions: what this one does is counted and
    # logged there (a frontend that reconnects does not reset a rate limit).
    counters: ServerCounters
    needs_reset_log: NeedsResetLog
    messages: MessageGuestMemory | None = None  # DMA_MESSAGES, once the stream is up
    # The stream, once wired (attach.py); None before the Welcome.
    context: grpc.aio.ServicerContext[pb.FrontendMessage, pb.ServerMessage] | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)
    # Per-device serialisation of virtio work (C7), the stream's write lock and
    # the continuation tasks of devices that ran out of budget (C8).
    device_locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    continuations: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    # Console receive wakes (host bytes arrived): a task per device, and the
    # devices woken again while theirs ran.
    rx_wakes: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    rx_again: set[int] = field(default_factory=set)
    closed: bool = False

    def virtio_functions(self) -> list[VirtioPciFunction]:
        return [f for _, f in self.bus if isinstance(f, VirtioPciFunction)]

    def device_lock(self, device_id: int) -> asyncio.Lock:
        return self.device_locks.setdefault(device_id, asyncio.Lock())

    def attach_memory(self) -> None:
        """(Re-)attach guest memory to every virtio function: shared RAM, DMA by
        message (each function's requests carry its id), or None (NONE)."""
        memory = self.memory if isinstance(self.memory, SharedGuestMemory) else None
        messages = self.messages
        if messages is not None and isinstance(self.memory, MemoryTable):
            messages.set_map(entry.value for entry in self.memory.regions)
        for function in self.virtio_functions():
            if messages is not None:
                function.attach_memory(messages.for_device(function.device_id))
            else:
                function.attach_memory(memory)

    # -- the stream's write side

    async def write(self, items: list[pb.ServerItem]) -> None:
        """Send items in order, in as many messages as the size limit needs: a
        batch of reads under the limit can have replies over it."""
        context = self.context
        if context is None:
            raise ConnectionError("the session's stream is not wired yet")
        async with self.write_lock:
            for chunk in split_items(items):
                self.counters.server_messages += 1
                await context.write(pb.ServerMessage(items=chunk))

    async def send(self, items: list[pb.ServerItem]) -> None:
        """write(), refused once the session has ended (DMA requests, timeouts)."""
        if self.closed:
            raise ConnectionError("the session has ended")
        await self.write(items)

    def end(self) -> None:
        """Fail the DMA the frontend still owes, and let go of its memory."""
        self.closed = True
        self.continuations.clear()
        self.rx_wakes.clear()
        # No ring may be touched once the memory is unmapped.
        for function in self.virtio_functions():
            function.attach_memory(None)
        reason = "the frontend's session ended"
        for dma in self.dma.drain(reason):
            self.counters.devices[dma.device_id].dma_errors += 1
            self.bus.function(dma.device_id).dma_completed(dma.token, None, reason)
        self.memory.close()
