"""Guest RAM around the 32-bit PCI hole: the layout (pure), its memslots, and a
guest program using RAM above 4 GiB through the CPU and the device's DMA."""

from __future__ import annotations

import asyncio
import struct

import pytest

from devserver.service.server import DevServer
from vmm_client.kvm import linux
from vmm_client.kvm.boot import mapped_gib
from vmm_client.kvm.ramlayout import (
    FOUR_GIB,
    PCI_HOLE_START,
    RamRegion,
    file_offset,
    ram_regions,
    ram_top,
)
from vmm_client.kvm.runner import run_program
from vmm_client.kvm.vm import Vm

MiB = 1 << 20
GiB = 1 << 30


def test_small_ram_is_one_region() -> None:
    assert ram_regions(64 * MiB) == (RamRegion(0, 64 * MiB, 0),)
    assert ram_regions(PCI_HOLE_START) == (RamRegion(0, PCI_HOLE_START, 0),)
    assert ram_top(64 * MiB) == 64 * MiB


def test_ram_past_the_hole_continues_at_4_gib() -> None:
    low, high = ram_regions(4 * GiB)
    assert low == RamRegion(0, 3 * GiB, 0)
    assert high == RamRegion(FOUR_GIB, 1 * GiB, 3 * GiB)  # the file's next bytes
    assert ram_top(4 * GiB) == 5 * GiB
    assert sum(r.size for r in ram_regions(8 * GiB)) == 8 * GiB
    with pytest.raises(ValueError):
        ram_regions(0)


def test_file_offsets_refuse_the_hole_and_crossings() -> None:
    regions = ram_regions(4 * GiB)
    assert file_offset(regions, 0x1000, 8) == 0x1000
    assert file_offset(regions, FOUR_GIB, 8) == 3 * GiB
    assert file_offset(regions, 5 * GiB - 8, 8) == 4 * GiB - 8  # the last bytes: fine
    assert file_offset(regions, 5 * GiB - 4, 8) is None  # runs past the end
    assert file_offset(regions, PCI_HOLE_START, 4) is None  # the hole is not RAM
    assert file_offset(regions, PCI_HOLE_START - 4, 8) is None  # into the hole
    assert file_offset(regions, -1, 1) is None


@pytest.mark.parametrize("ram", [512 * MiB, 3 * GiB, 4 * GiB, 8 * GiB])
def test_e820_ram_is_the_memslots(ram: int) -> None:
    usable = [e for e in linux.e820_map(ram) if e.kind == linux.E820_RAM]
    regions = ram_regions(ram)
    # Every RAM entry lies in a region; the regions' bytes are all described
    # except the legacy hole [0x9FC00, 1 MiB) of the first.
    for e in usable:
        assert file_offset(regions, e.address, e.size) is not None, e
    assert sum(e.size for e in usable) == ram - (linux.HIGH_MEMORY - linux.EBDA_START)
    assert usable[-1].end == regions[-1].end
    zp = linux.build_zero_page(linux.BootParams(ram, 2047))
    entries = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(zp[0x1E8])]
    assert entries == [(e.address, e.size, e.kind) for e in linux.e820_map(ram)]


def test_the_page_tables_cover_high_ram() -> None:
    assert mapped_gib(64 * MiB) == 4
    assert mapped_gib(4 * GiB) == 5
    assert mapped_gib(64 * GiB) == 16  # capped: page directories stop below 0x20000


@pytest.mark.kvm
def test_vm_with_high_ram_has_two_memslots() -> None:
    with Vm(3 * GiB + 2 * MiB) as vm:
        assert [(s.guest_address, s.size) for s in vm.memslots.values()] == [
            (0, 3 * GiB),
            (FOUR_GIB, 2 * MiB),
        ]
        assert vm.memslots[1].host_address == vm.ram.address + 3 * GiB
        vm.write_guest(FOUR_GIB + 16, b"high")
        assert vm.ram.read(3 * GiB + 16, 4) == b"high"  # one file, no hole in it
        with pytest.raises(ValueError, match="not guest RAM"):
            vm.read_guest(PCI_HOLE_START, 4)


@pytest.mark.kvm
async def test_pcitest_with_4_gib(pcitest_elf: bytes, server: DevServer) -> None:
    """-m 4G: RAM above 4 GiB is a second memslot and a second region of the server's
    map; the guest writes its last bytes, the device reads them by DMA and writes
    its first bytes, which the VMM then finds in its own mapping."""
    run = await asyncio.to_thread(
        run_program,
        pcitest_elf,
        server.address,
        memory=4 * GiB,
        output=lambda b: None,
        timeout=120,
        keep_ram=(FOUR_GIB, 64),
    )
    assert run.result.ok, run.output
    assert "HIGHRAM 0x100000000 size=0x40000000" in run.output
    assert "CHECK high-ram-dma-to-guest-mismatches got=0x0 want=0x0 ok" in run.output
    assert run.memslots[1].guest_address == FOUR_GIB and run.memslots[1].size == GiB
    # What the device wrote (slot 1's pattern), seen from the VMM's side of the memfd.
    assert run.ram == struct.pack("<16I", *(0x4849_0000 + i + 1 for i in range(16)))
