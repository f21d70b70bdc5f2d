"""Shared-memory BARs become memslots that follow BarDecodeChanged events."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from devserver.effects import AddressRange, BarDecodeChanged, BarKind, SharedMemory
from vmm_client.kvm.boot import LOAD_ADDRESS, enter_long_mode, load_program
from vmm_client.kvm.devices import DEBUG_EXIT_PORT, DebugExit, PciHost
from vmm_client.kvm.vm import Vm

pytestmark = pytest.mark.kvm

SIZE = 0x10000
A, B = 0x4000_0000, 0x5000_0000  # below 2 GiB: the guests use disp32 addresses


@pytest.fixture
def framebuffer() -> Iterator[SharedMemory]:
    fd = os.memfd_create("fb", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, struct.pack("<I", 0xF00DFACE), 0x100)
    try:
        yield SharedMemory(f"/proc/self/fd/{fd}", 0, SIZE)
    finally:
        os.close(fd)


def event(
    generation: int, old: int | None, new: int | None, backing: SharedMemory
) -> BarDecodeChanged:
    return BarDecodeChanged(
        device_id=3,
        bar=1,
        kind=BarKind.MEM32,
        prefetchable=True,
        old=AddressRange(old, SIZE) if old is not None else None,
        new=AddressRange(new, SIZE) if new is not None else None,
        backing=backing,
        generation=generation,
    )


def read_at(vm: Vm, address: int) -> tuple[int | None, dict[str, int]]:
    code = b"\x8b\x04\x25" + struct.pack("<I", address) + b"\xe7" + bytes((DEBUG_EXIT_PORT,))
    load_program(vm.ram, code)
    if not vm.vcpus:
        vm.create_vcpu()
    enter_long_mode(vm.vcpus[0], LOAD_ADDRESS)
    before = dict(vm.exit_counts())
    result = vm.run(10)
    return result.status, {k: n - before.get(k, 0) for k, n in result.exits.items()}


def test_shared_bar_memslot_follows_the_bar(framebuffer: SharedMemory) -> None:
    with Vm(4 << 20) as vm:
        vm.pio.add(range(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 4), DebugExit())
        pci = PciHost(vm)
        try:
            pci.handle_event(event(1, None, A, framebuffer))
            status, exits = read_at(vm, A + 0x100)
            assert status == 0xF00DFACE
            assert exits == {"IO": 1}  # the read hit the memslot: no MMIO exit

            pci.handle_event(event(2, A, B, framebuffer))
            slot = pci.shared_bars.slot_of(3, 1)
            assert slot is not None and vm.memslots[slot].guest_address == B
            assert read_at(vm, B + 0x100)[0] == 0xF00DFACE
            # The old address is unbacked and unrouted now: an MMIO exit, all-ones.
            status, exits = read_at(vm, A + 0x100)
            assert (status, exits.get("MMIO")) == (0xFFFF_FFFF, 1)

            pci.handle_event(event(3, B, None, framebuffer))
            assert pci.shared_bars.slot_of(3, 1) is None
            assert read_at(vm, B + 0x100)[0] == 0xFFFF_FFFF
            assert list(vm.memslots) == [0]  # only RAM is left
            assert [(c.action, c.slot, c.guest_address) for c in pci.shared_bars.changes] == [
                ("map", slot, A),
                ("move", slot, B),
                ("unmap", slot, B),
            ]
        finally:
            pci.shared_bars.close()
