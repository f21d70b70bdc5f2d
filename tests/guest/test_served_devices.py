"""Linux's own PCI core drives our devices: QEMU + vfio-user bridge + device server.

Each test boots a real guest (TCG) whose PCI test devices are served by a
device server in this process, and checks both sides: what the guest sees
and does, and what reached the server.
"""

from __future__ import annotations

import re

import pytest

from devmodel.v1 import devmodel_pb2 as pb
from devserver.devices import testdev
from devserver.service.server import DevServer
from vmm_client.qemu.frontend import boot_served_guest
from vmm_client.qemu.launch import GuestResult

ID = f"{testdev.VENDOR_ID:04x}:{testdev.DEVICE_ID:04x}"


pytestmark = pytest.mark.usefixtures("qemu_ready")


async def run(server: DevServer, script: str) -> GuestResult:
    result = await boot_served_guest(server.address, script, timeout=240)
    assert result.exit_status == 0, result.console
    return result


def sections(lspci: str) -> dict[str, str]:
    """`lspci -vv` output split into one text per device, by its bus address."""
    found = {}
    for block in lspci.strip().split("\n\n"):
        found[block.split()[0]] = block
    return found


async def test_lspci_shows_every_served_device_as_the_topology_says(server: DevServer) -> None:
    result = await run(server, f"lspci -vv -nn -d {ID} 2>/dev/null")
    topology = await server.servicer.GetTopology(pb.TopologyRequest(), None)
    devices = sections(result.output)
    assert len(devices) == len(topology.devices)
    for text in devices.values():
        assert f"Unclassified device [00ff]: Device [{ID}] (rev 01)" in text
        assert "Subsystem: Device [1234:0001]" in text
        assert "Interrupt: pin A" in text
        assert re.search(r"Region 0: I/O ports at [0-9a-f]+ \[size=256\]", text)
        assert re.search(
            r"Region 2: Memory at [0-9a-f]+ \(64-bit, prefetchable\) \[size=64K\]", text
        )
        assert re.search(
            r"Region 4: Memory at [0-9a-f]+ \(32-bit, non-prefetchable\) \[size=4K\]", text
        )
        assert re.search(r"Expansion ROM at [0-9a-f]+ \[disabled\] \[size=2K\]", text)
        assert "Capabilities: [40] Power Management version 3" in text
        assert "Capabilities: [48] MSI-X: Enable- Count=4" in text
        assert (
            "Vector table: BAR=4 offset=00000000" in text and "PBA: BAR=4 offset=00000800" in text
        )
        assert "Capabilities: [54] Express (v1) Endpoint" in text
        # Extended config space (>= 0x100) reached through q35's ECAM.
        assert re.search(
            r"Capabilities: \[100 v1\] Device Serial Number 00-00-00-00-5e-ed-00-0[01]", text
        )


async def test_guest_reads_and_writes_registers_through_the_stream(server: DevServer) -> None:
    script = r"""
for dev in /sys/bus/pci/devices/*; do
    [ "$(cat $dev/vendor):$(cat $dev/device)" = "0x1234:0x7e57" ] || continue
    bar2=$(sed -n 3p $dev/resource | cut -d' ' -f1)
    echo "id $(devmem $bar2 32)"
    devmem $((bar2 + 4)) 32 0xcafef00d
    echo "scratch $(devmem $((bar2 + 4)) 32)"
    echo "bar $(devmem $((bar2 + 0x10)) 32)"
    devmem $((bar2 + 0x1008)) 64 0x0123456789abcdef
    echo "ram $(devmem $((bar2 + 0x1008)) 64)"
done
"""
    result = await run(server, script)
    assert result.output.split("\n")[:5] == [
        "id 0x7E570001",
        "scratch 0xCAFEF00D",
        "bar 0x00000002",
        "ram 0x0123456789ABCDEF",
        "id 0x7E570001",
    ]
    # Both devices saw their own accesses; the guest's writes were posted.
    stats = {d.device_id: d for d in (await _stats(server)).devices}
    assert stats[1].bar_writes >= 2 and stats[5].bar_writes >= 2
    assert stats[1].bar_reads >= 4 and stats[5].bar_reads >= 4


async def test_intx_reaches_the_guest_and_bars_move_under_a_running_guest(
    server: DevServer,
) -> None:
    script = r"""
set -e
dev=/sys/bus/pci/devices/0000:01:00.0
echo "1234 7e57" > /sys/bus/pci/drivers/uio_pci_generic/new_id
count() { awk '/uio_pci_generic/ {n += $2} END {print n + 0}' /proc/interrupts; }
bar2=$(sed -n 3p $dev/resource | cut -d' ' -f1)
echo "before $(count)"
devmem $((bar2 + 8)) 32 0          # doorbell: vector 0, INTx while MSI-X is off
sleep 0.3
echo "after $(count)"
echo "status $(devmem $((bar2 + 0xc)) 32)"
devmem $((bar2 + 0xc)) 32 1        # acknowledge: the line drops
echo "acked $(devmem $((bar2 + 0xc)) 32)"
# A live move: reprogram BAR2 while memory decoding is on, as a guest may.
new=$((bar2 + 0x10000))
setpci -s 01:00.0 BASE_ADDRESS_2.L=$(printf %08x $new)
echo "moved $(printf %x $new)"
echo "id $(devmem $new 32)"
# Remove and rescan: Linux sizes and assigns the BARs again.
echo 1 > $dev/remove
echo 1 > /sys/bus/pci/rescan
sleep 0.3
bar2=$(sed -n 3p $dev/resource | cut -d' ' -f1)
echo "rescanned id $(devmem $bar2 32)"
"""
    result = await run(server, script)
    lines = dict(line.split(" ", 1) for line in result.output.splitlines() if " " in line)
    assert int(lines["after"]) == int(lines["before"]) + 1
    assert lines["status"] == "0x00000001"
    assert lines["acked"] == "0x00000000"
    assert lines["id"] == "0x7E570001"
    assert lines["rescanned"] == "id 0x7E570001"
    stats = {d.device_id: d for d in (await _stats(server)).devices}
    assert stats[1].intx_changes == 2  # raised, then lowered by the acknowledge
    moved = int(lines["moved"], 16)
    # The server saw the guest's move and reported it as a decode change.
    assert stats[1].bar_decode_changes >= 3
    assert moved > 0


async def _stats(server: DevServer) -> pb.Stats:
    return await server.servicer.GetStats(pb.StatsRequest(), None)
