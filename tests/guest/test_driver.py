"""A real Linux driver (devmodel_testdev.ko) drives the served PCI test device.

What a userspace driver cannot check without VFIO_NOIOMMU (Debian's kernel
has none): MSI-X vectors delivered through QEMU's vfio-user MSI-X emulation
and our bridge, INTx through a kernel handler, and bus-master DMA. The module
is built against the guest kernel's Debian headers (vmm_client.guest.driver;
cached, a few seconds the first time) and put into the guest as an extra file,
so other boots do not carry it. The tests skip when it cannot be built here.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

import pytest

from devmodel.v1 import devmodel_pb2 as pb
from devserver.service.server import DevServer
from vmm_client.guest.driver import (
    MODULE_NAME,
    DriverBuildError,
    build_driver,
    check_module,
    driver_files,
    insmod_command,
)
from vmm_client.guest.elf import elf_section, modinfo
from vmm_client.guest.image import resolve_kernel_version
from vmm_client.qemu.launch import GuestResult, run_in_guest
from vmm_client.vfio_user.bridge import open_bridge

# Both of the server's test devices are bound to the driver; FIRST is the
# one at device id 1 (bus 1, behind the first root port), SECOND at slot 5.
PRELUDE = rf"""
set -e
drv=/sys/bus/pci/drivers/{MODULE_NAME}
first=$drv/0000:01:00.0
second=$drv/0000:02:00.0
# try_write VALUE FILE KEY: prints "KEY accepted" or "KEY refused".
try_write() {{
    if echo "$1" > "$2" 2>/dev/null; then echo "$3 accepted"; else echo "$3 refused"; fi
}}
"""


pytestmark = pytest.mark.usefixtures("qemu_ready")


@pytest.fixture(scope="module")
def driver_ko() -> Path:
    try:
        return build_driver()
    except DriverBuildError as e:
        pytest.skip(f"cannot build {MODULE_NAME}.ko here: {e}")


async def run(
    server: DevServer,
    ko: Path,
    script: str,
    *,
    dmesg: bool = False,
    memory_mode: str = "auto",
) -> GuestResult:
    """Boots a guest served by server with the module in it; the script loads it itself.

    boot_served_guest, with the module as an extra file.
    """
    with tempfile.TemporaryDirectory(prefix="devmodel-vfu-") as directory:
        async with open_bridge(
            server.address, Path(directory), name="qemu", memory_mode=memory_mode
        ) as bridge:
            # QEMU runs in a thread: the bridge must keep answering on this loop.
            result = await asyncio.to_thread(
                run_in_guest,
                PRELUDE + script,
                bridge.qemu_args(),
                extra_files=driver_files(ko),
                timeout=240,
                dmesg=dmesg,
            )
    assert result.exit_status == 0, result.console
    return result


def values(output: str) -> dict[str, str]:
    """`key rest of line` output lines -> {key: rest}."""
    return dict(line.split(" ", 1) for line in output.splitlines() if " " in line)


async def device_stats(server: DevServer) -> dict[int, pb.DeviceStats]:
    stats: pb.Stats = await server.servicer.GetStats(pb.StatsRequest(), None)
    return {d.device_id: d for d in stats.devices}


def test_the_built_module_is_for_the_guest_kernel(driver_ko: Path) -> None:
    ko = driver_ko.read_bytes()
    info = check_module(ko, resolve_kernel_version())
    assert info["alias"] == "pci:v00001234d00007E57sv*sd*bc*sc*i*"
    assert ("parmtype", "use_msix:bool") in modinfo(ko)
    # Stripped of debug info, as modules_install INSTALL_MOD_STRIP=1 would.
    assert elf_section(ko, ".debug_info") is None


async def test_each_msix_vector_counts_exactly_its_own_doorbell(
    server: DevServer, driver_ko: Path
) -> None:
    script = f"""
{insmod_command()}
echo "mode $(cat $first/irq_mode)"
echo "param $(cat /sys/module/{MODULE_NAME}/parameters/use_msix)"
echo "start $(cat $first/irq_counts)"
for v in 0 1 2 3; do
    echo $v > $first/ring
    echo "after$v $(cat $first/irq_counts)"
