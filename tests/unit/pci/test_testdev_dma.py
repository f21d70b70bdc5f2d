"""The PCI test device's DMA engine, driven through the bus with a bytearray as guest RAM.

`Shell` plays the part of the gRPC shell in SHARED mode (carry out every
DmaRequested at once, feed dma_completed) or of a frontend that answers later
(hold the requests until the test completes them).
"""

from __future__ import annotations

import pytest

from devserver.devices.testdev import (
    DMA_CMD_FROM_GUEST,
    DMA_CMD_TO_GUEST,
    DMA_STATUS_BUSY,
    DMA_STATUS_DONE,
    DMA_STATUS_ERROR,
    DMA_VECTOR,
    IO_BAR,
    MEM_BAR,
    MSIX_BAR,
    RAM_OFFSET,
    REG_DMA_ADDR_HI,
    REG_DMA_ADDR_LO,
    REG_DMA_CMD,
    REG_DMA_LEN,
    REG_DMA_STATUS,
    REG_IRQ_STATUS,
    PciTestDevice,
)
from devserver.effects import DmaRequested, Effect, IntxChanged, MsiRaised
from devserver.memory import BytearrayMemory, perform_dma
from devserver.pci.bus import PciBus
from devserver.pci.regs import PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_MSIX_FLAGS_ENABLE
from tests.strategies import SLOT_A, cfg_write, set_command

GUEST = 0x10_0000  # guest RAM [1 MiB, 1 MiB + 64 KiB)
RAM_SIZE = 0x1_0000
REGISTER_BARS = pytest.mark.parametrize("bar", [IO_BAR, MEM_BAR], ids=["io", "mem"])


class Shell:
    def __init__(self, bus: PciBus, memory: BytearrayMemory, *, immediate: bool = True) -> None:
        self.bus = bus
        self.memory = memory
        self.immediate = immediate
        self.held: list[DmaRequested] = []
        self.requests: list[DmaRequested] = []

    def run(self, effects: list[Effect]) -> list[Effect]:
        """What the frontend would see: DMA requests carried out (or held), the rest kept."""
        out: list[Effect] = []
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if not isinstance(effect, DmaRequested):
                out.append(effect)
                continue
            self.requests.append(effect)
            if not self.immediate:
                self.held.append(effect)
                continue
            data, error = perform_dma(self.memory, effect)
            queue[0:0] = self.bus.function(effect.device_id).dma_completed(
                effect.token, data, error
            )
        return out

    def complete(
        self, request: DmaRequested, data: bytes | None, error: str | None
    ) -> list[Effect]:
        self.held.remove(request)
        return self.run(
            self.bus.function(request.device_id).dma_completed(request.token, data, error)
        )

    def write(
        self, register: int, value: int, *, bar: int = MEM_BAR, size: int = 4
    ) -> list[Effect]:
        return self.run(self.bus.bar_write(SLOT_A, bar, register, size, value))

    def read(self, register: int, *, bar: int = MEM_BAR) -> int:
        return self.bus.bar_read(SLOT_A, bar, register, 4)

    def program(self, address: int, length: int, *, bar: int = MEM_BAR) -> None:
        assert self.write(REG_DMA_ADDR_LO, address & 0xFFFF_FFFF, bar=bar) == []
        assert self.write(REG_DMA_ADDR_HI, address >> 32, bar=bar) == []
        assert self.write(REG_DMA_LEN, length, bar=bar) == []

    def command(self, command: int, *, bar: int = MEM_BAR) -> list[Effect]:
        return self.write(REG_DMA_CMD, command, bar=bar)

    def status(self) -> int:
        return self.read(REG_DMA_STATUS)


@pytest.fixture
def memory() -> BytearrayMemory:
    return BytearrayMemory(RAM_SIZE, base=GUEST)


