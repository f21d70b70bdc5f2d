"""Pure builders for booting x86 Linux: kernel parsing, boot_params, e820, MP table, placement.

Specs: the Linux/x86 boot protocol (Documentation/arch/x86/boot.rst, "64-bit
Boot Protocol"; the zero page per Documentation/arch/x86/zero-page.rst and
arch/x86/include/uapi/asm/bootparam.h) and the Intel MultiProcessor
Specification 1.4 (floating pointer + configuration table). Everything here
returns bytes or numbers; linux_boot.py writes them into a VM. Layout
(Firecracker's, frontend-kvm.md §2.2):

    0x00500  GDT        0x07000 zero page   0x09000.. page tables (boot.py)
    0x20000  cmdline    0xF0000 MP table    1 MiB+   kernel    top of low RAM: initrd
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from .intx import IntxSource
from .ramlayout import FOUR_GIB, PCI_HOLE_START, ram_regions

ZERO_PAGE_ADDRESS: Final = 0x7000
CMDLINE_ADDRESS: Final = 0x20000
MPTABLE_ADDRESS: Final = 0xF0000
BZIMAGE_LOAD_ADDRESS: Final = 0x100000  # where a bzImage's protected-mode part goes
EBDA_START: Final = 0x9FC00
BIOS_START: Final = 0xF0000
HIGH_MEMORY: Final = 0x100000
IOAPIC_ADDRESS: Final = 0xFEC0_0000
LAPIC_ADDRESS: Final = 0xFEE0_0000

# boot_params offsets (zero-page.rst / bootparam.h).
BP_SCREEN_INFO: Final = 0x000
BP_E820_ENTRIES: Final = 0x1E8
BP_HDR: Final = 0x1F1
BP_E820_TABLE: Final = 0x2D0
E820_MAX_ENTRIES: Final = 128
# setup_header offsets (boot.rst), absolute in the zero page / bzImage.
HDR_SETUP_SECTS: Final = 0x1F1
HDR_BOOT_FLAG: Final = 0x1FE
HDR_JUMP: Final = 0x200
HDR_HEADER: Final = 0x202
HDR_VERSION: Final = 0x206
HDR_TYPE_OF_LOADER: Final = 0x210
HDR_LOADFLAGS: Final = 0x211
HDR_CODE32_START: Final = 0x214
HDR_RAMDISK_IMAGE: Final = 0x218
HDR_RAMDISK_SIZE: Final = 0x21C
HDR_HEAP_END_PTR: Final = 0x224
HDR_CMD_LINE_PTR: Final = 0x228
HDR_INITRD_ADDR_MAX: Final = 0x22C
HDR_KERNEL_ALIGNMENT: Final = 0x230
HDR_XLOADFLAGS: Final = 0x236
HDR_CMDLINE_SIZE: Final = 0x238
HDR_PAYLOAD_OFFSET: Final = 0x248
HDR_PAYLOAD_LENGTH: Final = 0x24C
HDR_PREF_ADDRESS: Final = 0x258
HDR_INIT_SIZE: Final = 0x260

LOADED_HIGH: Final = 0x01
KEEP_SEGMENTS: Final = 0x40
CAN_USE_HEAP: Final = 0x80
XLF_KERNEL_64: Final = 0x01
TYPE_OF_LOADER_UNDEFINED: Final = 0xFF  # "no assigned id" per boot.rst
MIN_PROTOCOL: Final = 0x206
E820_RAM: Final = 1
E820_RESERVED: Final = 2
VIDEO_TYPE_VLFB: Final = 0x23


class NotAKernel(ValueError):
    """The file is neither a bzImage (HdrS, protocol >= 2.06, 64-bit) nor a 64-bit vmlinux ELF."""


@dataclass(frozen=True, slots=True)
class Segment:
    address: int  # guest-physical
    data: bytes
    memsz: int  # data is zero-extended to this


@dataclass(frozen=True, slots=True)
class KernelImage:
    kind: str  # "bzimage" or "vmlinux"
    entry: int  # 64-bit entry point (physical)
    segments: tuple[Segment, ...]
    setup_header: bytes = b""  # bzImage bytes 0x1F1.. (copied into the zero page)
    cmdline_size: int = 2047  # pre-2.06 default; the header's when present
    initrd_addr_max: int = 0x7FFF_FFFF
    init_size: int = 0  # memory the kernel needs from its load address while booting
    pvh_entry: int | None = None  # XEN_ELFNOTE_PHYS32_ENTRY (32-bit; informational)

    @property
    def start(self) -> int:
        return min(s.address for s in self.segments)

    @property
    def end(self) -> int:
        """One past the last byte the kernel may use while decompressing/booting."""
        loaded = max(s.address + s.memsz for s in self.segments)
        return max(loaded, self.start + self.init_size)


def parse_kernel(data: bytes) -> KernelImage:
    """A bzImage or a vmlinux ELF; NotAKernel with the reason otherwise."""
    if data[:4] == b"\x7fELF":
        return parse_vmlinux(data)
    if len(data) > HDR_HEADER + 4 and data[HDR_HEADER : HDR_HEADER + 4] == b"HdrS":
        return parse_bzimage(data)
    raise NotAKernel("neither a bzImage (no 'HdrS' setup header at 0x202) nor an ELF vmlinux")


def _u8(b: bytes, at: int) -> int:
    return b[at]


def _u16(b: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", b, at)[0])


def _u32(b: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", b, at)[0])


def parse_bzimage(data: bytes) -> KernelImage:
    """boot.rst: setup is (setup_sects or 4) + 1 sectors; the rest is the protected-mode kernel.

    The 64-bit entry is 0x200 past where that part is loaded (XLF_KERNEL_64).
    """
    version = _u16(data, HDR_VERSION)
    if version < MIN_PROTOCOL:
        raise NotAKernel(f"boot protocol {version >> 8}.{version & 0xFF:02d} < 2.06 (too old)")
    if version >= 0x20C and not _u16(data, HDR_XLOADFLAGS) & XLF_KERNEL_64:
        raise NotAKernel("the bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear)")
    setup_sects = _u8(data, HDR_SETUP_SECTS) or 4
    setup_end = (setup_sects + 1) * 512
    if setup_end >= len(data):
        raise NotAKernel("the bzImage is truncated (no protected-mode part after setup)")
    header_end = HDR_JUMP + 2 + _u8(data, HDR_JUMP + 1)  # the header's own length (jump target)
    init_size = _u32(data, HDR_INIT_SIZE) if version >= 0x20A else 0
    return KernelImage(
        kind="bzimage",
        entry=BZIMAGE_LOAD_ADDRESS + 0x200,
        segments=(Segment(BZIMAGE_LOAD_ADDRESS, data[setup_end:], len(data) - setup_end),),
        setup_header=data[BP_HDR:header_end],
        cmdline_size=_u32(data, HDR_CMDLINE_SIZE),
        initrd_addr_max=_u32(data, HDR_INITRD_ADDR_MAX),
        init_size=init_size,
    )


_EHDR: Final = struct.Struct("<4sBBBBB7xHHIQQQIHHHHHH")
_PHDR: Final = struct.Struct("<IIQQQQQQ")
PT_LOAD: Final = 1
PT_NOTE: Final = 4
XEN_ELFNOTE_PHYS32_ENTRY: Final = 18


def parse_vmlinux(data: bytes) -> KernelImage:
    """PT_LOADs at p_paddr; the 64-bit entry is e_entry (startup_64's physical address)."""
    if len(data) < _EHDR.size:
        raise NotAKernel("truncated ELF header")
    fields = _EHDR.unpack_from(data)
    if fields[1] != 2 or fields[2] != 1 or fields[7] != 62:  # ELFCLASS64, LSB, EM_X86_64
        raise NotAKernel("not a 64-bit little-endian x86-64 ELF")
    entry, phoff, phentsize, phnum = fields[9], fields[10], fields[14], fields[15]
    segments: list[Segment] = []
    pvh: int | None = None
    for i in range(phnum):
        p_type, _f, offset, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            data, phoff + i * phentsize
        )
        if p_type == PT_LOAD and memsz:
            segments.append(Segment(paddr, data[offset : offset + filesz], memsz))
        elif p_type == PT_NOTE:
            pvh = _pvh_note(data[offset : offset + filesz]) or pvh
    if not segments:
        raise NotAKernel("the ELF has no PT_LOAD segment")
    if entry >= FOUR_GIB:  # a virtual address: not the kernel's physical entry
        raise NotAKernel(f"ELF entry {entry:#x} is not a physical address (not a vmlinux?)")
    return KernelImage("vmlinux", entry, tuple(segments), pvh_entry=pvh)