done
# A vector the device does not have is refused, and raises nothing.
try_write 4 $first/ring ring4
sleep 0.2
echo "final $(cat $first/irq_counts)"
echo "second $(cat $second/irq_counts)"
grep '{MODULE_NAME}\\[0000:01:00.0\\]' /proc/interrupts | sed 's/^/proc /'
lspci -vv -s 01:00.0 | grep 'MSI-X:' | sed 's/^/lspci /'
"""
    result = await run(server, driver_ko, script)
    got = values(result.output)
    assert got["mode"] == "msix"
    assert got["param"] == "Y"
    assert got["start"] == "0 0 0 0"
    assert [got[f"after{v}"] for v in range(4)] == ["1 0 0 0", "1 1 0 0", "1 1 1 0", "1 1 1 1"]
    assert got["ring4"] == "refused"
    assert got["final"] == "1 1 1 1"  # nothing late, nothing twice
    assert got["second"] == "0 0 0 0"
    # Linux's own view: four MSI-X vectors, one interrupt each.
    procs = [line for line in result.output.splitlines() if line.startswith("proc ")]
    assert len(procs) == 4, result.output
    for v, line in enumerate(procs):
        assert re.search(rf"^proc\s+\d+:\s+1\s+PCI-MSI .*-msix{v}$", line), line
    assert "Enable+" in got["lspci"] and "Count=4" in got["lspci"]
    stats = await device_stats(server)
    assert stats[1].msis == 4
    assert stats[1].intx_changes == 0
    assert stats[5].msis == 0


async def test_intx_when_msix_is_turned_off(server: DevServer, driver_ko: Path) -> None:
    script = f"""
{insmod_command({"use_msix": 0})}
echo "mode $(cat $first/irq_mode)"
echo "param $(cat /sys/module/{MODULE_NAME}/parameters/use_msix)"
for v in 0 1 2 3; do
    echo $v > $first/ring
    echo "after$v $(cat $first/irq_counts)"
done
sleep 0.2
echo "final $(cat $first/irq_counts)"
echo "second $(cat $second/irq_counts)"
grep '{MODULE_NAME}\\[0000:01:00.0\\]' /proc/interrupts | sed 's/^/proc /'
lspci -vv -s 01:00.0 | grep 'MSI-X:' | sed 's/^/lspci /'
"""
    result = await run(server, driver_ko, script)
    got = values(result.output)
    assert got["mode"] == "intx"
    assert got["param"] == "N"
    # Counted per IRQ_STATUS cause: each doorbell shows up as its own bit.
    assert [got[f"after{v}"] for v in range(4)] == ["1 0 0 0", "1 1 0 0", "1 1 1 0", "1 1 1 1"]
    assert got["final"] == "1 1 1 1"
    assert got["second"] == "0 0 0 0"
    assert re.search(r"IO-APIC\s+\d+-fasteoi\s+\S+-intx0$", got["proc"]), got["proc"]
    assert "Enable-" in got["lspci"]
    stats = await device_stats(server)
    assert stats[1].msis == 0
    # Raised by each doorbell and lowered by the handler's acknowledge.
    assert stats[1].intx_changes == 8
    assert stats[5].intx_changes == 0


async def test_scratch_register_through_the_driver(server: DevServer, driver_ko: Path) -> None:
    script = f"""
{insmod_command()}
echo "initial $(cat $first/scratch)"
for value in 0xcafef00d 0 4294967295 305419896; do
    echo $value > $first/scratch
    echo "read$value $(cat $first/scratch)"
