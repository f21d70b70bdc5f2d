"""Core dataclasses <-> protobuf messages, in one place."""

from __future__ import annotations

from devmodel.v1 import devmodel_pb2 as pb

from ..devices.framebuffer import DisplayMode
from ..effects import (
    AddressRange,
    BarDecodeChanged,
    BarKind,
    DeviceNeedsReset,
    DmaRequested,
    Effect,
    IntxChanged,
    MsiRaised,
    SharedMemory,
)
from ..memory import MemoryRegion
from ..pci.bus import PciBus
from ..pci.regs import EXT_CONFIG_SPACE_SIZE
from .protocol import MAX_MESSAGE_BYTES

_KIND_TO_PB = {
    BarKind.IO: pb.BAR_KIND_IO,
    BarKind.MEM32: pb.BAR_KIND_MEM32,
    BarKind.MEM64: pb.BAR_KIND_MEM64,
    BarKind.ROM: pb.BAR_KIND_ROM,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


def kind_to_pb(kind: BarKind) -> int:
    return int(_KIND_TO_PB[kind])


def kind_from_pb(kind: int) -> BarKind:
    return _KIND_FROM_PB[kind]  # type: ignore[index]


def _range(r: AddressRange | None) -> pb.AddressRange | None:
    return None if r is None else pb.AddressRange(base=r.base, size=r.size)


def backing_to_pb(backing: SharedMemory | None) -> pb.SharedMemoryBacking | None:
    if backing is None:
        return None
    return pb.SharedMemoryBacking(
        path=backing.path, file_offset=backing.file_offset, size=backing.size
    )


def backing_from_pb(backing: pb.SharedMemoryBacking) -> SharedMemory:
    return SharedMemory(backing.path, backing.file_offset, backing.size)


def event_to_pb(effect: Effect, request_id: int | None = None) -> pb.Event:
    """The event for an effect; a DmaRequested carries `request_id` (default: its token)."""
    match effect:
        case BarDecodeChanged():
            backing = effect.backing
            return pb.Event(
                bar_decode_changed=pb.BarDecodeChanged(
                    device_id=effect.device_id,
                    bar=effect.bar,
                    kind=_KIND_TO_PB[effect.kind],
                    prefetchable=effect.prefetchable,
                    old_range=_range(effect.old),
                    new_range=_range(effect.new),
                    decoding=effect.decoding,
                    backing=backing_to_pb(backing),
                    generation=effect.generation,
                )
            )
        case MsiRaised():
            return pb.Event(
                msi_raised=pb.MsiRaised(
                    device_id=effect.device_id,
                    vector=effect.vector,
                    address=effect.address,
                    data=effect.data,
                )
            )
        case IntxChanged():
            return pb.Event(
                intx_level=pb.IntxLevel(
                    device_id=effect.device_id, pin=effect.pin, asserted=effect.asserted
                )
            )
        case DeviceNeedsReset():
            return pb.Event(
                device_needs_reset=pb.DeviceNeedsReset(
                    device_id=effect.device_id, reason=effect.reason
                )
            )
        case DmaRequested():
            return pb.Event(
                dma_request=pb.DmaRequest(
                    request_id=effect.token if request_id is None else request_id,
                    device_id=effect.device_id,
                    address=effect.address,
                    length=effect.length,
                    write=effect.write,
                    data=effect.data,
                )
            )


def event_from_pb(event: pb.Event) -> Effect | None:
    """The core dataclass for an event (None for DMA requests, which are not effects)."""
    which = event.WhichOneof("kind")
    if which == "bar_decode_changed":
        e = event.bar_decode_changed
        return BarDecodeChanged(
            device_id=e.device_id,
            bar=e.bar,
            kind=_KIND_FROM_PB[e.kind],
            prefetchable=e.prefetchable,
            old=AddressRange(e.old_range.base, e.old_range.size)
            if e.HasField("old_range")
            else None,
            new=AddressRange(e.new_range.base, e.new_range.size)
            if e.HasField("new_range")
            else None,
            backing=SharedMemory(e.backing.path, e.backing.file_offset, e.backing.size)
            if e.HasField("backing")
            else None,
            generation=e.generation,
        )
    if which == "msi_raised":
        m = event.msi_raised
        return MsiRaised(m.device_id, m.vector, m.address, m.data)
    if which == "intx_level":
        i = event.intx_level
        return IntxChanged(i.device_id, i.pin, i.asserted)
    if which == "device_needs_reset":
        r = event.device_needs_reset
        return DeviceNeedsReset(r.device_id, r.reason)
    return None


def region_from_pb(region: pb.MemoryRegion) -> MemoryRegion:
    return MemoryRegion(
        guest_address=region.guest_address,
        size=region.size,
        path=region.path,
        file_offset=region.file_offset,
        read_only=region.read_only,
    )


def topology_to_pb(bus: PciBus) -> pb.Topology:
    devices = []
    for slot, function in bus:
        ident = function.identity
        devices.append(
            pb.DeviceInfo(
                device_id=function.device_id,
                type=function.type_name,
                name=function.name,
                bus=bus.number,
                device=slot,
                function=0,
                vendor_id=ident.vendor_id,
                product_id=ident.device_id,
                subsystem_vendor_id=ident.subsystem_vendor_id,
                subsystem_id=ident.subsystem_id,
                class_code=ident.class_code,
                revision=ident.revision,
                bars=[
                    pb.BarInfo(
                        index=spec.index,
                        kind=_KIND_TO_PB[spec.kind],
                        size=spec.size,
                        prefetchable=spec.prefetchable,
                        shared_memory=spec.backing is not None,
                        backing=backing_to_pb(spec.backing),
                    )
                    for spec in function.bars
                ],
                interrupt_pin=ident.interrupt_pin,
                msix_vectors=function.msix.vectors if function.msix is not None else 0,
                pci_express=True,
            )
        )
    return pb.Topology(devices=devices, ecam_size=256 * 32 * 8 * EXT_CONFIG_SPACE_SIZE)


def display_mode_to_pb(mode: DisplayMode) -> pb.DisplayMode:
    return pb.DisplayMode(
        width=mode.width,
        height=mode.height,
        bpp=mode.bpp,
        stride=mode.stride,
        offset=mode.offset,
        big_endian=mode.big_endian,
    )


# What one ServerMessage may hold: the limit less room for the message's own
# framing (a few bytes an item, counted generously).
_MESSAGE_BUDGET = MAX_MESSAGE_BYTES - 64 * 1024


def split_items(
    items: list[pb.ServerItem], budget: int = _MESSAGE_BUDGET
) -> list[list[pb.ServerItem]]:
    """Cut a run of items into messages under the size limit, order kept.

    Replies can outgrow the requests that asked for them (a batch of 8-byte
    BAR reads under 4 MiB answers with more than 4 MiB), and a message over
    the limit would end the stream. An item alone is always under the limit
    (DMA payloads are at most MAX_DMA_BYTES).
    """
    chunks: list[list[pb.ServerItem]] = []
    chunk: list[pb.ServerItem] = []
    size = 0
    for item in items:
        n = item.ByteSize() + 8
        if chunk and size + n > budget:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        chunks.append(chunk)
    return chunks
