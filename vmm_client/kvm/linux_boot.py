"""Boot Linux in the KVM VMM via the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

linux.py builds the bytes; this writes them into the VM, sets up each vCPU
(long mode, __BOOT_CS 0x10 / __BOOT_DS 0x18, rsi = zero page, CPUID with
kvmtool's tweaks, LAPIC LINT0 ExtINT / LINT1 NMI) and runs it with the
in-kernel irqchip + PIT. Only vCPU 0 is started: the others wait for the
INIT/SIPI the kernel sends them (the in-kernel LAPIC handles that).
"""

from __future__ import annotations

import ctypes
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from . import abi, linux
from .boot import GDT_ADDRESS, MAX_MAPPED_GIB, PML4_ADDRESS, gdt_entry, write_long_mode_tables
from .devices import PciHost, Serial16550
from .intx import IntxSource
from .ramlayout import FOUR_GIB, PCI_HOLE_START
from .sysapi import ioctl
from .vm import GuestExit, RunResult, Vcpu, Vm

# RAM above the hole up to the 16 GiB the boot page tables map (boot.MAX_MAPPED_GIB).
MAX_MEMORY: Final = (MAX_MAPPED_GIB << 30) - (FOUR_GIB - PCI_HOLE_START)
BOOT_CS: Final = 0x10
BOOT_DS: Final = 0x18
STACK_TOP: Final = 0x8FF0
APIC_LVT0: Final = 0x350
APIC_LVT1: Final = 0x360
APIC_MODE_NMI: Final = 4
APIC_MODE_EXTINT: Final = 7


@dataclass(frozen=True, slots=True)
class LinuxLayout:
    kernel: linux.KernelImage
    initrd_address: int
    initrd_size: int
    cmdline: bytes


def plan(
    kernel: bytes, initrd: bytes | None, cmdline: str, memory: int
) -> tuple[linux.KernelImage, int, bytes]:
    """Parse and place (no VM needed): (kernel, initrd address, cmdline bytes).

    Raises linux.NotAKernel or ValueError with a one-line message naming the fix.
    """
    image = linux.parse_kernel(kernel)
    if memory % 4096:
        raise ValueError(f"guest RAM of {memory} bytes is not a multiple of 4 KiB: use -m 512M")
    if memory > MAX_MEMORY:
        raise ValueError(
            f"{memory >> 20}M of RAM is more than the page tables map: use -m {MAX_MEMORY >> 30}G "
            "or less"
        )
    if image.end + (1 << 20) > memory:
        raise ValueError(
            f"guest RAM too small for the kernel (it needs {image.end >> 20} MiB from 0): "
            f"use -m {max((image.end >> 20) + 64, 128)}M or more"
        )
    address = 0
    if initrd:
        address = linux.place_initrd(len(initrd), memory, image.end, image.initrd_addr_max)
    return image, address, linux.check_cmdline(cmdline, image.cmdline_size)


def load(
    vm: Vm,
    image: linux.KernelImage,
    initrd: bytes | None,
    initrd_address: int,
    cmdline: bytes,
    ncpus: int,
    framebuffer: linux.Framebuffer | None = None,
    pci_interrupts: Sequence[IntxSource] = (),
) -> None:
    """Write kernel, initrd, cmdline, zero page and MP table into guest RAM."""
    ram = vm.ram
    for seg in image.segments:
        ram.write(seg.address, seg.data)
        if seg.memsz > len(seg.data):
            ram.write(seg.address + len(seg.data), bytes(seg.memsz - len(seg.data)))
    if initrd:
        ram.write(initrd_address, initrd)
    ram.write(linux.CMDLINE_ADDRESS, cmdline)
    params = linux.BootParams(
        ram_size=ram.size,
        cmdline_size=image.cmdline_size,
        initrd_address=initrd_address if initrd else 0,
        initrd_size=len(initrd) if initrd else 0,
        setup_header=image.setup_header,
        framebuffer=framebuffer,
    )
    ram.write(linux.ZERO_PAGE_ADDRESS, linux.build_zero_page(params))
    ram.write(
        linux.MPTABLE_ADDRESS, linux.build_mptable(ncpus, pci_interrupts=tuple(pci_interrupts))
    )


def _segment(selector: int, code: bool) -> abi.kvm_segment:
    return abi.kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=0xB if code else 0x3,
        present=1,
        db=0 if code else 1,
        s=1,
        l=1 if code else 0,
        g=1,
    )


