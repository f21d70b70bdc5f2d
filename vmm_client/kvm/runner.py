"""Run a freestanding guest program with its PCI devices served by a device server.

The glue between vm.py, boot.py and devices.py that the CLI
(`python -m vmm_client run`) and the tests share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from devmodel.v1 import devmodel_pb2 as pb

from ..client import FrontendOptions, MemoryRegion, SyncSession, TlsClientFiles
from ..routing import RoutingTable
from .boot import enter_long_mode, load_program
from .devices import DebugExit, PciHost, Serial16550
from .vm import RunResult, Vm

DEFAULT_MEMORY: Final = 64 << 20


@dataclass(slots=True)
class GuestRun:
    result: RunResult
    output: str
    routing: RoutingTable
    msis: int  # MSIs the server raised (each passed to KVM_SIGNAL_MSI when there is an irqchip)
    msis_delivered: int
    config_accesses: int
    bar_accesses: int


def run_program(
    image: bytes,
    devserver: str | None,
    *,
    memory: int = DEFAULT_MEMORY,
    timeout: float = 60.0,
    output: Callable[[bytes], None] | None = None,
    tls: TlsClientFiles | None = None,
    irqchip: bool = True,
    user: bool = False,
    share_memory: bool | None = None,
) -> GuestRun:
    """Load `image` (ELF or flat at 1 MiB), enter it in long mode, run it to its end.

    With `devserver` None the guest has no PCI devices (every config read
    answers all-ones). `user` enters it at ring 3 with IOPL 3, which kvm_pvm
    runs natively instead of emulating.

    `share_memory` (default: when the server is on a unix: socket, so on
    this machine) offers guest RAM to the server as the memfd it lives in
    (MEMORY_MODE_SHARED): device DMA then reads and writes guest memory
    directly. Otherwise the server gets no memory access (DMA fails).
    """
    if share_memory is None:
        share_memory = devserver is not None and devserver.startswith("unix:")
    with Vm(memory, irqchip=irqchip) as vm:
        uart = Serial16550(output)
        vm.pio.add(uart.ports, uart)
        debug_exit = DebugExit()
        vm.pio.add(range(debug_exit.port, debug_exit.port + 4), debug_exit)
        pci = PciHost(vm)
        session: SyncSession | None = None
        try:
            if devserver is not None:
                options = FrontendOptions(
                    "vmm_client kvm", shared_memory_bars=True, memory_mode=pb.MEMORY_MODE_NONE
                )
                if share_memory:
                    options = FrontendOptions(
                        "vmm_client kvm",
                        shared_memory_bars=True,
                        memory_mode=pb.MEMORY_MODE_SHARED,
                        regions=(MemoryRegion(0, vm.ram.size, path=vm.ram.path),),
                    )
                session = SyncSession(
                    devserver,
                    options,
                    on_event=pci.handle_event,
                    tls=tls,
                )
                pci.attach(session)
            program = load_program(vm.ram, image)
            vcpu = vm.create_vcpu()
            enter_long_mode(vcpu, program.entry, user=user)
            result = vm.run(timeout)
        finally:
            if session is not None:
                session.close()
            pci.shared_bars.close()
        return GuestRun(
            result=result,
            output=uart.text,
            routing=pci.routing,
            msis=len(pci.msis),
            msis_delivered=vm.msis_delivered,
            config_accesses=pci.config_accesses,
            bar_accesses=pci.bar_accesses,
        )