def _pvh_note(notes: bytes) -> int | None:
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, at)
        name_at = at + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        if kind == XEN_ELFNOTE_PHYS32_ENTRY and notes[name_at : name_at + 3] == b"Xen":
            size = 8 if descsz >= 8 else 4
            return int.from_bytes(notes[desc_at : desc_at + size], "little")
        at = desc_at + (descsz + 3) // 4 * 4
    return None


# -- memory map


@dataclass(frozen=True, slots=True, order=True)
class E820Entry:
    address: int
    size: int
    kind: int  # E820_RAM or E820_RESERVED

    @property
    def end(self) -> int:
        return self.address + self.size


def e820_map(ram_size: int, *, hole_start: int = PCI_HOLE_START) -> list[E820Entry]:
    """kvmtool's map: base RAM, EBDA and BIOS reserved, RAM from 1 MiB, RAM above 4 GiB.

    RAM beyond `hole_start` is remapped above 4 GiB, so the guest's RAM
    total equals `ram_size` less the 384 KiB legacy hole below 1 MiB.

    The 32-bit PCI hole itself is left out, as QEMU and kvmtool leave it: no
    entry. Linux takes the largest gap below 4 GiB as where PCI BARs go
    (e820__setup_pci_gap), and claims a BAR firmware assigned only if it
    overlaps no e820 entry (pci_claim_resource against the "Reserved"
    resources); reserving the hole would make it refuse and move the
    framebuffer firmware.py placed there, and, with 3 GiB of RAM or more,
    leave no 32-bit gap for BARs at all. The IOAPIC and LAPIC pages are
    claimed by the kernel itself.
    """
    if ram_size <= HIGH_MEMORY:
        raise ValueError("guest RAM must be larger than 1 MiB")
    low, *high = ram_regions(ram_size, hole_start)  # the VM's memslots (ramlayout.py)
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
        E820Entry(BIOS_START, HIGH_MEMORY - BIOS_START, E820_RESERVED),
        E820Entry(HIGH_MEMORY, low.end - HIGH_MEMORY, E820_RAM),
    ]
    entries += [E820Entry(r.guest_address, r.size, E820_RAM) for r in high]
    return entries