def setup_vcpu(vm: Vm, vcpu: Vcpu, entry: int) -> None:
    """boot.rst "64-bit Boot Protocol": long mode, identity paging, flat segments, rsi."""
    write_long_mode_tables(vm.ram)  # identity map of 4 GiB (overwrites the GDT next)
    gdt = [0, 0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF)]
    vm.ram.write(GDT_ADDRESS, struct.pack("<4Q", *gdt))
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(BOOT_CS, code=True)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = _segment(BOOT_DS, code=False)
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDRESS, 4 * 8 - 1
    sregs.cr3 = PML4_ADDRESS
    sregs.cr4 = abi.CR4_PAE
    sregs.cr0 = abi.CR0_PE | abi.CR0_ET | abi.CR0_PG
    sregs.efer = abi.EFER_LME | abi.EFER_LMA
    vcpu.set_sregs(sregs)
    vcpu.set_regs(
        abi.kvm_regs(rip=entry, rsi=linux.ZERO_PAGE_ADDRESS, rsp=STACK_TOP, rbp=STACK_TOP, rflags=2)
    )


def set_cpuid(vm: Vm, vcpu: Vcpu) -> None:
    table = vm.supported_cpuid()
    for e in abi.cpuid2_entries(table):
        e.eax, e.ebx, e.ecx, e.edx = linux.tweak_cpuid_leaf(
            e.function, e.index, [e.eax, e.ebx, e.ecx, e.edx], vcpu.index
        )
    vcpu.set_cpuid(table)


def set_lint(vcpu: Vcpu) -> None:
    """LVT LINT0 = ExtINT (the PIC), LINT1 = NMI, as a BIOS leaves them (kvmtool/Firecracker)."""
    state = abi.kvm_lapic_state()
    ioctl(vcpu.fd, abi.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
    base = ctypes.addressof(state)
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = int.from_bytes(ctypes.string_at(base + reg, 4), "little")
        value = (value & ~0x700) | (mode << 8)
        ctypes.memmove(base + reg, value.to_bytes(4, "little"), 4)
    ioctl(vcpu.fd, abi.KVM_SET_LAPIC, state, "KVM_SET_LAPIC")


POWER_DOWN: Final = b"reboot: Power down"


def _watch_power_down(output: Callable[[bytes], None] | None) -> Callable[[bytes], None]:
    """End the run when the kernel says it powered down.

    With acpi=off there is no power-off device, and with the in-kernel LAPIC
    the kernel's final `hlt` never exits to us: its "reboot: Power down" line
    is the only sign. Raised on the vCPU thread, GuestExit ends the run.
    """
    tail = bytearray()

    def write(data: bytes) -> None:
        if output is not None:
            output(data)
        else:
            sys.stdout.buffer.write(data)
            if data == b"\n":
                sys.stdout.flush()
        tail.extend(data)
        if POWER_DOWN in tail:
            raise GuestExit(0, "poweroff")
        del tail[: max(0, len(tail) - len(POWER_DOWN))]

    return write


def set_msrs(vcpu: Vcpu) -> int:
    """linux.BOOT_MSRS; returns how many KVM took (it stops at the first it refuses)."""
    return ioctl(vcpu.fd, abi.KVM_SET_MSRS, abi.msrs_buffer(linux.BOOT_MSRS), "KVM_SET_MSRS")


@dataclass(frozen=True, slots=True)
class Attached:
    """What `boot_linux`'s attach hook connected: how to close it, and a framebuffer
    firmware set up (firmware.py), described to the kernel in screen_info."""

    close: Callable[[], None]
    framebuffer: linux.Framebuffer | None = None


@dataclass(slots=True)
class LinuxRun:
    result: RunResult
    output: str


def boot_linux(
    kernel: bytes,
    initrd: bytes | None,
    cmdline: str,
    *,
    memory: int,
    ncpus: int = 1,
    timeout: float = 120.0,
    output: Callable[[bytes], None] | None = None,
    attach: Callable[[Vm, PciHost], Attached] | None = None,
) -> LinuxRun:
    """Boot; `attach(vm, pci)` may connect a device server (and set up its framebuffer)."""
    image, initrd_address, raw_cmdline = plan(kernel, initrd, cmdline, memory)
    with Vm(memory, irqchip=True) as vm:
        uart = Serial16550(_watch_power_down(output))
        vm.pio.add(uart.ports, uart)
        pci = PciHost(vm)
        close: Callable[[], None] | None = None
        framebuffer: linux.Framebuffer | None = None
        try:
            if attach is not None:
                attached = attach(vm, pci)
                close, framebuffer = attached.close, attached.framebuffer
            load(
                vm,
                image,
                initrd,
                initrd_address,
                raw_cmdline,
                ncpus,
                framebuffer=framebuffer,
                pci_interrupts=pci.intx.sources,
            )
            for _ in range(ncpus):
                vcpu = vm.create_vcpu(cpuid=False)
                set_cpuid(vm, vcpu)
                set_lint(vcpu)
                set_msrs(vcpu)
            setup_vcpu(vm, vm.vcpus[0], image.entry)
            result = vm.run(timeout)
            if result.reason == "timeout":  # say where it was: under kvm_pvm, still booting
                result.message += f"; vCPU 0 at {vm.vcpus[0].where()}"
        finally:
            if close is not None:
                close()
            pci.shared_bars.close()
        return LinuxRun(result, uart.text)