done
bar2=$(sed -n 3p $first/resource | cut -d' ' -f1)
echo 0x5a5a1234 > $first/scratch
echo "devmem $(devmem $((bar2 + 4)) 32)"
devmem $((bar2 + 4)) 32 0x0badcafe
echo "back $(cat $first/scratch)"
echo "other $(cat $second/scratch)"
try_write bogus $first/scratch bogus
try_write 0x100000000 $first/scratch wide
"""
    got = values((await run(server, driver_ko, script)).output)
    assert got["initial"] == "0x00000000"
    assert got["read0xcafef00d"] == "0xcafef00d"
    assert got["read0"] == "0x00000000"
    assert got["read4294967295"] == "0xffffffff"
    assert got["read305419896"] == "0x12345678"
    # The attribute and the register are one thing, seen from either side.
    assert got["devmem"] == "0x5A5A1234"
    assert got["back"] == "0x0badcafe"
    assert got["other"] == "0x00000000"
    assert got["bogus"] == "refused"
    assert got["wide"] == "refused"


async def test_unload_and_reload(server: DevServer, driver_ko: Path) -> None:
    script = f"""
{insmod_command()}
echo 0 > $first/ring
rmmod {MODULE_NAME}
echo "interrupts $(grep -c {MODULE_NAME} /proc/interrupts || true)"
echo "bound $(ls $drv 2>/dev/null | grep -c 0000: || true)"
echo "attr $([ -e /sys/bus/pci/devices/0000:01:00.0/ring ] && echo present || echo gone)"
{insmod_command({"use_msix": 0})}
echo "mode $(cat $first/irq_mode)"
echo 2 > $first/ring
echo "counts $(cat $first/irq_counts)"
rmmod {MODULE_NAME}
{insmod_command()}
echo "mode2 $(cat $first/irq_mode)"
echo 3 > $first/ring
echo "counts2 $(cat $first/irq_counts)"
rmmod {MODULE_NAME}
echo "unloaded $([ -d /sys/module/{MODULE_NAME} ] && echo no || echo yes)"
"""
    result = await run(server, driver_ko, script, dmesg=True)
    got = values(result.output)
    assert got["interrupts"] == "0"
    assert got["bound"] == "0"
    assert got["attr"] == "gone"
    assert got["mode"] == "intx"
    assert got["counts"] == "0 0 1 0"
    assert got["mode2"] == "msix"
    assert got["counts2"] == "0 0 0 1"
    assert got["unloaded"] == "yes"
    assert result.dmesg is not None
    # No warnings, oopses or leaked IRQs on the way (the taint notes are expected).
    for bad in ("WARNING", "BUG", "Oops", "Trying to free", "still in use", "nobody cared"):
        assert bad not in result.dmesg, result.dmesg


@pytest.mark.parametrize(
    ("use_msix", "memory_mode"),
    [(1, "shared"), (0, "shared"), (1, "messages")],
    ids=["msix-shared", "intx-shared", "msix-messages"],
)
async def test_dma_round_trip(
    server: DevServer, driver_ko: Path, use_msix: int, memory_mode: str
) -> None:
    """Guest memory -> device RAM -> guest memory, checked by the driver byte for byte.

    memory_mode is the bridge's: "shared" (the server maps guest RAM itself)
    or "messages" (a DmaRequest per transfer, served by the bridge).
    """
    script = f"""
{insmod_command({"use_msix": use_msix})}
echo "mode $(cat $first/irq_mode)"
echo "before $(cat $first/dma_test)"
echo "counts0 $(cat $first/irq_counts)"
try_write 0 $first/dma_test len0
try_write 4097 $first/dma_test len4097
# Stop at the first failure: a hung transfer costs the driver's 10 s timeout.
for n in 1 61 4096; do
    echo $n > $first/dma_test
    r=$(cat $first/dma_test)
    echo "dma$n $r"
    [ "$r" = ok ] || break
done
echo "counts1 $(cat $first/irq_counts)"
"""
    result = await run(server, driver_ko, script, memory_mode=memory_mode)
    got = values(result.output)
    assert got["mode"] == ("msix" if use_msix else "intx")
    assert got["before"] == "not run"
    assert got["len0"] == "refused" and got["len4097"] == "refused"
    for n in (1, 61, 4096):
        assert got.get(f"dma{n}") == "ok", f"{result.output}\n{await device_stats(server)}"
    # Six transfers, each completing on vector 1 (or IRQ_STATUS bit 1), only.
    assert got["counts0"] == "0 0 0 0"
    assert got["counts1"] == "0 6 0 0"
    stats = await device_stats(server)
    assert (stats[1].dma_requests, stats[1].dma_errors) == (6, 0)
    assert stats[5].dma_requests == 0


async def test_dma_without_bus_mastering_fails_with_the_devices_error(
    server: DevServer, driver_ko: Path
) -> None:
    # INTx: without Bus Master Enable a function may not send MSI-X messages
    # (they are memory writes) either, so the completion would never arrive.
    script = f"""
{insmod_command({"use_msix": 0})}
setpci -s 01:00.0 COMMAND=0:4      # Bus Master Enable off, behind the driver's back
echo 16 > $first/dma_test
echo "off $(cat $first/dma_test)"
setpci -s 01:00.0 COMMAND=4:4
echo 16 > $first/dma_test
echo "on $(cat $first/dma_test)"
"""
    got = values((await run(server, driver_ko, script)).output)
    # The device refuses at once and says so in DMA_STATUS; the driver reports it.
    assert got["off"] == "to device: device reported an error (status 0x4)"
    assert got["on"] == "ok"
    # The refused command never reached the bus; the round trip after it did.
    stats = await device_stats(server)
    assert stats[1].dma_requests - stats[1].dma_errors == 2, stats[1]