def pack_e820(entries: list[E820Entry]) -> bytes:
    if len(entries) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(entries)} e820 entries (max {E820_MAX_ENTRIES})")
    return b"".join(struct.pack("<QQI", e.address, e.size, e.kind) for e in entries)


# -- placement


def low_ram_top(ram_size: int, hole_start: int = PCI_HOLE_START) -> int:
    return min(ram_size, hole_start)


def place_initrd(
    size: int, ram_size: int, kernel_end: int, initrd_addr_max: int = 0x7FFF_FFFF
) -> int:
    """Highest page-aligned address with [addr, addr+size) in low RAM, <= initrd_addr_max,
    and above the kernel (boot.rst: the initrd must lie wholly below initrd_addr_max)."""
    top = min(low_ram_top(ram_size), initrd_addr_max + 1)
    address = (top - size) & ~0xFFF
    if address < kernel_end:
        need = (kernel_end + size + 0xFFFFF) >> 20
        raise ValueError(
            f"guest RAM too small for the kernel and a {size >> 20} MiB initrd: "
            f"use -m {max(need + 16, 128)}M or more"
        )
    return address


def check_cmdline(cmdline: str, cmdline_size: int) -> bytes:
    """NUL-terminated bytes; boot.rst: cmdline_size excludes the terminating NUL."""
    raw = cmdline.encode()
    if len(raw) > cmdline_size:
        raise ValueError(
            f"kernel command line is {len(raw)} bytes; this kernel takes {cmdline_size}"
        )
    return raw + b"\0"


# -- screen_info


@dataclass(frozen=True, slots=True)
class Framebuffer:
    base: int
    width: int
    height: int
    stride: int  # bytes per line
    size: int  # bytes


