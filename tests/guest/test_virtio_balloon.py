"""Linux's virtio_balloon driver on our device (virtio 1.2 §5.5): QEMU + vfio-user
bridge + device server, driven by the Balloon RPC while the guest runs.

The guest dirties memory first (a file in its tmpfs, removed again) so that
the pages it later gives the balloon are backed in QEMU's RAM memfd; then it
waits for /proc/vmstat's balloon_inflate and balloon_deflate counters (with
DEFLATE_ON_OOM, Linux leaves MemTotal alone). The host sets a 64 MiB target,
polls the RPC until the driver's `actual` is 64 MiB, checks in shared mode
that the server freed the pages (the memfd's allocated blocks drop), then sets
0 and polls until the guest holds nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest

from devmodel.v1 import devmodel_pb2 as pb
from devmodel.v1 import devmodel_pb2_grpc
from devserver.config import parse_device_spec
from devserver.service.guest_memory import SharedGuestMemory
from devserver.service.server import DevServer, Listen
from vmm_client.qemu.frontend import boot_served_guest

pytestmark = pytest.mark.usefixtures("qemu_ready")

MIB = 1 << 20
TARGET = 64 * MIB
PAGES = TARGET // 4096
POLL_S = 300.0  # TCG on a shared 2-core machine; a bound, not a measurement

SCRIPT = f"""
set -e
vm() {{ v=$(grep "^$1 " /proc/vmstat | cut -d' ' -f2); echo "${{v:-0}}"; }}
ls /sys/bus/virtio/drivers/virtio_balloon | grep -q virtio && echo bound=yes
dd if=/dev/zero of=/tmp/fill bs=1M count=160 2>/dev/null
rm /tmp/fill
echo BALLOON-READY
i=0
while [ "$(vm balloon_inflate)" -lt {PAGES} ] && [ $i -lt {int(POLL_S)} ]; do
    sleep 1; i=$((i+1))
done
echo inflated=$(vm balloon_inflate)
i=0
while [ "$(vm balloon_deflate)" -lt {PAGES} ] && [ $i -lt {int(POLL_S)} ]; do
    sleep 1; i=$((i+1))
done
echo deflated=$(vm balloon_deflate)
"""


def value(output: str, key: str) -> str:
    for line in output.splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{key}= not in guest output:\n{output}")


def ram_file(srv: DevServer) -> str | None:
    """The largest guest RAM file the server maps (QEMU's memfd via the bridge)."""
    session = srv.servicer._session
    if session is None or not isinstance(session.memory, SharedGuestMemory):
        return None
    regions = [entry.value.region for entry in session.memory.regions]
    return max(regions, key=lambda r: r.size).path if regions else None


async def poll(
    stub: devmodel_pb2_grpc.DeviceModelStub, device_id: int, actual: int
) -> pb.BalloonReply:
    deadline = time.monotonic() + POLL_S
    while True:
        reply: pb.BalloonReply = await stub.Balloon(
            pb.BalloonRequest(device_id=device_id), timeout=60
        )
        if reply.actual_bytes == actual or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("memory_mode", ["shared", "messages"])
async def test_a_target_inflates_and_deflates_the_guest(tmp_path: Path, memory_mode: str) -> None:
    srv = DevServer(
        [parse_device_spec("virtio-balloon,slot=6")],
        Listen(unix_path=tmp_path / "run" / "balloon.sock"),
    )
    await srv.start()
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    console: list[str] = []

    def on_output(text: str) -> None:
        console.append(text)
        if not ready.is_set() and "BALLOON-READY" in "".join(console):
            loop.call_soon_threadsafe(ready.set)

    found: dict[str, object] = {}

    async def control() -> None:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = devmodel_pb2_grpc.DeviceModelStub(channel)
            await ready.wait()
            topology = await stub.GetTopology(pb.TopologyRequest(), timeout=60)
            device_id = next(d.device_id for d in topology.devices if d.type == "virtio-balloon")
            path = ram_file(srv)
            before = os.stat(path).st_blocks if path else 0
            set_reply = await stub.Balloon(
                pb.BalloonRequest(device_id=device_id, target_bytes=TARGET), timeout=60
            )
            found["target"] = set_reply.target_bytes
            inflated = await poll(stub, device_id, TARGET)
            found["inflated"] = inflated
            if path:
                found["freed_bytes"] = (before - os.stat(path).st_blocks) * 512
            await stub.Balloon(pb.BalloonRequest(device_id=device_id, target_bytes=0), timeout=60)
            found["deflated"] = await poll(stub, device_id, 0)

    try:
        task = asyncio.create_task(control())
        result = await boot_served_guest(
            srv.address,
            SCRIPT,
            timeout=POLL_S * 2 + 300,
            memory_mode=memory_mode,
            on_output=on_output,
        )
        await asyncio.wait_for(task, 60)
    finally:
        await srv.stop(0)
    assert result.exit_status == 0, result.output
    assert value(result.output, "bound") == "yes"
    assert int(value(result.output, "inflated")) >= PAGES
    assert int(value(result.output, "deflated")) >= PAGES
    assert found["target"] == TARGET
    inflated = found["inflated"]
    assert isinstance(inflated, pb.BalloonReply)
    assert inflated.actual_bytes == TARGET and inflated.driver_ok
    assert "total-memory" in inflated.stats  # Linux's stats reached the reply
    deflated = found["deflated"]
    assert isinstance(deflated, pb.BalloonReply)
    assert deflated.actual_bytes == 0
    if memory_mode == "shared":
        assert inflated.pages_freed >= PAGES
        # Not all 64 MiB need have been backed; the dirtied 160 MiB make most so.
        freed = found["freed_bytes"]
        assert isinstance(freed, int) and freed >= TARGET // 4, freed
    else:
        assert inflated.pages_freed == 0  # nothing to free with DMA messages
