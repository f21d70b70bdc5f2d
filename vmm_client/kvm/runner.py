"""Run a freestanding guest program with its PCI devices served by a device server.

The glue between vm.py, boot.py and devices.py that the CLI
(`python -m vmm_client run`) and the tests share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from devmodel.v1 import devmodel_pb2 as pb

from ..client import FrontendOptions, MemoryRegion, SyncSession, TlsClientFiles
from ..routing import RoutingTable
from .boot import STACK_TOP, enter_long_mode, load_program
from .devices import DebugExit, PciHost, Serial16550
from .memslots import SlotChange
from .ramlayout import FOUR_GIB
from .vm import PAGE, Memslot, RunResult, Vm

DEFAULT_MEMORY: Final = 64 << 20
MIN_MEMORY: Final = 4 << 20  # the program loads at 1 MiB; tables, stacks and data around it
MAX_VCPUS: Final = 8
VCPU_STACK_STRIDE: Final = 0x8000  # 32 KiB stacks under STACK_TOP: 0x48000.. for 8 vCPUs


@dataclass(slots=True)
class GuestRun:
    result: RunResult
    output: str
    routing: RoutingTable
    msis: int  # MSIs the server raised (each passed to KVM_SIGNAL_MSI when there is an irqchip)
    msis_delivered: int
    config_accesses: int
    bar_accesses: int
    irq_lines: list[tuple[int, bool]] = field(default_factory=list)  # KVM_IRQ_LINE (GSI, level)
    intx_gsis: dict[int, int] = field(default_factory=dict)  # device id -> GSI of its pin
    session_error: str | None = None  # why the device server stopped answering, if it did
    memslots: dict[int, Memslot] = field(default_factory=dict)  # as the run left them
    slot_changes: list[SlotChange] = field(default_factory=list)  # shared-memory BARs' memslots
    ram: bytes = b""  # with `keep_ram`: [address, address + length) of guest RAM at the end


def check_memory(memory: int) -> None:
    """ValueError naming the fix when `memory` cannot hold a freestanding program."""
    if memory < MIN_MEMORY:
        raise ValueError(
            f"guest RAM of {memory} bytes is too small for a guest program "
            f"(it loads at 1 MiB): use -m {MIN_MEMORY >> 20}M or more"
        )
    if memory % PAGE:
        raise ValueError(f"guest RAM of {memory} bytes is not a multiple of 4 KiB: use -m 64M")


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
    ncpus: int = 1,
    on_lost: Callable[[str], None] | None = None,
    keep_ram: tuple[int, int] | None = None,
) -> GuestRun:
    """Load `image` (ELF or flat at 1 MiB), enter it in long mode, run it to its end.

    With `devserver` None the guest has no PCI devices (every config read
    answers all-ones). `user` enters it at ring 3 with IOPL 3, which kvm_pvm
    runs natively instead of emulating.

    Every one of `ncpus` vCPUs starts at the entry at once, each with its own
    stack and the arguments (vCPU index, ncpus, bytes of RAM above 4 GiB) in
    rdi, rsi, rdx: the program tells its boot processor from the others.

    `share_memory` (default: when the server is on a unix: socket, so on
    this machine) offers guest RAM to the server as the memfd it lives in
    (MEMORY_MODE_SHARED), one region per RAM window (ramlayout.py): device
    DMA then reads and writes guest memory directly. Otherwise the server gets
    no memory access (DMA fails).
    """
    check_memory(memory)
    if not 1 <= ncpus <= MAX_VCPUS:
        raise ValueError(f"{ncpus} vCPUs: give --smp 1..{MAX_VCPUS}")
    if share_memory is None:
        share_memory = devserver is not None and devserver.startswith("unix:")
    with Vm(memory, irqchip=irqchip) as vm:
        uart = Serial16550(output)
        vm.pio.add(uart.ports, uart)
        debug_exit = DebugExit()
        vm.pio.add(range(debug_exit.port, debug_exit.port + 4), debug_exit)
        pci = PciHost(vm) if on_lost is None else PciHost(vm, on_lost)
        session: SyncSession | None = None
        ram = b""
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
                        regions=tuple(
                            MemoryRegion(r.guest_address, r.size, vm.ram.path, r.offset)
                            for r in vm.ram_regions
                        ),
                    )
                session = SyncSession(
                    devserver,
                    options,
                    on_event=pci.handle_event,
                    tls=tls,
                )
                pci.attach(session, session.topology)
            program = load_program(vm.ram, image)
            high_ram = sum(r.size for r in vm.ram_regions if r.guest_address >= FOUR_GIB)
            for index in range(ncpus):
                vcpu = vm.create_vcpu()
                enter_long_mode(
                    vcpu,
                    program.entry,
                    STACK_TOP - index * VCPU_STACK_STRIDE,
                    user=user,
                    arguments=(index, ncpus, high_ram),
                )
                if index and irqchip:
                    vcpu.make_runnable()
            result = vm.run(timeout)
            memslots = dict(vm.memslots)
            if keep_ram is not None:
                ram = vm.read_guest(*keep_ram)
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
            irq_lines=list(pci.irq_lines),
            intx_gsis={s.device_id: s.gsi for s in pci.intx.sources},
            session_error=pci.session_error,
            memslots=memslots,
            slot_changes=list(pci.shared_bars.changes),
            ram=ram,
        )