def screen_info(fb: Framebuffer | None) -> bytes:
    """The 64-byte screen_info (bootparam.h / screen_info.h): empty, or a 32 bpp VESA LFB."""
    out = bytearray(0x40)
    if fb is None:
        return bytes(out)
    out[0x0F] = VIDEO_TYPE_VLFB  # orig_video_isVGA
    struct.pack_into("<HHH", out, 0x12, fb.width, fb.height, 32)
    struct.pack_into("<I", out, 0x18, fb.base & 0xFFFF_FFFF)
    struct.pack_into("<I", out, 0x1C, (fb.size + 0xFFFF) >> 16)  # vesafb: 64 KiB units
    struct.pack_into("<H", out, 0x24, fb.stride)
    out[0x26:0x2E] = bytes((8, 16, 8, 8, 8, 0, 8, 24))  # red, green, blue, rsvd: size, pos
    if fb.base >> 32:
        struct.pack_into("<I", out, 0x36, 2)  # VIDEO_CAPABILITY_64BIT_BASE
        struct.pack_into("<I", out, 0x3A, fb.base >> 32)
    return bytes(out)


# -- the zero page


@dataclass(frozen=True, slots=True)
class BootParams:
    ram_size: int
    cmdline_size: int
    initrd_address: int = 0
    initrd_size: int = 0
    setup_header: bytes = b""
    framebuffer: Framebuffer | None = None
    e820: list[E820Entry] = field(default_factory=list)


def build_zero_page(p: BootParams) -> bytes:
    """struct boot_params (4 KiB) for the 64-bit entry (boot.rst, zero-page.rst)."""
    zp = bytearray(4096)
    zp[BP_SCREEN_INFO : BP_SCREEN_INFO + 0x40] = screen_info(p.framebuffer)
    if p.setup_header:
        zp[BP_HDR : BP_HDR + len(p.setup_header)] = p.setup_header
    else:  # a vmlinux has none: synthesise what the kernel checks (Firecracker does too)
        struct.pack_into("<H", zp, HDR_BOOT_FLAG, 0xAA55)
        zp[HDR_HEADER : HDR_HEADER + 4] = b"HdrS"
        struct.pack_into("<H", zp, HDR_VERSION, 0x20F)
        struct.pack_into("<I", zp, HDR_KERNEL_ALIGNMENT, 0x100_0000)
    zp[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    zp[HDR_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP | KEEP_SEGMENTS
    struct.pack_into("<H", zp, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, CMDLINE_ADDRESS)
    struct.pack_into("<I", zp, HDR_CMDLINE_SIZE, p.cmdline_size)
    struct.pack_into("<II", zp, HDR_RAMDISK_IMAGE, p.initrd_address, p.initrd_size)
    e820 = p.e820 or e820_map(p.ram_size)
    zp[BP_E820_ENTRIES] = len(e820)
    table = pack_e820(e820)
    zp[BP_E820_TABLE : BP_E820_TABLE + len(table)] = table
    return bytes(zp)


# -- MP table (MultiProcessor Specification 1.4)

MP_PROCESSOR: Final = 0
MP_BUS: Final = 1
MP_IOAPIC: Final = 2
MP_INTSRC: Final = 3
MP_LINTSRC: Final = 4
MP_IRQ_INT: Final = 0
MP_IRQ_NMI: Final = 1
MP_IRQ_EXTINT: Final = 3
CPU_ENABLED: Final = 1
CPU_BSP: Final = 2
ISA_BUS: Final = 1
PCI_BUS: Final = 0


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


MP_IRQ_PCI_DEFAULT: Final = 0x0F  # polarity active low (3), trigger level (3 << 2)


def build_mptable(
    ncpus: int, base: int = MPTABLE_ADDRESS, pci_interrupts: Sequence[IntxSource] = ()
) -> bytes:
    """Floating pointer + configuration table; Linux's mpparse finds it in 0xF0000-0xFFFFF.

    With acpi=off it is the only source of CPU APIC ids (SMP), the IOAPIC and
    the PCI interrupt routing: one MP_INTSRC per function's pin (source bus
    IRQ `slot << 2 | pin - 1` on the PCI bus, level-triggered, active low, to
    the IOAPIC input intx.py wires it to), which Linux's
    mp_irqs/pin_2_irq turn into each device's irq.
    """
    if not 1 <= ncpus <= 254:
        raise ValueError("1..254 vCPUs")
    ioapic_id = ncpus + 1  # after the CPUs' APIC ids, as kvmtool and Firecracker
    entries = bytearray()
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BSP if cpu == 0 else 0)
        # apicver 0x14, signature family 6, features FPU|APIC.
        entries += struct.pack("<BBBBII8x", MP_PROCESSOR, cpu, 0x14, flags, 0x600, 0x201)
    entries += struct.pack("<BB6s", MP_BUS, PCI_BUS, b"PCI   ")
    entries += struct.pack("<BB6s", MP_BUS, ISA_BUS, b"ISA   ")
    entries += struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, 0x11, 1, IOAPIC_ADDRESS)
    for irq in range(16):  # KVM's default routing: ISA IRQ i -> IOAPIC pin i
        entries += struct.pack("<BBHBBBB", MP_INTSRC, MP_IRQ_INT, 0, ISA_BUS, irq, ioapic_id, irq)
    for source in pci_interrupts:
        entries += struct.pack(
            "<BBHBBBB",
            MP_INTSRC,
            MP_IRQ_INT,
            MP_IRQ_PCI_DEFAULT,
            PCI_BUS,
            source.mp_source_irq,
            ioapic_id,
            source.gsi,
        )
    # LINT0 = ExtINT (the 8259 behind the LAPIC), LINT1 = NMI, on every CPU (0xFF).
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_IRQ_EXTINT, 0, ISA_BUS, 0, 0xFF, 0)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_IRQ_NMI, 0, ISA_BUS, 0, 0xFF, 1)
    count = ncpus + 2 + 1 + 16 + len(pci_interrupts) + 2
    header = struct.Struct("<4sHBB8s12sIHHII")
    length = header.size + len(entries)
    table = bytearray(
        header.pack(
            b"PCMP", length, 4, 0, b"DEVMODEL", b"KVM-PY      ", 0, 0, count, LAPIC_ADDRESS, 0
        )
    )
    table += entries
    table[7] = _checksum(bytes(table))
    floating = bytearray(struct.pack("<4sIBBB5x", b"_MP_", base + 16, 1, 4, 0))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating + table)


