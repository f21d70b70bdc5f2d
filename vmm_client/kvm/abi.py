"""The KVM userspace ABI for x86-64: ioctl numbers and ctypes structs.

Numbers are computed the way include/uapi/asm-generic/ioctl.h does
(`_IO/_IOR/_IOW/_IOWR`) from the struct sizes, and the sizes are asserted at
import time against what Linux's include/uapi/linux/kvm.h and
arch/x86/include/uapi/asm/kvm.h give on x86-64 (tests/kvm/test_abi.py also
compares both with gcc and the installed headers), so a layout mistake fails
loudly instead of corrupting a guest.

Struct classes keep the kernel's lower-case names, so they can be grepped
for in kvm.h. The vCPU loop reads `kvm_run` through these structs; everything else here is
set-up, where clarity beats speed.
"""

from __future__ import annotations

import ctypes
from typing import Final

# -- asm-generic/ioctl.h

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def io(kind: int, nr: int) -> int:
    return _ioc(_IOC_NONE, kind, nr, 0)


def ior(kind: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, kind, nr, size)


def iow(kind: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, kind, nr, size)


def iowr(kind: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, kind, nr, size)


KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

# -- structs (field names as in the kernel headers)


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = (
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    )


class kvm_regs(ctypes.Structure):
    _fields_ = tuple(
        (name, u64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    )


class kvm_segment(ctypes.Structure):
    _fields_ = (
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    )


class kvm_dtable(ctypes.Structure):
    _fields_ = (("base", u64), ("limit", u16), ("padding", u16 * 3))


KVM_NR_INTERRUPTS: Final = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = (
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class kvm_pit_config(ctypes.Structure):
    _fields_ = (("flags", u32), ("pad", u32 * 15))


class kvm_msi(ctypes.Structure):
    _fields_ = (
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    )


class kvm_irq_level(ctypes.Structure):
    # The kernel's is `union { __u32 irq; __s32 status; }; __u32 level;`.
    _fields_ = (("irq", u32), ("level", u32))


class kvm_signal_mask(ctypes.Structure):
    """The header; `len` bytes of kernel sigset follow (8 on x86-64)."""

    _fields_ = (("len", u32),)


class kvm_signal_mask8(ctypes.Structure):
    """kvm_signal_mask with its 8-byte x86-64 sigset in place."""

    _fields_ = (("len", u32), ("sigset", u64))
    _pack_ = 4


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = (
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    )


class kvm_cpuid2(ctypes.Structure):
    """The header only; the entries follow it (see `cpuid2_buffer`)."""

    _fields_ = (("nent", u32), ("padding", u32))


def cpuid2_buffer(nent: int) -> ctypes.Array[ctypes.c_char]:
    """A zeroed kvm_cpuid2 with room for `nent` entries (the kernel's flexible array)."""
    buf = ctypes.create_string_buffer(
        ctypes.sizeof(kvm_cpuid2) + nent * ctypes.sizeof(kvm_cpuid_entry2)
    )
    kvm_cpuid2.from_buffer(buf).nent = nent
    return buf


def cpuid2_entries(buf: ctypes.Array[ctypes.c_char]) -> ctypes.Array[kvm_cpuid_entry2]:
    """The entries of a kvm_cpuid2 buffer, as many as its `nent` says."""
    nent = kvm_cpuid2.from_buffer(buf).nent
    entries: ctypes.Array[kvm_cpuid_entry2] = (kvm_cpuid_entry2 * nent).from_buffer(
        buf, ctypes.sizeof(kvm_cpuid2)
    )
    return entries


# -- struct kvm_run and its exit unions


class kvm_run_io(ctypes.Structure):
    _fields_ = (
        ("direction", u8),  # KVM_EXIT_IO_IN / _OUT
        ("size", u8),  # bytes per item: 1, 2 or 4
        ("port", u16),
        ("count", u32),  # items (rep ins/outs)
        ("data_offset", u64),  # from the start of kvm_run
    )


class kvm_run_mmio(ctypes.Structure):
    _fields_ = (
        ("phys_addr", u64),
        ("data", u8 * 8),
        ("len", u32),
        ("is_write", u8),
    )


class kvm_run_internal(ctypes.Structure):
    _fields_ = (("suberror", u32), ("ndata", u32), ("data", u64 * 16))


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = (("hardware_entry_failure_reason", u64), ("cpu", u32))


class kvm_run_system_event(ctypes.Structure):
    _fields_ = (("type", u32), ("ndata", u32), ("data", u64 * 16))


class kvm_run_exit(ctypes.Union):
    _fields_ = (
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("fail_entry", kvm_run_fail_entry),
        ("system_event", kvm_run_system_event),
        ("padding", ctypes.c_char * 256),
    )


class kvm_run(ctypes.Structure):
    """The head of the vCPU's shared page (it is GET_VCPU_MMAP_SIZE long in all)."""

    _fields_ = (
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
        # After the 256-byte union: kvm_valid_regs, kvm_dirty_regs, then the
        # 2 KiB sync-regs union; we use neither.
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * 2048),
    )


class kvm_msrs(ctypes.Structure):
    """The header only; `nmsrs` kvm_msr_entry follow (`msrs_buffer`)."""

    _fields_ = (("nmsrs", u32), ("pad", u32))


class kvm_msr_entry(ctypes.Structure):
    _fields_ = (("index", u32), ("reserved", u32), ("data", u64))


def msrs_buffer(values: dict[int, int]) -> ctypes.Array[ctypes.c_char]:
    """A kvm_msrs with one entry per (index, value)."""
    buf = ctypes.create_string_buffer(
        ctypes.sizeof(kvm_msrs) + len(values) * ctypes.sizeof(kvm_msr_entry)
    )
    kvm_msrs.from_buffer(buf).nmsrs = len(values)
    for i, (index, value) in enumerate(values.items()):
        at = ctypes.sizeof(kvm_msrs) + i * ctypes.sizeof(kvm_msr_entry)
        entry = kvm_msr_entry.from_buffer(buf, at)
        entry.index, entry.data = index, value
    return buf


class kvm_lapic_state(ctypes.Structure):
    _fields_ = (("regs", ctypes.c_char * 1024),)


class kvm_mp_state(ctypes.Structure):
    _fields_ = (("mp_state", u32),)


# Sizes and offsets on x86-64 (pahole of Linux 6.1; also checked against gcc in the tests).
assert ctypes.sizeof(kvm_userspace_memory_region) == 32
assert ctypes.sizeof(kvm_regs) == 144
assert ctypes.sizeof(kvm_segment) == 24
assert ctypes.sizeof(kvm_dtable) == 16
assert ctypes.sizeof(kvm_sregs) == 312
assert ctypes.sizeof(kvm_pit_config) == 64
assert ctypes.sizeof(kvm_msi) == 32
assert ctypes.sizeof(kvm_irq_level) == 8
assert ctypes.sizeof(kvm_signal_mask) == 4
assert ctypes.sizeof(kvm_signal_mask8) == 12
assert ctypes.sizeof(kvm_cpuid_entry2) == 40
assert ctypes.sizeof(kvm_cpuid2) == 8
assert ctypes.sizeof(kvm_msr_entry) == 16
assert ctypes.sizeof(kvm_lapic_state) == 1024
assert ctypes.sizeof(kvm_mp_state) == 4
assert kvm_run.exit_reason.offset == 8
assert kvm_run.exit.offset == 32
assert ctypes.sizeof(kvm_run) == 2352
assert kvm_run_mmio.len.offset == 16
assert kvm_run_mmio.is_write.offset == 20

# -- ioctls (system fd, VM fd, vCPU fd)

KVM_GET_API_VERSION: Final = io(KVMIO, 0x00)
KVM_CREATE_VM: Final = io(KVMIO, 0x01)
KVM_CHECK_EXTENSION: Final = io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = io(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID: Final = iowr(KVMIO, 0x05, ctypes.sizeof(kvm_cpuid2))
KVM_CREATE_VCPU: Final = io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION: Final = iow(KVMIO, 0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_SET_TSS_ADDR: Final = io(KVMIO, 0x47)
KVM_CREATE_IRQCHIP: Final = io(KVMIO, 0x60)
KVM_IRQ_LINE: Final = iow(KVMIO, 0x61, ctypes.sizeof(kvm_irq_level))
KVM_CREATE_PIT2: Final = iow(KVMIO, 0x77, ctypes.sizeof(kvm_pit_config))
KVM_SIGNAL_MSI: Final = iow(KVMIO, 0xA5, ctypes.sizeof(kvm_msi))
KVM_RUN: Final = io(KVMIO, 0x80)
KVM_GET_REGS: Final = ior(KVMIO, 0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS: Final = iow(KVMIO, 0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS: Final = ior(KVMIO, 0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS: Final = iow(KVMIO, 0x84, ctypes.sizeof(kvm_sregs))
KVM_SET_SIGNAL_MASK: Final = iow(KVMIO, 0x8B, ctypes.sizeof(kvm_signal_mask))
KVM_SET_CPUID2: Final = iow(KVMIO, 0x90, ctypes.sizeof(kvm_cpuid2))
KVM_SET_MSRS: Final = iow(KVMIO, 0x89, ctypes.sizeof(kvm_msrs))
KVM_GET_LAPIC: Final = ior(KVMIO, 0x8E, ctypes.sizeof(kvm_lapic_state))
KVM_SET_LAPIC: Final = iow(KVMIO, 0x8F, ctypes.sizeof(kvm_lapic_state))
KVM_GET_MP_STATE: Final = ior(KVMIO, 0x98, ctypes.sizeof(kvm_mp_state))
KVM_SET_MP_STATE: Final = iow(KVMIO, 0x99, ctypes.sizeof(kvm_mp_state))

# Constants used with them.
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_PIT_SPEAKER_DUMMY: Final = 1
KVM_MP_STATE_RUNNABLE: Final = 0
KVM_MP_STATE_UNINITIALIZED: Final = 1
KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_SIGNAL_MSI: Final = 77
KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24

EXIT_REASON_NAMES: Final = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_DEBUG: "DEBUG",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
}

# Control-register and EFER bits for the long-mode set-up.
CR0_PE: Final = 1 << 0
CR0_ET: Final = 1 << 4
CR0_PG: Final = 1 << 31
CR4_PAE: Final = 1 << 5
EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10
