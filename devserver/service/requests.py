"""One request of a frontend's stream, served against its session's bus.

`serve_request` decodes a Request, calls the core and appends what it caused
to `items`: events first, then the reply they precede (a config write's
events are out before its reply, so the frontend's routing is right when the
vCPU resumes). Reads and config writes are answered, BAR writes are posted.
It does not care which thread it runs on: attach.py calls it on the event
loop, virtio_runner.py in a worker thread for a virtio access that may block.
A request no PCI bus could carry raises AccessError (the stream ends with
INVALID_ARGUMENT naming it); a bad memory map raises MemoryMapError.
"""

from __future__ import annotations

from devmodel.v1 import devmodel_pb2 as pb

from ..effects import AddressRange
from ..errors import AccessError
from ..memory import MAX_REGIONS
from .convert import region_from_pb
from .emit import dma_reply, emit
from .session import Session


def serve_request(session: Session, request: pb.Request, items: list[pb.ServerItem]) -> None:
    bus = session.bus
    kind = request.WhichOneof("kind")
    counters = session.counters.devices
    if kind == "bar_write":
        b = request.bar_write
        effects = bus.bar_write(b.device_id, b.bar, b.offset, b.size, b.value)
        counters[b.device_id].bar_writes += 1
        emit(session, effects, items)
    elif kind == "bar_read":
        r = request.bar_read
        value = bus.bar_read(r.device_id, r.bar, r.offset, r.size)
        counters[r.device_id].bar_reads += 1
        # A read can have effects (virtio's ISR read-to-clear lowers INTx).
        emit(session, bus.take_effects(r.device_id), items)
        items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, value=value)))
    elif kind == "config_read":
        c = request.config_read
        value = bus.config_read(c.bus, c.device, c.function, c.offset, c.size)
        if bus.at(c.bus, c.device, c.function) is not None:
            counters[c.device].config_reads += 1
            emit(session, bus.take_effects(c.device), items)
        items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, value=value)))
    elif kind == "config_write":
        w = request.config_write
        effects = bus.config_write(w.bus, w.device, w.function, w.offset, w.size, w.value)
        if bus.at(w.bus, w.device, w.function) is not None:
            counters[w.device].config_writes += 1
        # Events before the reply: the frontend's routing is right on resume.
        emit(session, effects, items)
        items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, done=True)))
    elif kind == "reset_device":
        device_id = request.reset_device.device_id
        effects = bus.reset(device_id)
        counters[device_id].resets += 1
        emit(session, effects, items)
        items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, done=True)))
    elif kind == "hello":
        raise AccessError("Hello may only be the first request of a stream")
    elif kind == "dma_reply":
        dma_reply(session, request.dma_reply, items)
    elif kind == "memory_map_update":
        _memory_map_update(session, request.memory_map_update)
        session.attach_memory()
        items.append(pb.ServerItem(reply=pb.Reply(seq=request.seq, done=True)))
    else:
        raise AccessError("the request carries no access (empty or unknown oneof 'kind')")


def _memory_map_update(session: Session, update: pb.MemoryMapUpdate) -> None:
    if len(update.add) > MAX_REGIONS or len(update.remove) > MAX_REGIONS:
        raise AccessError(
            f"MemoryMapUpdate adds {len(update.add)} and removes {len(update.remove)} "
            f"regions; at most {MAX_REGIONS} of each"
        )
    session.memory.update(
        [region_from_pb(r) for r in update.add],
        [AddressRange(r.base, r.size) for r in update.remove],
        add_name="MemoryMapUpdate.add",
        remove_name="MemoryMapUpdate.remove",
    )
    session.counters.memory_map_updates += 1
