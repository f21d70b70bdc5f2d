"""The Balloon RPC (protocol 1.3): set a virtio-balloon's target, read what the
guest holds and the statistics it sent (virtio 1.2 §5.5).

A new target is a configuration change: under the device's lock (its accesses
and wakes never interleave, reliability.md C7) the device takes it and the
transport raises the configuration interrupt; the servicer sends that event on
the attached session's stream, as a console's host end does for its wakes
(virtio_runner.deliver). Each call also hands the held stats buffer back to the
driver (§5.5.6.3), which refills and reposts it: the reply carries the latest
values the device has, one call behind at worst. Returning a buffer writes the
used ring, which with DMA messages is a round trip, so that step runs in a
worker thread.

Targets outlive sessions: each session's bus is built afresh at attach, so the
control keeps the last target per device and gives it to the next session's
balloon (its driver then inflates towards it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TypeAlias

import grpc

from devmodel.v1 import devmodel_pb2 as pb

from ..devices.balloon import MAX_TARGET_PAGES, PAGE_SHIFT, VirtioBalloon
from ..effects import Effect
from ..errors import AccessError
from ..pci.bus import PciBus
from ..virtio.chain import ChainError
from ..virtio.pci_transport import VirtioPciFunction
from .session import Session
from .virtio_runner import deliver

BalloonContext: TypeAlias = "grpc.aio.ServicerContext[pb.BalloonRequest, pb.BalloonReply]"


class BalloonControl:
    """The server's balloon targets, by device id, and the RPC that sets them."""

    def __init__(self) -> None:
        self.targets: dict[int, int] = {}  # device id → pages

    def apply(self, bus: PciBus) -> None:
        """Give a new session's balloons the targets set before it."""
        for function, device in balloons(bus):
            pages = self.targets.get(function.device_id)
            if pages is not None:
                device.set_target(pages)

    async def serve(
        self,
        session: Session | None,
        default_bus: PciBus,
        request: pb.BalloonRequest,
        context: BalloonContext,
    ) -> pb.BalloonReply:
        bus = session.bus if session is not None else default_bus
        try:
            function = bus.function(request.device_id)
        except AccessError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise  # not reached: abort raises
        if not isinstance(function, VirtioPciFunction) or not isinstance(
            function.device, VirtioBalloon
        ):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"device {request.device_id} ({function.name}, {function.type_name}) "
                "is not a balloon; Balloon needs a virtio-balloon",
            )
            raise AssertionError("abort raises")
        pages: int | None = None
        if request.HasField("target_bytes"):
            pages = request.target_bytes >> PAGE_SHIFT
            if pages > MAX_TARGET_PAGES:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"target of {request.target_bytes} bytes is more than the balloon "
                    f"holds ({MAX_TARGET_PAGES} pages of 4 KiB)",
                )
                raise AssertionError("abort raises")
            self.targets[function.device_id] = pages
        if session is None or session.closed:
            if pages is not None:
                function.device.set_target(pages)  # no driver to tell
            return reply(function, function.device)
        async with session.device_lock(function.device_id):
            effects = await asyncio.to_thread(host_step, function, pages)
        await deliver(session, function, effects)
        return reply(function, function.device)


def host_step(function: VirtioPciFunction, pages: int | None) -> list[Effect]:
    """A new target (a configuration interrupt) and a stats request; the effects."""
    device = function.device
    assert isinstance(device, VirtioBalloon)
    if pages is not None and pages != device.target_pages:
        device.set_target(pages)
        function.config_changed()
    if function.status.driver_ok and not function.status.needs_reset:
        try:
            device.request_stats()
        except ChainError as e:
            # Guest memory under the stats buffer changed: the guest's doing.
            function.needs_reset(str(e))
    return function.take_effects()


def reply(function: VirtioPciFunction, device: VirtioBalloon) -> pb.BalloonReply:
    return pb.BalloonReply(
        target_bytes=device.target_pages << PAGE_SHIFT,
        actual_bytes=device.actual_pages << PAGE_SHIFT,
        stats=device.named_stats(),
        driver_ok=function.status.driver_ok,
        pages_freed=device.discarded,
        pfns_ignored=device.pfns_outside_ram + device.pfns_ignored,
    )


def balloons(bus: PciBus) -> Iterator[tuple[VirtioPciFunction, VirtioBalloon]]:
    for _, f in bus:
        if isinstance(f, VirtioPciFunction) and isinstance(f.device, VirtioBalloon):
            yield f, f.device
