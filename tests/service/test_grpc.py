"""The Attach stream and control RPCs against a real server on a UNIX socket."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc
from devserver.config import parse_device_spec
from devserver.devices import testdev
from devserver.effects import AddressRange, BarDecodeChanged, IntxChanged, MsiRaised
from devserver.errors import ConfigError
from devserver.service.protocol import MAX_MESSAGE_BYTES, PROTOCOL_MAJOR, SERVICE_NAME
from devserver.service.server import DevServer, Listen, TlsFiles
from vmm_client.client import (
    AsyncSession,
    ClientError,
    FrontendOptions,
    MemoryRegion,
    SyncSession,
    TlsClientFiles,
    get_stats,
    get_topology,
    open_channel,
)

from .conftest import Pki

SLOT = 1  # the first test device (automatic slot)


def hello_request(major: int = PROTOCOL_MAJOR, **memory: object) -> pb.Request:
    options = FrontendOptions("raw-test")
    hello = options.hello()
    hello.protocol_major = major
    return pb.Request(seq=7, hello=hello)


async def raw_stream(
    channel: grpc.aio.Channel, *requests: pb.Request
) -> tuple[list[pb.ServerMessage], grpc.StatusCode, str]:
    """Send requests in one message each, then read everything until the stream ends."""
    call = devmodel_pb2_grpc.DeviceModelStub(channel).Attach()
    messages = []
    try:
        for request in requests:
            await call.write(pb.FrontendMessage(requests=[request]))
        await call.done_writing()
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
    except grpc.aio.AioRpcError:
        pass  # the status says why
    return messages, await call.code(), await call.details()


# -- handshake


async def test_welcome_carries_version_session_and_topology(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        session = await AsyncSession.attach(channel, FrontendOptions("t"))
        assert session.welcome.protocol_major == PROTOCOL_MAJOR
        assert session.welcome.session_id >= 1
        assert [(d.device, d.name) for d in session.topology.devices] == [
            (1, "pci-testdev0"),
            (5, "second"),
        ]
        assert session.topology == await get_topology(channel)
        await session.close()


async def test_version_mismatch_is_refused_with_a_reason(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        _, code, details = await raw_stream(channel, hello_request(major=PROTOCOL_MAJOR + 1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "protocol" in details and f"{PROTOCOL_MAJOR}." in details


async def test_first_request_must_be_hello(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        read = pb.Request(seq=1, config_read=pb.ConfigRead(device=1, size=4))
        _, code, details = await raw_stream(channel, read)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "Hello" in details


async def test_frontend_capabilities_shape_the_devices(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        options = FrontendOptions("old-frontend", msi=False, bar64=False)
        session = await AsyncSession.attach(channel, options)
        device = session.topology.devices[0]
        assert device.msix_vectors == 0
        assert pb.BAR_KIND_MEM64 not in [b.kind for b in device.bars]
        # The MSI-X capability is gone from the list the guest walks.
        caps, at = [], await session.config_read(0, SLOT, 0, 0x34, 1)
        while at:
            caps.append(await session.config_read(0, SLOT, 0, at, 1))
            at = await session.config_read(0, SLOT, 0, at + 1, 1)
        assert 0x11 not in caps and 0x10 in caps
        await session.close()


# -- bad input ends one stream, never the server


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.Request(config_read=pb.ConfigRead(device=1, offset=4096, size=4)), "outside"),
        (pb.Request(config_read=pb.ConfigRead(device=1, offset=0, size=3)), "size 3"),
        (pb.Request(config_read=pb.ConfigRead(device=1, offset=2, size=4)), "aligned"),
        (pb.Request(config_read=pb.ConfigRead(device=32, size=4)), "device number"),
        (pb.Request(bar_read=pb.BarRead(device_id=9, bar=0, size=4)), "no device"),
        (pb.Request(bar_read=pb.BarRead(device_id=1, bar=1, size=4)), "no BAR 1"),
        (pb.Request(bar_read=pb.BarRead(device_id=1, bar=0, offset=0x100, size=4)), "outside"),
        (pb.Request(bar_write=pb.BarWrite(device_id=1, bar=0, size=16)), "size 16"),
        (pb.Request(), "carries no access"),
        (pb.Request(hello=pb.Hello(protocol_major=PROTOCOL_MAJOR)), "first request"),
        (pb.Request(dma_reply=pb.DmaReply(request_id=3)), "no DMA request"),
    ],
)
async def test_malformed_request_ends_the_stream_with_invalid_argument(
    server: DevServer, request_: pb.Request, needle: str
) -> None:
    request_.seq = 41
    async with open_channel(server.address) as channel:
        messages, code, details = await raw_stream(channel, hello_request(), request_)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in details and "seq=41" in details
        assert messages[0].items[0].reply.HasField("welcome")
        # The server is still there, and free for the next frontend.
        session = await AsyncSession.attach(channel, FrontendOptions("next"))
        assert await session.config_read(0, SLOT, 0, 0, 2) == testdev.VENDOR_ID
        await session.close()
    assert server.servicer.counters.rejected_requests == 1


@pytest.mark.parametrize(
    ("regions", "mode", "needle"),
    [
        ([MemoryRegion(0, 0)], pb.MEMORY_MODE_DMA_MESSAGES, "size 0"),
        (
            [MemoryRegion(0, 0x2000), MemoryRegion(0x1000, 0x1000)],
            pb.MEMORY_MODE_DMA_MESSAGES,
            "overlap",
        ),
        ([MemoryRegion(2**64 - 0x1000, 0x2000)], pb.MEMORY_MODE_DMA_MESSAGES, "wraps"),
        ([MemoryRegion(0, 0x1000)], pb.MEMORY_MODE_SHARED, "needs a path"),
        ([MemoryRegion(0, 0x1000, path="/nonexistent/ram")], pb.MEMORY_MODE_SHARED, "cannot open"),
        ([], pb.MEMORY_MODE_UNSPECIFIED, "mode is unset"),
    ],
)
async def test_bad_memory_table_is_refused(
    server: DevServer, regions: list[MemoryRegion], mode: int, needle: str
) -> None:
    async with open_channel(server.address) as channel:
        with pytest.raises(ClientError, match=needle):
            await AsyncSession.attach(
                channel, FrontendOptions("mem", memory_mode=mode, regions=regions)
            )


async def test_shared_memory_region_must_fit_its_file(server: DevServer, tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(0x1000))
    async with open_channel(server.address) as channel:
        too_big = [MemoryRegion(0, 0x2000, path=str(ram))]
        with pytest.raises(ClientError, match="past the end"):
            await AsyncSession.attach(
                channel, FrontendOptions(memory_mode=pb.MEMORY_MODE_SHARED, regions=too_big)
            )
        fits = [MemoryRegion(0, 0x1000, path=str(ram))]
        session = await AsyncSession.attach(
            channel, FrontendOptions(memory_mode=pb.MEMORY_MODE_SHARED, regions=fits)
        )
        await session.close()


async def test_oversized_message_is_refused_and_server_keeps_serving(server: DevServer) -> None:
    # A channel that sends more than ours would, to reach the server's limit.
    options = [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(server.address, options=options) as channel:
        big = pb.Request(dma_reply=pb.DmaReply(data=bytes(MAX_MESSAGE_BYTES + 1)))
        call = devmodel_pb2_grpc.DeviceModelStub(channel).Attach()
        await call.write(pb.FrontendMessage(requests=[hello_request()]))

        async def send_big() -> None:
            await call.write(pb.FrontendMessage(requests=[big]))
            await call.read()  # the Welcome
            await call.read()  # the verdict on the big message

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await send_big()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with open_channel(server.address) as channel:
        session = await AsyncSession.attach(channel, FrontendOptions("after"))
        assert await session.config_read(0, SLOT, 0, 0, 2) == testdev.VENDOR_ID
        await session.close()


# -- ordering


async def test_events_arrive_before_the_reply_of_the_config_write(server: DevServer) -> None:
    bar0 = pb.Request(
        seq=2, config_write=pb.ConfigWrite(device=SLOT, offset=0x10, size=4, value=0xC000)
    )
    enable = pb.Request(seq=3, config_write=pb.ConfigWrite(device=SLOT, offset=4, size=2, value=1))
    async with open_channel(server.address) as channel:
        messages, code, _ = await raw_stream(channel, hello_request(), bar0, enable)
    assert code == grpc.StatusCode.OK
    items = [item for m in messages for item in m.items]
    kinds = [
        item.WhichOneof("kind") + (f":{item.reply.seq}" if item.HasField("reply") else "")
        for item in items
    ]
    assert kinds == ["reply:7", "reply:2", "event", "reply:3"]
    event = items[2].event.bar_decode_changed
    assert (event.device_id, event.bar, event.decoding) == (SLOT, 0, True)
    assert (event.new_range.base, event.new_range.size) == (0xC000, 0x100)
    assert not event.HasField("old_range")


async def test_client_applies_events_before_config_write_returns(server: DevServer) -> None:
    seen: list[object] = []
    async with open_channel(server.address) as channel:
        session = await AsyncSession.attach(channel, FrontendOptions("t"), on_event=seen.append)
        await session.config_write(0, SLOT, 0, 0x10, 4, 0xC000)
        events = await session.config_write(0, SLOT, 0, 4, 2, 1)
        assert seen == events
        assert isinstance(events[0], BarDecodeChanged)
        assert events[0].new == AddressRange(0xC000, 0x100)
        await session.close()


async def test_posted_writes_keep_their_order(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        session = await AsyncSession.attach(channel, FrontendOptions("t"))
        for value in range(500):
            session.bar_write(SLOT, testdev.IO_BAR, testdev.REG_SCRATCH, 4, value)
        assert await session.bar_read(SLOT, testdev.IO_BAR, testdev.REG_SCRATCH, 4) == 499
        await session.close()


async def test_doorbell_raises_intx_then_msix(server: DevServer) -> None:
    seen: list[object] = []
    async with open_channel(server.address) as channel:
        s = await AsyncSession.attach(channel, FrontendOptions("t"), on_event=seen.append)
        s.bar_write(SLOT, testdev.IO_BAR, testdev.REG_DOORBELL, 4, 0)
        await s.bar_read(SLOT, testdev.IO_BAR, testdev.REG_IRQ_STATUS, 4)  # orders after it
        assert seen[-1] == IntxChanged(SLOT, 1, True)
        s.bar_write(SLOT, testdev.IO_BAR, testdev.REG_IRQ_STATUS, 4, 1)  # ack
        await s.bar_read(SLOT, testdev.IO_BAR, testdev.REG_ID, 4)
        assert seen[-1] == IntxChanged(SLOT, 1, False)
        # MSI-X: enable in the capability, program and unmask vector 2.
        msix_cap = 0x48
        assert await s.config_read(0, SLOT, 0, msix_cap, 1) == 0x11
        await s.config_write(0, SLOT, 0, msix_cap + 2, 2, 0x8000)
        entry = 2 * 16
        s.bar_write(SLOT, testdev.MSIX_BAR, entry, 8, 0xFEE0_0000)
        s.bar_write(SLOT, testdev.MSIX_BAR, entry + 8, 4, 0x4041)
        s.bar_write(SLOT, testdev.MSIX_BAR, entry + 12, 4, 0)
        s.bar_write(SLOT, testdev.IO_BAR, testdev.REG_DOORBELL, 4, 2)
        await s.bar_read(SLOT, testdev.IO_BAR, testdev.REG_ID, 4)
        assert seen[-1:] == [MsiRaised(SLOT, 2, 0xFEE0_0000, 0x4041)]
        await s.close()


# -- more than one client


async def test_second_attach_is_refused_while_control_rpcs_still_work(server: DevServer) -> None:
    async with open_channel(server.address) as first, open_channel(server.address) as second:
        s1 = await AsyncSession.attach(first, FrontendOptions("one"))
        with pytest.raises(ClientError, match="busy") as info:
            await AsyncSession.attach(second, FrontendOptions("two"))
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (await get_stats(second)).attached
        assert len((await get_topology(second)).devices) == 2
        # The first session did not notice.
        assert await s1.config_read(0, SLOT, 0, 0, 2) == testdev.VENDOR_ID
        await s1.close()
        s2 = await AsyncSession.attach(second, FrontendOptions("two"))
        assert s2.welcome.session_id == s1.welcome.session_id + 1
        await s2.close()


async def test_a_new_session_starts_from_power_on(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        s1 = await AsyncSession.attach(channel, FrontendOptions())
        await s1.config_write(0, SLOT, 0, 4, 2, 1)
        await s1.close()
        s2 = await AsyncSession.attach(channel, FrontendOptions())
        assert await s2.config_read(0, SLOT, 0, 4, 2) == 0
        await s2.close()


async def test_stats_count_what_happened(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        s = await AsyncSession.attach(channel, FrontendOptions())
        await s.config_read(0, SLOT, 0, 0, 4)
        await s.config_read(0, 7, 0, 0, 4)  # empty slot: not a device's read
        s.bar_write(SLOT, 0, 4, 4, 1)
        await s.reset_device(SLOT)
        stats = await get_stats(channel)
        await s.close()
    device = {d.device_id: d for d in stats.devices}[SLOT]
    assert (device.config_reads, device.bar_writes, device.resets) == (1, 1, 1)
    assert stats.sessions_total == 1 and stats.attached


async def test_sync_session_from_a_blocking_caller(server: DevServer) -> None:
    def drive() -> tuple[int, int]:
        with SyncSession(server.address, FrontendOptions("sync")) as s:
            vendor = s.config_read(0, SLOT, 0, 0, 2)
            s.bar_write(SLOT, testdev.IO_BAR, testdev.REG_SCRATCH, 4, 0xBEEF)
            return vendor, s.bar_read(SLOT, testdev.IO_BAR, testdev.REG_SCRATCH, 4)

    assert await asyncio.to_thread(drive) == (testdev.VENDOR_ID, 0xBEEF)


# -- stock tools: health checking and reflection


async def test_health_and_reflection(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        answer = await call.read()
        names = {s.name for s in answer.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


# -- listening safely


async def test_socket_is_private(server: DevServer) -> None:
    path = server.listen.unix_path
    assert path is not None
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_refuses_a_socket_directory_open_to_others(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    srv = DevServer([parse_device_spec("pci-testdev")], Listen(unix_path=shared / "dev.sock"))
    with pytest.raises(ConfigError, match="chmod 700"):
        await srv.start()


async def test_second_server_cannot_share_a_tcp_port() -> None:
    first = DevServer([parse_device_spec("pci-testdev")], Listen(host="127.0.0.1", port=0))
    address = await first.start()
    port = int(address.rsplit(":", 1)[1])
    second = DevServer([parse_device_spec("pci-testdev")], Listen(host="127.0.0.1", port=port))
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            await second.start()
    finally:
        await second.stop(0)
        await first.stop(0)


def test_plain_tcp_off_loopback_needs_consent() -> None:
    with pytest.raises(ConfigError, match="insecure-tcp"):
        DevServer([parse_device_spec("pci-testdev")], Listen(host="0.0.0.0", port=0))


# -- mutual TLS on 127.0.0.1


async def test_mtls_accepts_our_client_and_refuses_others(pki: Pki) -> None:
    srv = DevServer(
        [parse_device_spec("pci-testdev")],
        Listen(host="127.0.0.1", port=0),
        TlsFiles(pki.server_cert, pki.server_key, client_ca=pki.ca),
    )
    address = await srv.start()
    try:
        good = TlsClientFiles(pki.ca, pki.client_cert, pki.client_key)
        async with open_channel(address, good) as channel:
            s = await AsyncSession.attach(channel, FrontendOptions("tls"))
            assert await s.config_read(0, SLOT, 0, 0, 2) == testdev.VENDOR_ID
            await s.close()
        for tls in (
            TlsClientFiles(pki.ca),  # no client certificate
            TlsClientFiles(pki.ca, pki.rogue_cert, pki.rogue_key),  # foreign CA
        ):
            async with open_channel(address, tls) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await get_topology(channel)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        async with open_channel(address) as plain:  # no TLS at all
            with pytest.raises(grpc.aio.AioRpcError):
                await get_topology(plain)
    finally:
        await srv.stop(0)


# -- Prometheus


async def test_prometheus_metrics_follow_the_counters(tmp_path: Path) -> None:
    import urllib.request

    srv = DevServer(
        [parse_device_spec("pci-testdev,name=probe-me")],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
        metrics=("127.0.0.1", 0),
    )
    await srv.start()
    try:
        async with open_channel(srv.address) as channel:
            s = await AsyncSession.attach(channel, FrontendOptions("metrics"))
            await s.config_read(0, SLOT, 0, 0, 4)
            s.bar_write(SLOT, 0, 4, 4, 1)
            await s.bar_read(SLOT, 0, 4, 4)
            url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
            text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
            await s.close()
    finally:
        await srv.stop(0)
    assert "devmodel_sessions_total 1.0" in text
    assert "devmodel_frontend_attached 1.0" in text
    assert 'devmodel_device_config_reads_total{device_id="1",name="probe-me"} 1.0' in text
    assert 'devmodel_device_bar_writes_total{device_id="1",name="probe-me"} 1.0' in text


async def test_effects_of_a_read_go_out_before_its_reply(server: DevServer) -> None:
    """A read can change state (read-to-clear registers); its events still come first."""
    from devserver.pci.bus import PciBus

    seen: list[object] = []
    async with open_channel(server.address) as channel:
        s = await AsyncSession.attach(channel, FrontendOptions("t"), on_event=seen.append)
        session = server.servicer._session
        assert session is not None
        bus: PciBus = session.bus
        # Stand-in for a read-to-clear register: the device lowers INTx during a read.
        function = bus.function(SLOT)
        original = function.read_bar

        def read_and_lower(bar: int, offset: int, size: int) -> int:
            function.set_intx(False)
            return original(bar, offset, size)

        function.set_intx(True)
        function.take_effects()
        function.read_bar = read_and_lower  # type: ignore[method-assign]
        await s.bar_read(SLOT, testdev.IO_BAR, testdev.REG_ID, 4)
        assert seen == [IntxChanged(SLOT, 1, False)]
        await s.close()


# -- malformed wire messages (reliability.md §6: malformed/oversized messages,
# unknown oneof, huge repeated fields): the offending stream ends, the server goes on


async def raw_bytes_stream(
    channel: grpc.aio.Channel, *payloads: bytes
) -> tuple[list[bytes], grpc.StatusCode, str]:
    """Attach with frames written as given, bytes that need not parse."""
    call = channel.stream_stream(
        f"/{SERVICE_NAME}/Attach",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )()
    messages: list[bytes] = []
    try:
        for payload in payloads:
            await call.write(payload)
        await call.done_writing()
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
    except grpc.aio.AioRpcError:
        pass  # the status says why
    return messages, await call.code(), await call.details()


async def assert_next_frontend_served(channel: grpc.aio.Channel) -> None:
    session = await AsyncSession.attach(channel, FrontendOptions("next"))
    assert await session.config_read(0, SLOT, 0, 0, 2) == testdev.VENDOR_ID
    await session.close()


def _hello_bytes() -> bytes:
    return pb.FrontendMessage(requests=[hello_request()]).SerializeToString()


# A Request with seq=9 and a field number no version of the contract has used (99,
# varint 1): what a newer frontend's request kind looks like to this server.
_UNKNOWN_KIND = b"\x08\x09\x98\x06\x01"


@pytest.mark.parametrize(
    ("frames", "codes", "needle"),
    [
        # wire bytes that are no protobuf at all, first or after Hello
        (
            [b"\xff\xff\xff\xff"],
            (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT),
            "parsing",
        ),
        (
            ["hello", b"\x0a\x05\xff\xff"],
            (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT),
            "parsing",
        ),
        # a request kind this server does not know (an unknown oneof member)
        (
            ["hello", b"\x0a" + bytes([len(_UNKNOWN_KIND)]) + _UNKNOWN_KIND],
            (grpc.StatusCode.INVALID_ARGUMENT,),
            "seq=9",
        ),
    ],
    ids=["garbage-first", "garbage-after-hello", "unknown-kind"],
)
async def test_undecodable_or_unknown_frames_end_the_stream(
    server: DevServer, frames: list[bytes | str], codes: tuple[grpc.StatusCode, ...], needle: str
) -> None:
    payloads = [_hello_bytes() if f == "hello" else f for f in frames]
    async with open_channel(server.address) as channel:
        messages, code, details = await raw_bytes_stream(
            channel, *(p for p in payloads if isinstance(p, bytes))
        )
        assert code in codes
        assert needle in details
        if frames[0] == "hello":
            assert pb.ServerMessage.FromString(messages[0]).items[0].reply.HasField("welcome")
        await assert_next_frontend_served(channel)


async def test_undecodable_unary_request_is_refused(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        topology = channel.unary_unary(
            f"/{SERVICE_NAME}/GetTopology",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await topology(b"\xff\xff\xff")
        assert info.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT)
        assert len((await get_topology(channel)).devices) == 2


async def test_huge_repeated_fields_are_refused(server: DevServer, tmp_path: Path) -> None:
    """More memory regions than a frontend may have, in Hello and in an update."""
    from devserver.memory import MAX_REGIONS

    many = [MemoryRegion(0x1000 * i, 0x1000) for i in range(MAX_REGIONS + 1)]
    async with open_channel(server.address) as channel:
        with pytest.raises(ClientError, match=f"at most {MAX_REGIONS}") as info:
            await AsyncSession.attach(
                channel, FrontendOptions(memory_mode=pb.MEMORY_MODE_DMA_MESSAGES, regions=many)
            )
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        session = await AsyncSession.attach(
            channel, FrontendOptions(memory_mode=pb.MEMORY_MODE_DMA_MESSAGES)
        )
        with pytest.raises(ClientError, match=f"at most {MAX_REGIONS}"):
            await session.memory_map_update(many)
        await session.close()
        assert (
            session.closed is not None and session.closed.code == grpc.StatusCode.INVALID_ARGUMENT
        )
        await assert_next_frontend_served(channel)


async def test_an_unknown_memory_mode_is_refused(server: DevServer) -> None:
    async with open_channel(server.address) as channel:
        with pytest.raises(ClientError, match="not a MemoryMode") as info:
            await AsyncSession.attach(channel, FrontendOptions(memory_mode=99))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        await assert_next_frontend_served(channel)


async def test_a_batch_just_under_the_limit_is_answered_in_full(server: DevServer) -> None:
    """~3.9 MiB of pipelined config reads in one message: every one answered, in order."""
    n = 330_000
    read = pb.ConfigRead(device=SLOT, offset=0, size=4)
    batch = pb.FrontendMessage(
        requests=[pb.Request(seq=i + 100, config_read=read) for i in range(n)]
    ).SerializeToString()
    assert len(batch) < MAX_MESSAGE_BYTES
    async with open_channel(server.address) as channel:
        messages, code, details = await raw_bytes_stream(channel, _hello_bytes(), batch)
        assert code == grpc.StatusCode.OK, details
        replies = [
            item.reply for m in messages[1:] for item in pb.ServerMessage.FromString(m).items
        ]
        assert [r.seq for r in replies] == list(range(100, n + 100))
        assert all(r.value == testdev.VENDOR_ID | testdev.DEVICE_ID << 16 for r in replies)
        await assert_next_frontend_served(channel)
