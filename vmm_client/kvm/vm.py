"""A KVM virtual machine: /dev/kvm, guest RAM in a memfd, memslots, vCPU threads, the exit loop.

    with Vm(64 << 20) as vm:
        vm.pio.add(range(0x3F8, 0x400), uart)
        vcpu = vm.create_vcpu()
        ...set up registers (boot.py)...
        result = vm.run(timeout=10)

Exits reach devices through two buses: `vm.pio` (port IO, by port) and
`vm.mmio` (by address range); each has a fallback device for what no range
claims (the PCI forwarder, which routes by BAR). A device ends the run by
raising `GuestExit` (the debug-exit port does); HLT, a triple fault
(SHUTDOWN), an entry failure and an emulation failure end it too, and the
result says which, with RIP and the instruction bytes for the last two.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

from . import abi
from .ramlayout import RamRegion, file_offset, ram_regions
from .sysapi import ioctl, ioctl_errno, mmap_shared, munmap, pthread_kill

KVM_PATH: Final = "/dev/kvm"
TSS_ADDRESS: Final = 0xFFFB_D000  # 3 pages just under the BIOS area, as kvmtool/Firecracker
# A real-time signal nobody else uses. It stays blocked on vCPU threads except
# inside KVM_RUN (KVM_SET_SIGNAL_MASK), so a kick interrupts the guest but is
# never delivered to Python: no handler is needed, and threads other than the
# main one can run VMs (Python installs handlers only from the main thread).
KICK_SIGNAL: Final = signal.SIGRTMIN + 3
PAGE: Final = 4096
KERNEL_TEXT_BASE: Final = 0xFFFF_FFFF_8000_0000  # x86-64 Linux __START_KERNEL_map


class KvmUnavailable(RuntimeError):
    """/dev/kvm cannot be used here; the message says what to do about it."""


def kvm_flavour() -> str:
    """'pvm' (software nested virt), 'hardware' (kvm_intel/kvm_amd) or 'unknown'."""
    modules = Path("/sys/module")
    if (modules / "kvm_pvm").exists():
        return "pvm"
    if (modules / "kvm_intel").exists() or (modules / "kvm_amd").exists():
        return "hardware"
    return "unknown"


PVM_NOTE: Final = (
    "/dev/kvm is kvm_pvm (software nested virtualisation): ring-0 guest code is emulated at "
    "about 1 us an instruction and some instructions are refused, so a stock Linux kernel "
    "cannot boot here; freestanding guest programs work"
)


def open_kvm(path: str = KVM_PATH) -> int:
    """Open /dev/kvm and check the API version; KvmUnavailable names the fix."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailable(
            f"{path} does not exist: load kvm_intel or kvm_amd (modprobe), enable "
            "virtualisation in the firmware, or pass the device into the container "
            "(--device /dev/kvm)"
        ) from None
    except PermissionError:
        raise KvmUnavailable(
            f"{path} is not accessible to this user: add yourself to its group "
            f"(usually `sudo usermod -aG kvm $USER`, then log in again) or run as root"
        ) from None
    except OSError as e:
        raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
    try:
        version = ioctl(fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    except OSError as e:
        os.close(fd)
        raise KvmUnavailable(f"{path} is not a KVM device: {e.strerror}") from None
    if version != abi.KVM_API_VERSION:
        os.close(fd)
        raise KvmUnavailable(f"{path} speaks KVM API {version}, not {abi.KVM_API_VERSION}")
    return fd


# -- devices and buses


class GuestExit(Exception):
    """Raised by a device handler to end the run (e.g. the debug-exit port)."""

    def __init__(self, status: int, reason: str = "exit-port") -> None:
        super().__init__(f"{reason} {status}")
        self.status = status
        self.reason = reason


class PioDevice(Protocol):
    def pio_read(self, port: int, size: int) -> int: ...
    def pio_write(self, port: int, size: int, value: int) -> None: ...


class MmioDevice(Protocol):
    def mmio_read(self, address: int, size: int) -> int: ...
    def mmio_write(self, address: int, size: int, value: int) -> None: ...


class Unclaimed:
    """What answers where nothing is: reads all-ones, writes vanish (a master abort)."""

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0

    def pio_read(self, port: int, size: int) -> int:
        self.reads += 1
        return (1 << (8 * size)) - 1

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.writes += 1

    def mmio_read(self, address: int, size: int) -> int:
        self.reads += 1
        return (1 << (8 * size)) - 1

    def mmio_write(self, address: int, size: int, value: int) -> None:
        self.writes += 1


class PioBus:
    """Port IO by port number: a 64 Ki-entry dict lookup per exit, no search."""

    def __init__(self) -> None:
        self._ports: dict[int, PioDevice] = {}
        self.fallback: PioDevice = Unclaimed()

    def add(self, ports: range, device: PioDevice) -> None:
        taken = [p for p in ports if p in self._ports]
        if taken:
            raise ValueError(f"ports {taken[0]:#x}.. are already claimed")
        for port in ports:
            self._ports[port] = device

    def read(self, port: int, size: int) -> int:
        return self._ports.get(port, self.fallback).pio_read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        self._ports.get(port, self.fallback).pio_write(port, size, value)


class MmioBus:
    """MMIO by address range (sorted, disjoint); the fallback takes the rest."""

    def __init__(self) -> None:
        self._bases: list[int] = []
        self._ends: list[int] = []
        self._devices: list[MmioDevice] = []
        self.fallback: MmioDevice = Unclaimed()

    def add(self, base: int, size: int, device: MmioDevice) -> None:
        i = bisect_right(self._bases, base)
        if (i > 0 and self._ends[i - 1] > base) or (
            i < len(self._bases) and self._bases[i] < base + size
        ):
            raise ValueError(f"MMIO [{base:#x}, {base + size:#x}) overlaps a claimed range")
        self._bases.insert(i, base)
        self._ends.insert(i, base + size)
        self._devices.insert(i, device)

    def _find(self, address: int, size: int) -> MmioDevice:
        i = bisect_right(self._bases, address) - 1
        if i >= 0 and address + size <= self._ends[i]:
            return self._devices[i]
        return self.fallback

    def read(self, address: int, size: int) -> int:
        return self._find(address, size).mmio_read(address, size)

    def write(self, address: int, size: int, value: int) -> None:
        self._find(address, size).mmio_write(address, size, value)


# -- guest memory


class GuestRam:
    """Guest RAM in a memfd, mapped shared: the device server can map the same pages.

    Mapped with libc's mmap rather than Python's so that no buffer export
    pins it: `close` always unmaps.
    """

    def __init__(self, size: int, name: str = "guest-ram") -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest RAM size {size:#x} is not a positive multiple of 4 KiB")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            # A server that maps it must not be crashed by a shrink (SIGBUS on
            # access); the size is fixed for the VM's life anyway.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.address = mmap_shared(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self._closed = False

    @property
    def path(self) -> str:
        """A path another process of this user can open to map the same memory."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"guest RAM access [{offset:#x}, {offset + length:#x}) is outside "
                f"[0, {self.size:#x})"
            )

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        ctypes.memmove(self.address + offset, data, len(data))

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return ctypes.string_at(self.address + offset, length)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            munmap(self.address, self.size)
            os.close(self.fd)


@dataclass(frozen=True, slots=True)
class Memslot:
    slot: int
    guest_address: int
    size: int
    host_address: int
    flags: int = 0


# -- results


@dataclass(slots=True)
class RunResult:
    """How a run ended. `reason`: exit-port, hlt, shutdown, internal-error, fail-entry,
    system-event, timeout, error."""

    reason: str
    status: int | None = None
    message: str = ""
    vcpu: int = 0
    exits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason == "exit-port" and self.status == 0


# -- vCPUs


class Vcpu:
    """One vCPU: its fd, its mapped kvm_run page, its registers."""

    def __init__(self, vm: Vm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = ioctl(vm.fd, abi.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            self._run_size = vm.vcpu_mmap_size
            self._run_address = mmap_shared(self.fd, self._run_size)
        except BaseException:
            os.close(self.fd)
            raise
        self.run_struct = abi.kvm_run.from_address(self._run_address)
        self.thread_id: int | None = None
        self.kick_lock = threading.Lock()
        self.exits: dict[str, int] = {}

    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        ioctl(self.fd, abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_cpuid(self, entries: ctypes.Array[ctypes.c_char]) -> None:
        ioctl(self.fd, abi.KVM_SET_CPUID2, entries, "KVM_SET_CPUID2")

    def get_mp_state(self) -> int:
        state = abi.kvm_mp_state()
        ioctl(self.fd, abi.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return int(state.mp_state)

    def make_runnable(self) -> None:
        """Start this vCPU where its registers say, without INIT/SIPI.

        With the in-kernel LAPIC every vCPU but 0 begins UNINITIALIZED: KVM_RUN
        waits for the INIT/SIPI a kernel sends. A freestanding program set up
        by the VMM on every vCPU has no one to send it.
        """
        state = abi.kvm_mp_state(mp_state=abi.KVM_MP_STATE_RUNNABLE)
        ioctl(self.fd, abi.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    def block_kicks(self) -> None:
        """On the vCPU's thread: block the kick signal except while inside KVM_RUN."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL}) | {KICK_SIGNAL}
        bits = 0
        for sig in blocked:
            bits |= 1 << (int(sig) - 1)
        mask = abi.kvm_signal_mask8(len=8, sigset=bits & ~(1 << (int(KICK_SIGNAL) - 1)))
        ioctl(self.fd, abi.KVM_SET_SIGNAL_MASK, mask, "KVM_SET_SIGNAL_MASK")

    def kick(self) -> None:
        """Make a running KVM_RUN return soon (immediate_exit + a signal to the thread)."""
        self.run_struct.immediate_exit = 1
        with self.kick_lock:
            if self.thread_id is not None:
                pthread_kill(self.thread_id, KICK_SIGNAL)

    def loop(self) -> RunResult:
        """Run until something ends the VM; dispatch IO and MMIO exits meanwhile."""
        run = self.run_struct
        exit_union = run.exit
        io = exit_union.io
        mmio = exit_union.mmio
        pio_bus = self.vm.pio
        mmio_bus = self.vm.mmio
        base = self._run_address
        exits = self.exits
        fd = self.fd
        run_request = abi.KVM_RUN
        vm = self.vm
        while True:
            if vm.stopping:
                return RunResult("stopped", vcpu=self.index)
            rc = ioctl_errno(fd, run_request, 0)
            if rc < 0:
                if rc == -4:  # EINTR: kicked; consume the kick, look at `stopping`
                    signal.sigtimedwait((KICK_SIGNAL,), 0)
                    run.immediate_exit = 0
                    continue
                if rc == -11:  # EAGAIN: spurious, retry
                    continue
                return RunResult("error", message=f"KVM_RUN: {os.strerror(-rc)}", vcpu=self.index)
            reason = run.exit_reason
            name = abi.EXIT_REASON_NAMES.get(reason, str(reason))
            exits[name] = exits.get(name, 0) + 1
            try:
                if reason == abi.KVM_EXIT_IO:
                    size = io.size
                    port = io.port
                    # `count` items at data_offset: rep ins/outs move several at once.
                    at = base + io.data_offset
                    if io.direction == abi.KVM_EXIT_IO_OUT:
                        for _ in range(io.count):
                            value = int.from_bytes(ctypes.string_at(at, size), "little")
                            pio_bus.write(port, size, value)
                            at += size
                    else:
                        for _ in range(io.count):
                            value = pio_bus.read(port, size)
                            ctypes.memmove(at, value.to_bytes(size, "little"), size)
                            at += size
                elif reason == abi.KVM_EXIT_MMIO:
                    length = mmio.len
                    if mmio.is_write:
                        value = int.from_bytes(bytes(mmio.data)[:length], "little")
                        mmio_bus.write(mmio.phys_addr, length, value)
                    else:
                        value = mmio_bus.read(mmio.phys_addr, length)
                        ctypes.memmove(mmio.data, value.to_bytes(length, "little"), length)
                else:
                    ended = self._final_exit(reason)
                    if ended is not None:
                        return ended
            except GuestExit as e:
                return RunResult(e.reason, status=e.status, vcpu=self.index)

    def _final_exit(self, reason: int) -> RunResult | None:
        if reason == abi.KVM_EXIT_HLT:
            return RunResult("hlt", message=f"HLT at rip {self._rip():#x}", vcpu=self.index)
        if reason == abi.KVM_EXIT_SHUTDOWN:
            return RunResult(
                "shutdown",
                message=f"triple fault (KVM_EXIT_SHUTDOWN) near rip {self._rip():#x}",
                vcpu=self.index,
            )
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            internal = self.run_struct.exit.internal
            data = " ".join(f"{internal.data[i]:#x}" for i in range(min(internal.ndata, 16)))
            return RunResult(
                "internal-error",
                message=(
                    f"KVM_EXIT_INTERNAL_ERROR suberror {internal.suberror} "
                    f"(1 = the instruction emulator refused an instruction; under kvm_pvm "
                    f"see frontend-kvm.md for the ones to avoid) at {self.where()}"
                    + (f"; data {data}" if data else "")
                ),
                vcpu=self.index,
            )
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            reason_code = self.run_struct.exit.fail_entry.hardware_entry_failure_reason
            return RunResult(
                "fail-entry",
                message=f"VM entry failed (hardware reason {reason_code:#x}) at {self.where()}",
                vcpu=self.index,
            )
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            kind = self.run_struct.exit.system_event.type
            return RunResult("system-event", status=kind, message=f"system event {kind}")
        if reason == abi.KVM_EXIT_INTR:
            return None  # a signal while running: the loop checks `stopping`
        return RunResult(
            "error",
            message=f"unhandled exit {abi.EXIT_REASON_NAMES.get(reason, reason)} at {self.where()}",
            vcpu=self.index,
        )

    def _rip(self) -> int:
        try:
            return int(self.get_regs().rip)
        except OSError:
            return -1

    def where(self) -> str:
        """RIP and the 15 bytes there (the guest maps memory 1:1, so RIP is a RAM offset)."""
        rip = self._rip()
        ram = self.vm.ram
        if rip >= KERNEL_TEXT_BASE and rip - KERNEL_TEXT_BASE < ram.size:
            # Linux's kernel text mapping (no KASLR on a direct vmlinux boot): phys = rip - base.
            phys = rip - KERNEL_TEXT_BASE
            code = ram.read(phys, min(15, ram.size - phys)).hex(" ")
            return f"rip {rip:#x} (physical {phys:#x}), instruction bytes {code}"
        if 0 <= rip < ram.size:
            code = ram.read(rip, min(15, ram.size - rip)).hex(" ")
            return f"rip {rip:#x}, instruction bytes {code}"
        return f"rip {rip:#x} (outside RAM; bytes unavailable)"

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_struct
            munmap(self._run_address, self._run_size)
            os.close(self.fd)
            self.fd = -1


# -- the VM


class Vm:
    """A VM with `memory_size` bytes of RAM: from guest-physical 0 up to the 32-bit PCI
    hole (memslot 0), the rest from 4 GiB (memslot 1); see ramlayout.py."""

    def __init__(self, memory_size: int, *, irqchip: bool = False, kvm_path: str = KVM_PATH):
        self.kvm_fd = open_kvm(kvm_path)
        self.fd = -1
        try:
            self.ram = GuestRam(memory_size)
        except BaseException:
            os.close(self.kvm_fd)
            raise
        self.vcpus: list[Vcpu] = []
        self.memslots: dict[int, Memslot] = {}
        self.pio = PioBus()
        self.mmio = MmioBus()
        self.stopping = False
        self.irqchip = irqchip
        self.msis_signalled = 0
        self.msis_delivered = 0
        try:
            self.fd = ioctl(self.kvm_fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            self.vcpu_mmap_size = ioctl(
                self.kvm_fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"
            )
            # Intel VMX needs a TSS area for real-mode emulation; harmless elsewhere.
            ioctl(self.fd, abi.KVM_SET_TSS_ADDR, TSS_ADDRESS, "KVM_SET_TSS_ADDR")
            if irqchip:
                # Must precede vCPU creation (EINVAL after); needed for KVM_SIGNAL_MSI.
                ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
                pit = abi.kvm_pit_config(flags=abi.KVM_PIT_SPEAKER_DUMMY)
                ioctl(self.fd, abi.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")
            self.ram_regions: tuple[RamRegion, ...] = ram_regions(memory_size)
            for region in self.ram_regions:
                self.add_memslot(
                    region.guest_address, region.size, self.ram.address + region.offset
                )
        except BaseException:
            self.close()
            raise

    # guest-physical access to RAM (the RAM file has no hole; guest-physical space has)

    def ram_offset(self, address: int, length: int) -> int:
        at = file_offset(self.ram_regions, address, length)
        if at is None:
            raise ValueError(f"[{address:#x}, {address + length:#x}) is not guest RAM")
        return at

    def read_guest(self, address: int, length: int) -> bytes:
        return self.ram.read(self.ram_offset(address, length), length)

    def write_guest(self, address: int, data: bytes) -> None:
        self.ram.write(self.ram_offset(address, len(data)), data)

    # memslots

    def _set_region(self, slot: Memslot, size: int) -> None:
        region = abi.kvm_userspace_memory_region(
            slot=slot.slot,
            flags=slot.flags,
            guest_phys_addr=slot.guest_address,
            memory_size=size,
            userspace_addr=slot.host_address,
        )
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def add_memslot(self, guest_address: int, size: int, host_address: int, flags: int = 0) -> int:
        """Map host memory at a guest-physical range; returns the slot id."""
        if guest_address % PAGE or size % PAGE or host_address % PAGE:
            raise ValueError("memslot address, size and host address must be page aligned")
        slot_id = next(i for i in range(len(self.memslots) + 1) if i not in self.memslots)
        slot = Memslot(slot_id, guest_address, size, host_address, flags)
        self._set_region(slot, size)
        self.memslots[slot_id] = slot
        return slot_id

    def move_memslot(self, slot_id: int, guest_address: int) -> None:
        """Move a slot: KVM treats the same slot id and size at a new address as a move."""
        old = self.memslots[slot_id]
        if guest_address % PAGE:
            raise ValueError(f"memslot address {guest_address:#x} is not page aligned")
        new = Memslot(slot_id, guest_address, old.size, old.host_address, old.flags)
        self._set_region(new, new.size)
        self.memslots[slot_id] = new

    def delete_memslot(self, slot_id: int) -> None:
        slot = self.memslots.pop(slot_id)
        self._set_region(slot, 0)  # size 0 deletes

    # vCPUs and interrupts

    def create_vcpu(self, *, cpuid: bool = True) -> Vcpu:
        """A new vCPU; with `cpuid`, given KVM's supported CPUID (its APIC id in leaf 1).

        Without KVM_SET_CPUID2 a vCPU has an empty CPUID table, which a real
        kernel will not boot with; note that kvm_pvm does not honour every
        bit of it (frontend-kvm.md §0: leaf 1 ECX reads the host's).
        """
        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        if cpuid:
            table = self.supported_cpuid()
            for entry in abi.cpuid2_entries(table):
                if entry.function == 1:
                    entry.ebx = (entry.ebx & 0x00FF_FFFF) | (vcpu.index << 24)
            vcpu.set_cpuid(table)
        return vcpu

    def supported_cpuid(self) -> ctypes.Array[ctypes.c_char]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits (E2BIG)."""
        nent = 64
        while True:
            buf = abi.cpuid2_buffer(nent)
            try:
                ioctl(self.kvm_fd, abi.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
                return buf
            except OSError as e:
                if e.errno != 7 or nent >= 4096:  # E2BIG
                    raise
                nent *= 2

    def signal_msi(self, address: int, data: int) -> bool:
        """Inject an MSI (KVM_SIGNAL_MSI); True if a LAPIC accepted it.

        Without the in-kernel irqchip there is nothing to inject into: it is
        only counted. With it, 0 means the guest's LAPIC dropped it (not yet
        enabled, or masked), which is the guest's business, not an error.
        """
        self.msis_signalled += 1
        if not self.irqchip:
            return False
        msi = abi.kvm_msi(address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data)
        delivered = ioctl(self.fd, abi.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI") > 0
        self.msis_delivered += delivered
        return delivered

    def irq_line(self, gsi: int, level: bool) -> None:
        line = abi.kvm_irq_level(irq=gsi, level=int(level))
        ioctl(self.fd, abi.KVM_IRQ_LINE, line, "KVM_IRQ_LINE")

    # running

    def run(self, timeout: float | None = None) -> RunResult:
        """Run every vCPU on its own thread until one ends the VM (or `timeout` s pass)."""
        if not self.vcpus:
            raise RuntimeError("create a vCPU first")
        self.stopping = False
        results: list[RunResult] = []
        done = threading.Event()

        def body(vcpu: Vcpu) -> None:
            try:
                vcpu.block_kicks()
                vcpu.thread_id = threading.get_ident()
                result = vcpu.loop()
            except BaseException as e:  # a device bug must still end the run
                result = RunResult("error", message=f"{type(e).__name__}: {e}", vcpu=vcpu.index)
            finally:
                with vcpu.kick_lock:  # no pthread_kill may target a thread that has ended
                    vcpu.thread_id = None
            results.append(result)
            done.set()

        start = time.monotonic()
        threads = [
            threading.Thread(target=body, args=(v,), name=f"vcpu{v.index}", daemon=True)
            for v in self.vcpus
        ]
        for t in threads:
            t.start()
        finished = done.wait(timeout)
        self.stopping = True
        for v in self.vcpus:
            v.kick()
        for t in threads:
            while t.is_alive():
                t.join(0.05)
                if t.is_alive():
                    self.vcpus[threads.index(t)].kick()
        elapsed = time.monotonic() - start
        for v in self.vcpus:
            v.run_struct.immediate_exit = 0
        first = next((r for r in results if r.reason != "stopped"), None)
        if not finished or first is None:
            first = RunResult("timeout", message=f"the guest did not finish within {timeout} s")
        first.seconds = elapsed
        first.exits = self.exit_counts()
        return first

    def exit_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for v in self.vcpus:
            for name, n in v.exits.items():
                total[name] = total.get(name, 0) + n
        return total

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.ram.close()
        if self.kvm_fd >= 0:
            os.close(self.kvm_fd)
            self.kvm_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
