"""Entering a freestanding guest program in 64-bit long mode, and loading it.

The VMM does what firmware and a boot loader would: a flat GDT, identity
page tables for the low 4 GiB (2 MiB pages; the top GiB holds the PCI BARs
the guest assigns, so it must be mapped too) and for RAM above 4 GiB (up to
16 GiB in all), CR0/CR4/EFER for long mode, and RIP at the program's entry,
with its arguments (SysV: rdi, rsi, rdx, rcx). Layout (Firecracker's,
frontend-kvm.md §2.2):

    0x0500  GDT: null, 64-bit code (0x08), data (0x10), user code (0x1B), user data (0x23)
    0x9000  PML4, 0xA000 PDPT, 0xB000.. one page directory per mapped GiB (4..16)
    0x80000 initial stack top (grows down)
    0x100000 the program (flat binary, or ELF PT_LOADs at their physical addresses)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from . import abi
from .ramlayout import ram_top
from .vm import GuestRam, Vcpu

GDT_ADDRESS: Final = 0x500
PML4_ADDRESS: Final = 0x9000
PDPT_ADDRESS: Final = 0xA000
PD_ADDRESS: Final = 0xB000
STACK_TOP: Final = 0x80000
LOAD_ADDRESS: Final = 0x100000
MAPPED_GIB: Final = 4  # at least: the PCI hole and the LAPIC/IOAPIC are below 4 GiB
MAX_MAPPED_GIB: Final = 16  # page directories up to 0x1AFFF, below Linux's cmdline at 0x20000
GIB: Final = 1 << 30
ARGUMENT_REGISTERS: Final = ("rdi", "rsi", "rdx", "rcx")

CODE_SELECTOR: Final = 0x08
DATA_SELECTOR: Final = 0x10
USER_CODE_SELECTOR: Final = 0x18 | 3
USER_DATA_SELECTOR: Final = 0x20 | 3
RFLAGS_RESERVED: Final = 0x2
RFLAGS_IOPL3: Final = 0x3000

# Page-table entry bits. Every entry is user-accessible: ring-3 programs
# (which kvm_pvm runs natively) see the same identity map, devices included.
_P, _RW, _US, _PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor from Firecracker's (flags, base, limit) triple."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0xFFFF)
    )


def _segment(selector: int, code: bool, dpl: int = 0) -> abi.kvm_segment:
    return abi.kvm_segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=0xB if code else 0x3,  # execute/read accessed, or read/write accessed
        present=1,
        dpl=dpl,
        db=0 if code else 1,  # a 64-bit code segment must have D=0
        s=1,
        l=1 if code else 0,
        g=1,
    )


def mapped_gib(ram_size: int) -> int:
    """GiBs the identity map covers: all of RAM (with the hole), at least 4, at most 16."""
    return min(MAX_MAPPED_GIB, max(MAPPED_GIB, -(-ram_top(ram_size) // GIB)))


def write_long_mode_tables(ram: GuestRam) -> None:
    gdt = [
        0,
        gdt_entry(0xA09B, 0, 0xFFFFF),  # ring-0 code: L, P, DPL 0, execute/read
        gdt_entry(0xC093, 0, 0xFFFFF),  # ring-0 data
        gdt_entry(0xA0FB, 0, 0xFFFFF),  # ring-3 code: DPL 3
        gdt_entry(0xC0F3, 0, 0xFFFFF),  # ring-3 data
    ]
    ram.write(GDT_ADDRESS, struct.pack(f"<{len(gdt)}Q", *gdt))
    gib = mapped_gib(ram.size)
    ram.write(PML4_ADDRESS, struct.pack("<Q", PDPT_ADDRESS | _P | _RW | _US))
    ram.write(
        PDPT_ADDRESS,
        struct.pack(f"<{gib}Q", *(PD_ADDRESS + 0x1000 * i | _P | _RW | _US for i in range(gib))),
    )
    entries = [(i << 21) | _P | _RW | _US | _PS for i in range(512 * gib)]
    ram.write(PD_ADDRESS, struct.pack(f"<{len(entries)}Q", *entries))


def enter_long_mode(
    vcpu: Vcpu,
    entry: int,
    stack_top: int = STACK_TOP,
    *,
    user: bool = False,
    arguments: tuple[int, ...] = (),
) -> None:
    """Write the tables and point the vCPU at `entry`, 64-bit, interrupts off.

    `user` starts it at ring 3 (CPL comes from the CS/SS DPL KVM is given),
    with IOPL 3 so that port IO is allowed. kvm_pvm runs ring-3 code natively
    (~0.3 ns for a dec/jnz iteration against ~1 us at ring 0), and there
    every ring-3 port access exits to the VMM whatever the IOPL (the guest
    reads RFLAGS as 0x202; `hlt`, `cli` and CR reads do fault) -- measured
    2026-11-25, see tests/kvm/test_ring3.py; frontend-kvm.md's last note
    says ring-3 `out` faults, which did not reproduce. On hardware KVM,
    IOPL 3 is what makes the same program work.
    """
    write_long_mode_tables(vcpu.vm.ram)
    sregs = vcpu.get_sregs()
    if user:
        code = _segment(USER_CODE_SELECTOR, code=True, dpl=3)
        data = _segment(USER_DATA_SELECTOR, code=False, dpl=3)
    else:
        code = _segment(CODE_SELECTOR, code=True)
        data = _segment(DATA_SELECTOR, code=False)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base = GDT_ADDRESS
    sregs.gdt.limit = 5 * 8 - 1
    sregs.cr3 = PML4_ADDRESS
    sregs.cr4 = abi.CR4_PAE
    sregs.cr0 = abi.CR0_PE | abi.CR0_ET | abi.CR0_PG
    sregs.efer = abi.EFER_LME | abi.EFER_LMA
    vcpu.set_sregs(sregs)
    rflags = RFLAGS_RESERVED | (RFLAGS_IOPL3 if user else 0)
    regs = abi.kvm_regs(rip=entry, rsp=stack_top, rbp=stack_top, rflags=rflags)
    if len(arguments) > len(ARGUMENT_REGISTERS):
        raise ValueError(f"at most {len(ARGUMENT_REGISTERS)} program arguments")
    for name, value in zip(ARGUMENT_REGISTERS, arguments, strict=False):
        setattr(regs, name, value)
    vcpu.set_regs(regs)


# -- loading a program


@dataclass(frozen=True, slots=True)
class LoadedProgram:
    entry: int
    start: int
    end: int  # one past the last byte loaded
    kind: str  # "elf" or "flat"


_EHDR = struct.Struct("<4sBBBBB7xHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD: Final = 1


def load_program(ram: GuestRam, image: bytes, load_address: int = LOAD_ADDRESS) -> LoadedProgram:
    """Put a 64-bit ELF (PT_LOADs at p_paddr) or a flat binary (at `load_address`) in RAM."""
    if image[:4] != b"\x7fELF":
        ram.write(load_address, image)
        return LoadedProgram(load_address, load_address, load_address + len(image), "flat")
    fields = _EHDR.unpack_from(image)
    klass, endian = fields[1], fields[2]
    if klass != 2 or endian != 1:
        raise ValueError("the guest program must be a 64-bit little-endian ELF (or flat binary)")
    # e_entry, e_phoff, e_phentsize, e_phnum (after the 16-byte e_ident as 6 fields).
    entry, phoff, phentsize, phnum = fields[9], fields[10], fields[14], fields[15]
    start, end = 1 << 64, 0
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            image, phoff + i * phentsize
        )
        if p_type != PT_LOAD or memsz == 0:
            continue
        ram.write(paddr, image[offset : offset + filesz])
        ram.write(paddr + filesz, bytes(memsz - filesz))
        start, end = min(start, paddr), max(end, paddr + memsz)
    if end == 0:
        raise ValueError("the ELF guest program has no PT_LOAD segment")
    return LoadedProgram(entry, start, end, "elf")
