"""PciHost without KVM: several vCPU threads against events arriving on another
thread, and a server that goes away (every device then reads all-ones)."""

from __future__ import annotations

import sys
import threading

from devserver.effects import AddressRange, BarDecodeChanged, BarKind, Effect
from vmm_client.client import ClientError
from vmm_client.kvm.devices import PciHost
from vmm_client.kvm.vm import MmioBus, PioBus

A, B, SIZE = 0xE000_0000, 0xE100_0000, 0x1000


class FakeVm:
    def __init__(self) -> None:
        self.pio = PioBus()
        self.mmio = MmioBus()
        self.irqchip = False


class CountingSession:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reads = 0
        self.writes = 0

    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        return 0x1234

    def config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> list[Effect]:
        return []

    def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int:
        with self.lock:
            self.reads += 1
        return offset

    def bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.writes += 1


class DeadSession(CountingSession):
    """A server that went away: what SyncSession raises then."""

    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        with self.lock:
            self.reads += 1
        raise ClientError("device server ended the session: UNAVAILABLE: Socket closed")

    def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int:
        raise AssertionError("never reached: the first failure detaches the session")


def move(generation: int, old: int | None, new: int | None) -> BarDecodeChanged:
    return BarDecodeChanged(
        device_id=1,
        bar=2,
        kind=BarKind.MEM32,
        prefetchable=False,
        old=AddressRange(old, SIZE) if old is not None else None,
        new=AddressRange(new, SIZE) if new is not None else None,
        backing=None,
        generation=generation,
    )


def test_vcpu_threads_and_bar_moves_race_safely() -> None:
    """Two "vCPUs" read the BAR at both addresses while a third thread moves it back
    and forth: every access is routed to the device or answered all-ones, and the
    counters add up (no lost increments, no half-applied table)."""
    pci = PciHost(FakeVm())  # type: ignore[arg-type]
    session = CountingSession()
    pci.attach(session)
    pci.handle_event(move(1, None, A))
    rounds = 2000
    errors: list[BaseException] = []

    def vcpu() -> None:
        try:
            for i in range(rounds):
                address = (A if i % 2 else B) + 8
                value = pci.mmio_read(address, 4)
                assert value in (8, 0xFFFF_FFFF), hex(value)
                pci.mmio_write(address, 4, i)
        except BaseException as e:  # reported below, on the main thread
            errors.append(e)

    def mover() -> None:
        where = A
        for generation in range(2, 2 + rounds):
            target = B if where == A else A
            pci.handle_event(move(generation, where, target))
            where = target

    threads = [threading.Thread(target=vcpu) for _ in range(2)]
    threads.append(threading.Thread(target=mover))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: make them interleave
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    total = 2 * 2 * rounds  # two threads, a read and a write each round
    assert pci.bar_accesses + pci.unrouted == total
    assert pci.bar_accesses == session.reads + session.writes
    assert len(pci.routing.ranges()) == 1


def test_a_lost_server_is_said_once_and_the_bus_reads_all_ones() -> None:
    said: list[str] = []
    pci = PciHost(FakeVm(), on_lost=said.append)  # type: ignore[arg-type]
    session = DeadSession()
    pci.attach(session)
    pci.handle_event(move(1, None, A))
    pci.pio_write(0xCF8, 4, 0x8000_0800)
    assert pci.pio_read(0xCFC, 4) == 0xFFFF_FFFF
    assert pci.pio_read(0xCFC, 2) == 0xFFFF
    assert pci.mmio_read(A, 4) == 0xFFFF_FFFF  # would have called bar_read (None)
    pci.mmio_write(A, 4, 1)
    assert session.reads == 1  # only the first access tried the server
    assert len(said) == 1
    assert "device server went away" in said[0] and "UNAVAILABLE" in said[0]
    assert "restart `python -m devserver`" in said[0]
    assert pci.session is None and pci.session_error is not None
