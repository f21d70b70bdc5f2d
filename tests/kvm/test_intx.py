"""INTx: pins onto GSIs (the swizzle), wire-OR of shared lines, the MP table's
PCI entries, and PciHost turning IntxChanged into KVM_IRQ_LINE transitions.

No KVM needed: PciHost runs on a stand-in VM that records what it would inject.
"""

from __future__ import annotations

import struct

import pytest

from devmodel.v1 import devmodel_pb2 as pb
from devserver.effects import Effect, IntxChanged, MsiRaised
from vmm_client.kvm import linux
from vmm_client.kvm.devices import PciHost
from vmm_client.kvm.intx import IntxRouter, IntxSource, swizzle_gsi
from vmm_client.kvm.vm import MmioBus, PioBus


class FakeVm:
    """What PciHost touches of a Vm, recording injections."""

    def __init__(self, irqchip: bool = True) -> None:
        self.pio = PioBus()
        self.mmio = MmioBus()
        self.irqchip = irqchip
        self.lines: list[tuple[int, bool]] = []
        self.msis: list[tuple[int, int]] = []

    def irq_line(self, gsi: int, level: bool) -> None:
        self.lines.append((gsi, level))

    def signal_msi(self, address: int, data: int) -> bool:
        self.msis.append((address, data))
        return True


def host(vm: FakeVm) -> PciHost:
    return PciHost(vm)  # type: ignore[arg-type]


def topology(*devices: tuple[int, int, int]) -> pb.Topology:
    """(device id, slot, pin) each."""
    return pb.Topology(
        devices=[
            pb.DeviceInfo(device_id=i, bus=0, device=slot, interrupt_pin=pin)
            for i, slot, pin in devices
        ]
    )


class NoSession:
    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        raise AssertionError("not expected")

    def config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> list[Effect]:
        raise AssertionError("not expected")

    def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int:
        raise AssertionError("not expected")

    def bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None:
        raise AssertionError("not expected")


def test_swizzle_rotates_pins_by_slot() -> None:
    # PCI-to-PCI Bridge spec 1.2 table 9-1, onto GSIs 16..19.
    assert [swizzle_gsi(0, pin) for pin in (1, 2, 3, 4)] == [16, 17, 18, 19]
    assert [swizzle_gsi(1, pin) for pin in (1, 2, 3, 4)] == [17, 18, 19, 16]
    assert [swizzle_gsi(slot, 1) for slot in range(8)] == [16, 17, 18, 19] * 2
    assert swizzle_gsi(31, 4) == 16 + (31 + 3) % 4
    for slot, pin in ((32, 1), (-1, 1), (0, 0), (0, 5)):
        with pytest.raises(ValueError):
            swizzle_gsi(slot, pin)
    with pytest.raises(ValueError, match="pin 7"):
        IntxRouter([IntxSource(1, 1, 7)])


def test_mp_source_irq_encodes_slot_and_pin() -> None:
    assert IntxSource(9, slot=5, pin=1).mp_source_irq == 5 << 2
    assert IntxSource(9, slot=5, pin=4).mp_source_irq == 5 << 2 | 3


def test_a_shared_line_is_the_or_of_its_devices() -> None:
    # Slots 1 and 5 both put INTA# on GSI 17; slot 2 on GSI 18.
    router = IntxRouter([IntxSource(1, 1, 1), IntxSource(5, 5, 1), IntxSource(2, 2, 1)])
    assert router.change(1, True) == (17, True)
    assert router.change(1, True) is None  # already up
    assert router.change(5, True) is None  # the line is already high
    assert router.change(2, True) == (18, True)
    assert router.change(1, False) is None  # 5 still holds it
    assert router.level(17)
    assert router.change(5, False) == (17, False)
    assert router.change(5, False) is None
    assert not router.level(17) and router.level(18)
    assert router.change(99, True) is None  # not on this bus: ignored


def test_pci_host_injects_line_transitions_only() -> None:
    vm = FakeVm()
    pci = host(vm)
    pci.attach(NoSession(), topology((1, 1, 1), (5, 5, 1), (3, 3, 0)))
    assert {s.device_id: s.gsi for s in pci.intx.sources} == {1: 17, 5: 17}  # 3 has no pin
    for device, up in ((1, True), (5, True), (1, False), (5, False), (3, True)):
        pci.handle_event(IntxChanged(device, 1, up))
    assert vm.lines == [(17, True), (17, False)]
    assert pci.irq_lines == vm.lines
    pci.handle_event(MsiRaised(1, 0, 0xFEE0_0000, 0x41))
    assert vm.msis == [(0xFEE0_0000, 0x41)]


def test_without_an_irqchip_levels_are_only_recorded() -> None:
    vm = FakeVm(irqchip=False)
    pci = host(vm)
    pci.attach(NoSession(), topology((1, 1, 1)))
    pci.handle_event(IntxChanged(1, 1, True))
    assert vm.lines == [] and pci.irq_lines == [(17, True)]


def test_mptable_routes_pci_pins_to_the_ioapic() -> None:
    sources = [IntxSource(1, 1, 1), IntxSource(5, 5, 2)]
    blob = linux.build_mptable(2, pci_interrupts=sources)
    table = blob[16:]
    assert sum(table) % 256 == 0
    count = struct.unpack_from("<H", table, 34)[0]
    assert count == 2 + 2 + 1 + 16 + 2 + 2
    # Entries after the 44-byte header: 2 processors (20 B), 2 buses, 1 IOAPIC, 18 x 8 B.
    at = 44 + 2 * 20 + 2 * 8 + 8 + 16 * 8
    pci = [struct.unpack_from("<BBHBBBB", table, at + 8 * i) for i in range(2)]
    ioapic_id = 2 + 1
    assert pci == [
        (linux.MP_INTSRC, linux.MP_IRQ_INT, 0x0F, linux.PCI_BUS, 1 << 2 | 0, ioapic_id, 17),
        (linux.MP_INTSRC, linux.MP_IRQ_INT, 0x0F, linux.PCI_BUS, 5 << 2 | 1, ioapic_id, 18),
    ]
