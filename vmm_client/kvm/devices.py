"""Devices the KVM frontend answers itself, and the forwarding of PCI to the device server.

- `Serial16550`: enough of a 16550A at 0x3F8 for output (THR writes, LSR
  says THRE|TEMT so a polling driver never waits, divisor latches and the
  scratch register read back).
- `DebugExit`: a write to port 0xF4 ends the run with that value as the
  status (raw, unlike QEMU's isa-debug-exit which reports `value << 1 | 1`).
- `PciHost`: 0xCF8/0xCFC through `Cf8Port` to the session's config reads and
  writes (all-ones and dropped where the latch decodes nothing), and every
  PIO/MMIO exit inside a decoding BAR to BarRead/BarWrite (writes posted),
  routed by a `RoutingTable` that the session's BarDecodeChanged events keep
  current; shared-memory BARs also become memslots that follow them
  (memslots.py); MsiRaised events become KVM_SIGNAL_MSI and IntxChanged
  events KVM_IRQ_LINE on the pin's GSI (intx.py).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Final, Protocol

from devmodel.v1 import devmodel_pb2 as pb
from devserver.effects import BarDecodeChanged, Effect, IntxChanged, MsiRaised

from ..addressing import (
    CF8_PORT,
    CFC_PORT,
    CONFIG_ADDRESS_PORTS,
    Cf8Port,
    EcamWindow,
    all_ones,
)
from ..client import ClientError
from ..routing import Route, RoutingTable
from .intx import IntxRouter, IntxSource
from .memslots import SharedBarSlots
from .vm import GuestExit, Vm

COM1: Final = 0x3F8
DEBUG_EXIT_PORT: Final = 0xF4
DEBUG_EXIT_MMIO: Final = 0xFEBF_F000  # one page just under the IOAPIC's neighbourhood

# 16550 register offsets and bits.
_THR_RBR_DLL = 0
_IER_DLM = 1
_IIR_FCR = 2
_LCR = 3
_MCR = 4
_LSR = 5
_MSR = 6
_SCR = 7
LCR_DLAB: Final = 0x80
LSR_THRE: Final = 0x20
LSR_TEMT: Final = 0x40
IIR_NO_INTERRUPT: Final = 0x01
MSR_DCD_DSR_CTS: Final = 0xB0


class Serial16550:
    """A transmit-only 16550A; `output` gets each byte the guest sends."""

    def __init__(self, output: Callable[[bytes], None] | None = None, base: int = COM1) -> None:
        self.base = base
        self.ports = range(base, base + 8)
        self._output = output if output is not None else _stdout
        self.sent = bytearray()  # everything the guest printed, for tests and reports
        self._regs = bytearray(8)
        self._divisor = 12  # 9600 baud: what a BIOS would leave
        self._lock = threading.Lock()  # several vCPUs may print

    @property
    def text(self) -> str:
        return self.sent.decode(errors="replace")

    def pio_write(self, port: int, size: int, value: int) -> None:
        reg = port - self.base
        value &= 0xFF
        dlab = self._regs[_LCR] & LCR_DLAB
        if reg == _THR_RBR_DLL and not dlab:
            byte = bytes((value,))
            with self._lock:
                self.sent += byte
            self._output(byte)
        elif reg == _THR_RBR_DLL:
            self._divisor = (self._divisor & 0xFF00) | value
        elif reg == _IER_DLM and dlab:
            self._divisor = (self._divisor & 0x00FF) | value << 8
        elif reg == _IER_DLM:
            self._regs[_IER_DLM] = value & 0x0F
        elif reg in (_LCR, _MCR, _SCR):
            self._regs[reg] = value
        # FCR and the read-only LSR/MSR: nothing to keep.

    def pio_read(self, port: int, size: int) -> int:
        reg = port - self.base
        dlab = self._regs[_LCR] & LCR_DLAB
        if reg == _THR_RBR_DLL:
            return self._divisor & 0xFF if dlab else 0  # no input
        if reg == _IER_DLM:
            return self._divisor >> 8 if dlab else self._regs[_IER_DLM]
        if reg == _IIR_FCR:
            return IIR_NO_INTERRUPT | 0xC0  # FIFOs on: a 16550A, not a 16450
        if reg == _LSR:
            return LSR_THRE | LSR_TEMT  # always ready; never 0xFF (Linux: "no UART")
        if reg == _MSR:
            return MSR_DCD_DSR_CTS
        return self._regs[reg]


def _stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    if data == b"\n":
        sys.stdout.flush()


class DebugExit:
    """Port 0xF4 (or an MMIO page, for ring-3 code): a write ends the run with its value."""

    port = DEBUG_EXIT_PORT

    def pio_write(self, port: int, size: int, value: int) -> None:
        raise GuestExit(value)

    def pio_read(self, port: int, size: int) -> int:
        return all_ones(size)

    def mmio_write(self, address: int, size: int, value: int) -> None:
        raise GuestExit(value)

    def mmio_read(self, address: int, size: int) -> int:
        return all_ones(size)


class ConfigSession(Protocol):
    """What PciHost needs of a session: SyncSession satisfies it."""

    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> int: ...
    def config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> list[Effect]: ...
    def bar_read(self, device_id: int, bar: int, offset: int, size: int) -> int: ...
    def bar_write(self, device_id: int, bar: int, offset: int, size: int, value: int) -> None: ...


def _say_lost(message: str) -> None:
    print(f"vmm_client: {message}", file=sys.stderr, flush=True)


class PciHost:
    """The guest's PCI host bridge, forwarding to the device server.

    Create it first (it claims 0xCF8..0xCFF and becomes the fallback of both
    buses), give `handle_event` to the session as `on_event`, then
    `attach(session, topology)`: BAR events then update the routing table
    before the config write that caused them returns to the vCPU
    (client.py's promise), so the next exit already routes to the new address.

    Several vCPUs: each exits on its own thread, and events arrive on the
    session's. One lock covers the routing table, the memslots that follow
    it and the counters; it is never held across a call to the server (the
    event a config write causes is applied on the session's thread while the
    writing vCPU waits, so holding it there would deadlock). The CF8 latch is
    one register shared by all vCPUs, as on real chipsets: guests serialise
    their use of it (Linux's pci_config_lock), or use ECAM.

    IntxChanged events drive KVM_IRQ_LINE on the GSI intx.py assigns to the
    function's pin (topology from `attach`); MsiRaised become KVM_SIGNAL_MSI.

    If the server goes away, the first failed access says so once
    (`on_lost`), and from then on every device reads all-ones and writes
    vanish, as if the cards were pulled: the guest goes on and ends on its own.
    """

    def __init__(self, vm: Vm, on_lost: Callable[[str], None] = _say_lost) -> None:
        self.vm = vm
        self.cf8 = Cf8Port()
        self.routing = RoutingTable()
        self.shared_bars = SharedBarSlots(vm)
        self.intx = IntxRouter()
        self.session: ConfigSession | None = None
        self.events: list[Effect] = []
        self.msis: list[MsiRaised] = []
        self.irq_lines: list[tuple[int, bool]] = []  # (GSI, level) given to KVM_IRQ_LINE
        self.config_accesses = 0
        self.bar_accesses = 0
        self.unrouted = 0
        self.reset_requested = False
        self.session_error: str | None = None
        self._on_lost = on_lost
        self._lock = threading.Lock()
        # Installed at once: without a session the bus is empty (config reads
        # all-ones), but the latch still behaves, as on a board with no cards.
        vm.pio.add(range(CF8_PORT, CFC_PORT + 4), self)
        vm.pio.fallback = self
        vm.mmio.fallback = self

    def attach(self, session: ConfigSession, topology: pb.Topology | None = None) -> None:
        """Forward to `session`; `topology` (the Welcome's) wires the INTx pins of bus 0."""
        if topology is not None:
            for d in topology.devices:
                if d.bus == 0 and d.interrupt_pin:
                    self.intx.add(IntxSource(d.device_id, d.device, d.interrupt_pin))
        self.session = session

    def handle_event(self, effect: Effect) -> None:
        """on_event: runs on the session's thread while the vCPU waits for its reply."""
        line: tuple[int, bool] | None = None
        with self._lock:
            self.events.append(effect)
            if isinstance(effect, BarDecodeChanged):
                self.routing.apply(effect)
                self.shared_bars.apply(effect)
            elif isinstance(effect, IntxChanged):
                line = self.intx.change(effect.device_id, effect.asserted)
                if line is not None:
                    self.irq_lines.append(line)
            elif isinstance(effect, MsiRaised):
                self.msis.append(effect)
        # Injection outside the lock: only this (the session's) thread injects, in
        # stream order, and KVM takes it from any thread.
        if line is not None and self.vm.irqchip:
            self.vm.irq_line(*line)
        elif isinstance(effect, MsiRaised):
            self.vm.signal_msi(effect.address, effect.data)

    # the server, with its loss turned into a pulled card

    def _lost(self, error: Exception) -> None:
        with self._lock:
            first = self.session_error is None
            if first:
                self.session_error = str(error)
            self.session = None
        if first:
            self._on_lost(
                f"the device server went away ({error}); the guest now reads all-ones "
                "from its PCI devices; restart `python -m devserver` and the VMM to recover"
            )

    def _config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        session = self.session
        if session is None:
            return all_ones(size)
        try:
            return session.config_read(bus, device, function, offset, size)
        except (ClientError, TimeoutError) as e:
            self._lost(e)
            return all_ones(size)

    def _config_write(
        self, bus: int, device: int, function: int, offset: int, size: int, value: int
    ) -> None:
        session = self.session
        if session is None:
            return
        try:
            session.config_write(bus, device, function, offset, size, value)
        except (ClientError, TimeoutError) as e:
            self._lost(e)

    def _bar_read(self, route: Route, size: int) -> int:
        session = self.session
        if session is None:
            return all_ones(size)
        try:
            return session.bar_read(route.device_id, route.bar, route.offset, size)
        except (ClientError, TimeoutError) as e:
            self._lost(e)
            return all_ones(size)

    def _bar_write(self, route: Route, size: int, value: int) -> None:
        session = self.session
        if session is None:
            return
        try:
            session.bar_write(route.device_id, route.bar, route.offset, size, value)
        except (ClientError, RuntimeError) as e:  # RuntimeError: its event loop is gone
            self._lost(e)

    def _count_config(self) -> None:
        with self._lock:
            self.config_accesses += 1

    def _route(self, route: Route | None) -> Route | None:
        """Count a BAR access (routed or not); called with the lock held."""
        if route is None or self.session is None:
            self.unrouted += 1
            return None
        self.bar_accesses += 1
        return route

    # port IO: the config mechanism and IO BARs

    def pio_read(self, port: int, size: int) -> int:
        if port in CONFIG_ADDRESS_PORTS:
            return self.cf8.read_address(size, port)
        if CFC_PORT <= port < CFC_PORT + 4:
            target = self.cf8.data_target(port, size)
            if target is None or self.session is None:
                return all_ones(size)
            self._count_config()
            return self._config_read(
                target.bus, target.device, target.function, target.offset, size
            )
        with self._lock:
            route = self._route(self.routing.lookup_pio(port, size))
        return all_ones(size) if route is None else self._bar_read(route, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        if port in CONFIG_ADDRESS_PORTS:
            if self.cf8.write_address(size, value, port):
                self.reset_requested = True
                raise GuestExit(0, "reset")
            return
        if CFC_PORT <= port < CFC_PORT + 4:
            target = self.cf8.data_target(port, size)
            if target is None or self.session is None:
                return
            self._count_config()
            self._config_write(
                target.bus, target.device, target.function, target.offset, size, value
            )
            return
        with self._lock:
            route = self._route(self.routing.lookup_pio(port, size))
        if route is not None:
            self._bar_write(route, size, value)

    # ECAM: config space through memory (ring-3 code, Linux with an MCFG)

    def enable_ecam(self, window: EcamWindow) -> None:
        """Decode `window` as PCIe ECAM (bus 0 at its base) and forward it as config access."""
        self.vm.mmio.add(window.base, window.size, _Ecam(self, window))

    def ecam_read(self, window: EcamWindow, address: int, size: int) -> int:
        target = window.decode(address, size)
        if target is None or self.session is None:
            return all_ones(size)
        self._count_config()
        return self._config_read(target.bus, target.device, target.function, target.offset, size)

    def ecam_write(self, window: EcamWindow, address: int, size: int, value: int) -> None:
        target = window.decode(address, size)
        if target is None or self.session is None:
            return
        self._count_config()
        self._config_write(target.bus, target.device, target.function, target.offset, size, value)

    # MMIO: memory BARs

    def mmio_read(self, address: int, size: int) -> int:
        with self._lock:
            route = self._route(self.routing.lookup_mmio(address, size))
        return all_ones(size) if route is None else self._bar_read(route, size)

    def mmio_write(self, address: int, size: int, value: int) -> None:
        with self._lock:
            route = self._route(self.routing.lookup_mmio(address, size))
        if route is not None:
            self._bar_write(route, size, value)


class _Ecam:
    """The MMIO face of an ECAM window."""

    def __init__(self, host: PciHost, window: EcamWindow) -> None:
        self._host = host
        self._window = window

    def mmio_read(self, address: int, size: int) -> int:
        return self._host.ecam_read(self._window, address, size)

    def mmio_write(self, address: int, size: int, value: int) -> None:
        self._host.ecam_write(self._window, address, size, value)