# -- CPUID


def tweak_cpuid_leaf(function: int, index: int, regs: list[int], vcpu: int) -> list[int]:
    """kvmtool's x86/cpuid.c: APIC id in leaf 1 EBX[31:24], the hypervisor bit, no EPB,
    no architectural perfmon (KVM's PMU may not be there). regs = [eax, ebx, ecx, edx]."""
    eax, ebx, ecx, edx = regs
    if function == 1:
        ebx = (ebx & 0x00FF_FFFF) | (vcpu << 24)
        ecx |= 1 << 31
    elif function == 6:
        ecx &= ~(1 << 3)
    elif function == 0xA:
        eax = ebx = ecx = edx = 0
    return [eax, ebx, ecx, edx]


# MSRs a BIOS leaves set (kvmtool x86/kvm-cpu.c, Firecracker arch/x86_64/msr.rs): syscall
# MSRs and the TSC zeroed, fast strings on, MTRRs enabled with write-back as the
# default type (else the kernel treats all RAM as uncached).
BOOT_MSRS: Final = {
    0x174: 0,  # IA32_SYSENTER_CS
    0x175: 0,  # IA32_SYSENTER_ESP
    0x176: 0,  # IA32_SYSENTER_EIP
    0xC000_0081: 0,  # STAR
    0xC000_0082: 0,  # LSTAR
    0xC000_0083: 0,  # CSTAR
    0xC000_0084: 0,  # SYSCALL_MASK
    0xC000_0102: 0,  # KERNEL_GS_BASE
    0x10: 0,  # IA32_TSC
    0x1A0: 1,  # IA32_MISC_ENABLE: FAST_STRING
    0x2FF: (1 << 11) | 6,  # IA32_MTRR_DEF_TYPE: enabled, WB
}


DEFAULT_CMDLINE: Final = (
    "console=ttyS0 earlyprintk=serial,ttyS0 acpi=off pci=conf1 reboot=t panic=-1 "
    "i8042.noaux=1 i8042.nopnp=1 i8042.dumbkbd=1 tsc=reliable"
)