@pytest.fixture
def shell(bus: PciBus, memory: BytearrayMemory) -> Shell:
    set_command(bus, SLOT_A, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    return Shell(bus, memory)


INTX_UP = [IntxChanged(SLOT_A, 1, True)]


# -- both directions


@REGISTER_BARS
def test_copy_from_guest_memory_into_device_ram(
    shell: Shell, memory: BytearrayMemory, dev: PciTestDevice, bar: int
) -> None:
    memory.data[0x100:0x110] = b"guest to device!"
    shell.program(GUEST + 0x100, 16, bar=bar)
    assert shell.command(DMA_CMD_FROM_GUEST, bar=bar) == INTX_UP
    assert dev.ram[:16] == b"guest to device!"
    assert shell.status() == DMA_STATUS_DONE
    # The guest sees the bytes through BAR2's RAM window.
    assert shell.read(RAM_OFFSET) == int.from_bytes(b"gues", "little")
    assert shell.requests == [DmaRequested(SLOT_A, 1, GUEST + 0x100, 16, False)]


def test_copy_device_ram_to_guest_memory(
    shell: Shell, memory: BytearrayMemory, dev: PciTestDevice
) -> None:
    shell.run(
        shell.bus.bar_write(SLOT_A, MEM_BAR, RAM_OFFSET, 8, int.from_bytes(b"to guest", "little"))
    )
    shell.program(GUEST + RAM_SIZE - 8, 8)  # ends exactly at the end of RAM: fine
    assert shell.command(DMA_CMD_TO_GUEST) == INTX_UP
    assert memory.data[-8:] == b"to guest"
    assert shell.status() == DMA_STATUS_DONE
    assert shell.requests[0].write and shell.requests[0].data == b"to guest"


def test_a_full_page_round_trip(shell: Shell, memory: BytearrayMemory, dev: PciTestDevice) -> None:
    pattern = bytes(range(256)) * 16
    memory.data[0x2000:0x3000] = pattern
    shell.program(GUEST + 0x2000, 4096)
    shell.command(DMA_CMD_FROM_GUEST)
    assert bytes(dev.ram) == pattern
    shell.write(REG_IRQ_STATUS, 1 << DMA_VECTOR)
    shell.program(GUEST + 0x8000, 4096)
    shell.command(DMA_CMD_TO_GUEST)
    assert memory.data[0x8000:0x9000] == pattern


def test_dma_address_as_one_qword_write(shell: Shell, memory: BytearrayMemory) -> None:
    """An 8-byte write fills DMA_ADDR_LO and DMA_ADDR_HI (Linux's lo_hi_writeq)."""
    shell.write(REG_DMA_ADDR_LO, 0x1_2345_6789, size=8)
    assert shell.read(REG_DMA_ADDR_LO) == 0x2345_6789
    assert shell.read(REG_DMA_ADDR_HI) == 0x1


# -- refusals: error status, an interrupt, nothing moved


def test_without_bus_master_enable_nothing_moves(
    bus: PciBus, memory: BytearrayMemory, dev: PciTestDevice
) -> None:
    set_command(bus, SLOT_A, PCI_COMMAND_MEMORY)
    shell = Shell(bus, memory)
    memory.data[:4] = b"nope"
    shell.program(GUEST, 4)
    assert shell.command(DMA_CMD_FROM_GUEST) == INTX_UP
    assert shell.status() == DMA_STATUS_ERROR
    assert shell.requests == [] and dev.ram[:4] == bytes(4)
    assert "bus mastering" in dev.dma_error


@pytest.mark.parametrize("length", [0, 4097, 0xFFFF_FFFF])
def test_bad_length_fails_without_a_request(shell: Shell, dev: PciTestDevice, length: int) -> None:
    shell.program(GUEST, length)
    assert shell.command(DMA_CMD_TO_GUEST) == INTX_UP
    assert shell.status() == DMA_STATUS_ERROR
    assert shell.requests == []
    assert "DMA_LEN" in dev.dma_error


@pytest.mark.parametrize(
    "address",
    [0, GUEST - 1, GUEST + RAM_SIZE - 15, GUEST + RAM_SIZE, 0xFFFF_FFFF_0000_0000],
    ids=["zero", "below", "runs-off-the-end", "past-the-end", "high"],
)
def test_address_outside_guest_memory_is_an_error_status(
    shell: Shell, memory: BytearrayMemory, dev: PciTestDevice, address: int
) -> None:
    shell.program(address, 16)
    assert shell.command(DMA_CMD_TO_GUEST) == INTX_UP
    assert shell.status() == DMA_STATUS_ERROR
    assert memory.data == bytes(RAM_SIZE)
    assert "guest RAM" in dev.dma_error or "hole" in dev.dma_error


def test_range_wrapping_past_2_to_the_64_never_reaches_the_shell(
    shell: Shell, dev: PciTestDevice
) -> None:
    shell.program(0xFFFF_FFFF_FFFF_F000, 0x1000)  # ends exactly at 2^64: a valid range
    shell.command(DMA_CMD_FROM_GUEST)
    assert len(shell.requests) == 1  # (outside our RAM, so it fails there)
    shell.write(REG_DMA_STATUS, DMA_STATUS_ERROR)
    shell.program(0xFFFF_FFFF_FFFF_FFF0, 0x20)
    shell.command(DMA_CMD_FROM_GUEST)
    assert len(shell.requests) == 1
    assert shell.status() == DMA_STATUS_ERROR and "wraps" in dev.dma_error


def test_unknown_commands_are_ignored(shell: Shell) -> None:
    shell.program(GUEST, 4)
    for command in (0, 3, 0xFFFF_FFFF):
        assert shell.command(command) == []
    assert shell.status() == 0 and shell.requests == []


# -- busy, status, completion from a frontend that answers later


def test_busy_until_the_shell_completes_and_commands_meanwhile_are_ignored(
    bus: PciBus, memory: BytearrayMemory, dev: PciTestDevice
) -> None:
    set_command(bus, SLOT_A, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    shell = Shell(bus, memory, immediate=False)
    shell.program(GUEST, 4)
    assert shell.command(DMA_CMD_FROM_GUEST) == []  # no interrupt yet
    assert shell.status() == DMA_STATUS_BUSY
    assert shell.command(DMA_CMD_TO_GUEST) == []  # ignored while busy
    shell.write(REG_DMA_STATUS, DMA_STATUS_BUSY | DMA_STATUS_DONE)  # BUSY is not W1C
    assert shell.status() == DMA_STATUS_BUSY
    (request,) = shell.held
    assert shell.complete(request, b"late", None) == INTX_UP
    assert shell.status() == DMA_STATUS_DONE and dev.ram[:4] == b"late"
    assert len(shell.requests) == 1


def test_a_failed_or_short_completion_is_an_error(
    bus: PciBus, memory: BytearrayMemory, dev: PciTestDevice
) -> None:
    set_command(bus, SLOT_A, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    shell = Shell(bus, memory, immediate=False)
    shell.program(GUEST, 8)
    shell.command(DMA_CMD_FROM_GUEST)
    shell.complete(shell.held[0], b"short", None)
    assert shell.status() == DMA_STATUS_ERROR and "returned 5 bytes" in dev.dma_error
    assert dev.ram[:8] == bytes(8)
    shell.command(DMA_CMD_FROM_GUEST)
    shell.complete(shell.held[0], None, "frontend says no")
    assert dev.dma_error == "frontend says no"


def test_status_bits_are_write_one_to_clear(shell: Shell) -> None:
    shell.program(GUEST, 4)
    shell.command(DMA_CMD_TO_GUEST)
    assert shell.status() == DMA_STATUS_DONE
    shell.write(REG_DMA_STATUS, 0)
    assert shell.status() == DMA_STATUS_DONE  # writing 0 changes nothing
    shell.write(REG_DMA_STATUS, DMA_STATUS_DONE)
    assert shell.status() == 0
    shell.program(0, 4)
    shell.command(DMA_CMD_TO_GUEST)
    assert shell.status() == DMA_STATUS_ERROR
    shell.write(REG_DMA_STATUS, DMA_STATUS_DONE)  # the other bit: no effect
    assert shell.status() == DMA_STATUS_ERROR
    shell.write(REG_DMA_STATUS, 0xFFFF_FFFF)
    assert shell.status() == 0


def test_a_new_command_clears_done_and_error(shell: Shell) -> None:
    shell.program(0, 4)
    shell.command(DMA_CMD_TO_GUEST)
    assert shell.status() == DMA_STATUS_ERROR
    shell.program(GUEST, 4)
    shell.command(DMA_CMD_TO_GUEST)
    assert shell.status() == DMA_STATUS_DONE


def test_reset_forgets_an_outstanding_transfer(
    bus: PciBus, memory: BytearrayMemory, dev: PciTestDevice
) -> None:
    set_command(bus, SLOT_A, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    shell = Shell(bus, memory, immediate=False)
    shell.program(GUEST, 4)
    shell.command(DMA_CMD_FROM_GUEST)
    (request,) = shell.held
    bus.reset(SLOT_A)
    assert shell.status() == 0 and dev.dma_outstanding == 0
    assert shell.read(REG_DMA_LEN) == 0 and shell.read(REG_DMA_ADDR_LO) == 0
    assert shell.complete(request, b"late", None) == []  # dropped
    assert dev.ram[:4] == bytes(4) and shell.status() == 0


# -- interrupts


def test_completion_raises_intx_with_irq_status_bit_1(shell: Shell) -> None:
    shell.program(GUEST, 4)
    assert shell.command(DMA_CMD_TO_GUEST) == INTX_UP
    assert shell.read(REG_IRQ_STATUS) == 1 << DMA_VECTOR
    assert shell.write(REG_IRQ_STATUS, 1 << DMA_VECTOR) == [IntxChanged(SLOT_A, 1, False)]


def test_completion_raises_msix_vector_1_when_enabled(
    bus: PciBus, shell: Shell, dev: PciTestDevice
) -> None:
    assert dev.msix is not None
    cfg_write(bus, SLOT_A, dev.msix.cap_offset + 2, 2, PCI_MSIX_FLAGS_ENABLE)
    entry = DMA_VECTOR * 16
    bus.bar_write(SLOT_A, MSIX_BAR, entry, 8, 0xFEE0_0000)
    bus.bar_write(SLOT_A, MSIX_BAR, entry + 8, 4, 0x4042)
    bus.bar_write(SLOT_A, MSIX_BAR, entry + 12, 4, 0)  # unmask
    shell.program(GUEST, 4)
    assert shell.command(DMA_CMD_FROM_GUEST) == [MsiRaised(SLOT_A, 1, 0xFEE0_0000, 0x4042)]
    assert shell.read(REG_IRQ_STATUS) == 0  # INTx causes only
    shell.program(0, 4)  # an error completes with the same vector
    assert shell.command(DMA_CMD_FROM_GUEST) == [MsiRaised(SLOT_A, 1, 0xFEE0_0000, 0x4042)]
    assert shell.status() == DMA_STATUS_ERROR
