"""The freestanding PCI test program in our KVM VMM against a real device server.

The guest enumerates, sizes, assigns, enables, uses and moves BARs through
0xCF8/0xCFC, port IO and MMIO, takes MSI-X and INTx (IOAPIC -> LAPIC), on 1
and 2 vCPUs; every access crosses the gRPC stream. Checked from three sides:
what the guest printed, what the server counted and reports as topology, and
the frontend's routing table, interrupt lines and memslots.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from typing import Any

import pytest

from devserver.devices import testdev
from devserver.effects import AddressRange
from devserver.service.server import DevServer
from vmm_client.client import get_stats, get_topology, open_channel
from vmm_client.kvm.boot import enter_long_mode, load_program
from vmm_client.kvm.devices import DEBUG_EXIT_PORT, DebugExit, PciHost
from vmm_client.kvm.runner import GuestRun, run_program
from vmm_client.kvm.vm import Vm

pytestmark = pytest.mark.kvm

BAR_LINE = re.compile(r"^BAR (\d+) (\d) (\w+)( pref)? size=(0x[0-9a-f]+) addr=(0x[0-9a-f]+)$", re.M)
MOVED_LINE = re.compile(r"^MOVED (\d+) (\d) (0x[0-9a-f]+) -> (0x[0-9a-f]+)$", re.M)
CHECK_LINE = re.compile(r"^CHECK (\S+) got=(\S+) want=(\S+) (ok|FAIL)$", re.M)


async def run_guest(
    image: bytes, server: DevServer, *, user: bool = False, ncpus: int = 1, **kwargs: Any
) -> GuestRun:
    # The vCPUs block; the server must keep serving on this loop.
    return await asyncio.to_thread(
        run_program,
        image,
        server.address,
        output=lambda b: None,
        timeout=120,
        user=user,
        ncpus=ncpus,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("user", "ncpus"),
    [(False, 1), (True, 1), (False, 2), (True, 2)],
    ids=["ring0", "ring3", "ring0-smp2", "ring3-smp2"],
)
async def test_pcitest_against_the_device_server(
    pcitest_elf: bytes, server: DevServer, user: bool, ncpus: int
) -> None:
    run = await run_guest(pcitest_elf, server, user=user, ncpus=ncpus)
    out = run.output

    # The guest's side: every check passed and it said so with its exit status.
    assert run.result.reason == "exit-port", (run.result, out)
    checks = CHECK_LINE.findall(out)
    failed = [c for c in checks if c[3] != "ok"]
    assert not failed, out
    assert run.result.status == 0
    assert "pcitest: 2 devices, 0 failures" in out
    assert f"pcitest: start, {ncpus} cpu" in out
    assert out.count("CHECK id-io ") == 2 and out.count("CHECK old-address-dead ") == 2
    assert out.count("CHECK dma-to-guest-mismatches got=0x0 want=0x0 ok") == 2
    assert "SKIP" not in out
    assert re.search(r"^PCI 00:01\.0 id=0x7e571234 class=0xff00", out, re.M)
    assert re.search(r"^PCI 00:05\.0 id=0x7e571234", out, re.M)
    assert re.search(r"^ROM 1 size=0x800$", out, re.M)

    # The sizes the guest found are the device's.
    bars = {
        (int(s), int(b)): (k, int(size, 16), int(addr, 16))
        for s, b, k, _p, size, addr in BAR_LINE.findall(out)
    }
    assert {(s, b): (k, size) for (s, b), (k, size, _a) in bars.items()} == {
        (slot, bar): kind
        for slot in (1, 5)
        for bar, kind in ((0, ("io", 0x100)), (2, ("mem64", 0x10000)), (4, ("mem32", 0x1000)))
    }

    # The frontend's routing table follows the guest's final assignment,
    # including the moves (device ids are slots in this server).
    moved = {(int(s), int(b)): int(new, 16) for s, b, _old, new in MOVED_LINE.findall(out)}
    assert set(moved) == {(1, 2), (5, 2)}
    expected = {key: AddressRange(addr, size) for key, (_k, size, addr) in bars.items()}
    for key, new in moved.items():
        expected[key] = AddressRange(new, expected[key].size)
    assert run.routing.ranges() == expected

    # MSIs: one doorbell per device, injected and accepted by the guest's LAPIC;
    # with a second vCPU (ring 0) one more per device, aimed at that vCPU's LAPIC.
    msis_per_device = 2 if ncpus > 1 and not user else 1
    assert run.msis == 2 * msis_per_device and run.msis_delivered == run.msis

    # INTx: both devices' INTA# swizzle onto GSI 17 (slots 1 and 5); each raised it
    # twice (a DMA completion, then a doorbell with MSI-X off), and each time the
    # level reached KVM_IRQ_LINE up, then down on the guest's acknowledgement.
    assert run.intx_gsis == {1: 17, 5: 17}
    assert run.irq_lines == [(17, True), (17, False)] * 4
    assert re.findall(r"^INTX (\d+) pin=1 gsi=(\d+)$", out, re.M) == [("1", "17"), ("5", "17")]
    if not user:
        assert out.count("CHECK intx-received got=0x1 want=0x1 ok") == 2
        assert out.count("CHECK intx-cause got=0x8 want=0x8 ok") == 2
        assert out.count("CHECK intx-level-triggered got=0x1 want=0x1 ok") == 2
    if ncpus > 1:
        # The second vCPU read both devices' ID 16 times through their IO BARs while
        # the first one worked: concurrent exits, all answered right.
        assert "CHECK ap-reads-ok got=0x20 want=0x20 ok" in out
        assert ("CHECK msi-to-cpu got=0x1 want=0x1 ok" in out) is not user

    # The server's side.
    async with open_channel(server.address) as channel:
        stats = await get_stats(channel)
        topology = await get_topology(channel)
    assert sorted((d.bus, d.device, d.vendor_id, d.product_id) for d in topology.devices) == [
        (0, 1, testdev.VENDOR_ID, testdev.DEVICE_ID),
        (0, 5, testdev.VENDOR_ID, testdev.DEVICE_ID),
    ]
    per_device = {d.device_id: d for d in stats.devices}
    for slot in (1, 5):
        device = per_device[slot]
        assert device.msis == msis_per_device
        assert device.config_writes > 10 and device.config_reads > 20
        # id io/mem, bar index io/mem, scratch x2, ram, moved x2, doorbell; DMA: status
        # x2 (more if the guest had to spin), device RAM, IRQ_STATUS
        assert device.bar_reads >= 14
        # scratch x2, ram, 4 MSI-X table words, doorbell; DMA: 16 device-RAM words,
        # address x2, length, command x2, status acks x2, IRQ_STATUS ack; INTx:
        # doorbell, IRQ_STATUS ack; an MSI at the other vCPU: 4 table words,
        # doorbell, mask. kvm_pvm may run the INTx handler a second time (it does
        # not move the vector from IRR to ISR; pcitest.c), whose ack writes 0.
        writes = 8 + 24 + 2 + (6 if msis_per_device > 1 else 0)
        assert writes <= device.bar_writes <= writes + (0 if user else 1)
        # Guest RAM is shared with the server: both transfers reached it.
        assert (device.dma_requests, device.dma_errors) == (2, 0)
        # INTx up and down twice: DMA completions before MSI-X was on, and a
        # doorbell after it was turned off again.
        assert device.intx_changes == 4
        # IO, MEM64 and MEM32 start decoding, the MEM64 BAR moves twice (low then high
        # dword: only the low write changes the address here)
        assert device.bar_decode_changes >= 4
    assert stats.sessions_total == 1 and not stats.attached
    assert run.config_accesses == sum(d.config_reads + d.config_writes for d in stats.devices) + (
        32 - 2  # vendor-id reads of the 30 empty slots reach the server but no device
    )


async def test_config_read_through_the_whole_path(server: DevServer) -> None:
    """Measure: guest `in` from 0xCFC -> PIO exit -> SyncSession -> gRPC -> server -> back."""
    n = 500
    code = b"\x66\xba\xf8\x0c"  # mov dx, 0xcf8
    code += b"\xb8" + struct.pack("<I", 0x8000_0800)  # mov eax, 00:01.0 reg 0
    code += b"\xef"  # out dx, eax
    code += b"\x66\xba\xfc\x0c"  # mov dx, 0xcfc
    code += b"\xb9" + struct.pack("<I", n)  # mov ecx, n
    code += b"\xed\xff\xc9\x75\xfb"  # loop: in eax, dx; dec ecx; jnz loop
    code += b"\xe7" + bytes((DEBUG_EXIT_PORT,))  # out 0xf4, eax: the last value read

    def drive() -> tuple[int | None, float]:
        from vmm_client.client import FrontendOptions, SyncSession

        with Vm(4 << 20) as vm:
            vm.pio.add(range(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 4), DebugExit())
            pci = PciHost(vm)
            with SyncSession(server.address, FrontendOptions("bench"), pci.handle_event) as s:
                pci.attach(s)
                load_program(vm.ram, code)
                enter_long_mode(vm.create_vcpu(), 0x100000)
                start = time.perf_counter()
                result = vm.run(60)
                return result.status, time.perf_counter() - start

    status, seconds = await asyncio.to_thread(drive)
    assert status == testdev.DEVICE_ID << 16 | testdev.VENDOR_ID
    print(f"\nconfig read through the whole path: {seconds / n * 1e6:.0f} us ({n} reads)")


async def test_without_shared_memory_dma_is_refused(pcitest_elf: bytes, server: DevServer) -> None:
    run = await asyncio.to_thread(
        run_program, pcitest_elf, server.address, output=lambda b: None, share_memory=False
    )
    assert run.result.ok, run.output
    assert run.output.count("SKIP dma: the engine reports ERROR") == 2
