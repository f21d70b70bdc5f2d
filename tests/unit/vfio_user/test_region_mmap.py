"""Mappable regions: DeviceLayout flags and GET_REGION_INFO with its fd."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from devmodel.v1 import devmodel_pb2 as pb
from vmm_client.vfio_user.device import Device, device_layout
from vmm_client.vfio_user.handler import DeviceHandler
from vmm_client.vfio_user.link import ServerLink
from vmm_client.vfio_user.protocol import (
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    BarLayout,
    Command,
    DeviceLayout,
    Header,
    Message,
    Version,
)

from .test_handler import FakeSession

MIB = 1 << 20


def fb_info() -> pb.DeviceInfo:
    return pb.DeviceInfo(
        device_id=1,
        type="vesa-fb",
        name="fb",
        bars=[
            pb.BarInfo(index=0, kind=pb.BAR_KIND_MEM32, size=MIB, shared_memory=True),
            pb.BarInfo(index=2, kind=pb.BAR_KIND_MEM32, size=0x1000),
        ],
    )


def test_layout_flags_mappable_bars_only() -> None:
    layout = DeviceLayout.build(
        [BarLayout(0, MIB, mmap=True), BarLayout(2, 0x1000)], interrupt_pin=0, msix_vectors=0
    )
    rw = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
    assert layout.region(0).flags == rw | REGION_INFO_FLAG_MMAP
    assert layout.region(2).flags == rw


@pytest.mark.parametrize(
    "bar", [BarLayout(6, 0x800, mmap=True), BarLayout(0, 0x800, mmap=True)], ids=["rom", "partial"]
)
def test_unmappable_layouts_are_refused(bar: BarLayout) -> None:
    with pytest.raises(ValueError, match="cannot be mapped"):
        DeviceLayout.build([bar], interrupt_pin=0, msix_vectors=0)


def test_device_layout_maps_only_what_we_hold_an_fd_for() -> None:
    info = fb_info()
    assert not device_layout(info).region(0).flags & REGION_INFO_FLAG_MMAP
    assert device_layout(info, frozenset({0})).region(0).flags & REGION_INFO_FLAG_MMAP


def region_info_request(index: int) -> Message:
    payload = struct.pack("<IIIIQQ", 32, 0, index, 0, 0, 0)
    return Message(Header(9, Command.DEVICE_GET_REGION_INFO, 16 + len(payload), 0), payload)


async def make_handler(
    fd: int | None, *, can_send_fds: bool
) -> tuple[DeviceHandler, list[bytes], list[tuple[bytes, list[int]]]]:
    session = FakeSession(topology=pb.Topology(devices=[fb_info()]))
    info = session.topology.devices[0]
    fds = {} if fd is None else {0: fd}
    device = Device(info, device_layout(info, frozenset(fds)), Path("/x"), mmap_fds=fds)
    sent: list[bytes] = []
    sent_fds: list[tuple[bytes, list[int]]] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    async def send_fds(data: bytes, fds: Sequence[int]) -> None:
        sent_fds.append((data, list(fds)))

    handler = DeviceHandler(
        device, ServerLink(session, 1.0), send, send_fds=send_fds if can_send_fds else None
    )
    version = Version(0, 0).encode()
    await handler.handle(Message(Header(1, Command.VERSION, 16 + len(version), 0), version))
    return handler, sent, sent_fds


def decode_info(reply: bytes) -> tuple[int, int, int]:
    _, flags, index, _, size, _ = struct.unpack_from("<IIIIQQ", reply, 16)
    return flags, index, size


async def test_region_info_brings_the_fd() -> None:
    fd = os.memfd_create("vram", os.MFD_CLOEXEC)
    try:
        handler, _, sent_fds = await make_handler(fd, can_send_fds=True)
        assert await handler.handle(region_info_request(0)) is None  # sent with its fd
        ((reply, fds),) = sent_fds
        assert fds == [fd]
        assert Header.decode(reply).msg_id == 9
        flags, index, size = decode_info(reply)
        assert (index, size) == (0, MIB) and flags & REGION_INFO_FLAG_MMAP
        # The register BAR is answered plainly.
        plain = await handler.handle(region_info_request(2))
        assert plain is not None and not decode_info(plain)[0] & REGION_INFO_FLAG_MMAP
    finally:
        os.close(fd)


async def test_no_way_to_send_fds_means_no_mmap() -> None:
    fd = os.memfd_create("vram", os.MFD_CLOEXEC)
    try:
        handler, _, sent_fds = await make_handler(fd, can_send_fds=False)
        reply = await handler.handle(region_info_request(0))
        assert reply is not None and sent_fds == []
        assert not decode_info(reply)[0] & REGION_INFO_FLAG_MMAP
    finally:
        os.close(fd)
