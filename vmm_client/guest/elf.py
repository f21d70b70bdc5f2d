"""The few ELF facts the guest builder needs: interpreter, DT_NEEDED, SONAME, and a section.

Reading them directly (instead of running the host's ldd) works for binaries
whose libraries are not installed on the host, which is the normal case here:
the libraries come from .deb files unpacked into a scratch directory. Only
64-bit little-endian ELF (x86-64) is supported.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["ElfError", "ElfInfo", "elf_section", "modinfo", "read_elf"]

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_SONAME = 14
DT_RPATH = 15
DT_RUNPATH = 29
EM_X86_64 = 62


class ElfError(ValueError):
    pass


@dataclass(frozen=True)
class ElfInfo:
    elf_type: int  # 2 = EXEC, 3 = DYN (PIE or shared object)
    machine: int
    entry: int
    interp: str | None
    needed: tuple[str, ...]
    soname: str | None
    # DT_RUNPATH (or the older DT_RPATH) directories, unexpanded ($ORIGIN stays).
    runpath: tuple[str, ...] = ()


def _check(data: bytes) -> None:
    if data[:4] != ELF_MAGIC:
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("only 64-bit little-endian ELF is supported")


def _cstr(data: bytes, off: int) -> str:
    end = data.find(b"\0", off)
    if end < 0:
        raise ElfError(f"unterminated string at {off:#x}")
    return data[off:end].decode("utf-8", "replace")


def read_elf(data: bytes) -> ElfInfo:
    _check(data)
    (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum) = struct.unpack_from(
        "<HHIQQQIHHH", data, 16
    )
    phdrs: list[tuple[int, int, int, int, int]] = []
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize
        )
        phdrs.append((p_type, p_offset, p_vaddr, p_filesz, p_memsz))
    interp: str | None = None
    dynamic: tuple[int, int] | None = None
    for p_type, p_offset, _, p_filesz, _ in phdrs:
        if p_type == PT_INTERP:
            interp = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)

    def vaddr_to_offset(vaddr: int) -> int:
        for p_type, p_offset, p_vaddr, p_filesz, _ in phdrs:
            if p_type == PT_LOAD and p_vaddr <= vaddr < p_vaddr + p_filesz:
                return vaddr - p_vaddr + p_offset
        raise ElfError(f"address {vaddr:#x} is in no loaded segment")

    needed_offsets: list[int] = []
    soname_offset: int | None = None
    runpath_offsets: list[int] = []
    strtab: int | None = None
    if dynamic is not None:
        off, size = dynamic
        for pos in range(off, off + size - 15, 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed_offsets.append(val)
            elif tag == DT_SONAME:
                soname_offset = val
            elif tag in (DT_RPATH, DT_RUNPATH):
                runpath_offsets.append(val)
            elif tag == DT_STRTAB:
                strtab = val
    needed: tuple[str, ...] = ()
    soname: str | None = None
    runpath: list[str] = []
    if strtab is not None:
        base = vaddr_to_offset(strtab)
        needed = tuple(_cstr(data, base + o) for o in needed_offsets)
        if soname_offset is not None:
            soname = _cstr(data, base + soname_offset)
        for o in runpath_offsets:
            runpath += [d for d in _cstr(data, base + o).split(":") if d]
    elif needed_offsets:
        raise ElfError("DT_NEEDED without DT_STRTAB")
    return ElfInfo(e_type, e_machine, e_entry, interp, needed, soname, tuple(runpath))


def elf_section(data: bytes, name: str) -> bytes | None:
    """The contents of the named section, or None (e.g. `.modinfo` of a kernel module)."""
    _check(data)
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if e_shoff == 0 or e_shnum == 0:
        return None

    def shdr(i: int) -> tuple[int, int, int, int]:
        sh_name, sh_type, _, _, sh_offset, sh_size = struct.unpack_from(
            "<IIQQQQ", data, e_shoff + i * e_shentsize
        )
        return sh_name, sh_type, sh_offset, sh_size

    _, _, str_off, _ = shdr(e_shstrndx)
    for i in range(e_shnum):
        sh_name, sh_type, sh_offset, sh_size = shdr(i)
        if _cstr(data, str_off + sh_name) == name:
            if sh_type == 8:  # SHT_NOBITS has no file contents
                return b""
            return data[sh_offset : sh_offset + sh_size]
    return None


def modinfo(ko: bytes) -> list[tuple[str, str]]:
    """The key=value pairs of a kernel module's .modinfo section, in order (keys repeat)."""
    section = elf_section(ko, ".modinfo")
    if section is None:
        raise ElfError("no .modinfo section: not a kernel module")
    pairs: list[tuple[str, str]] = []
    for item in section.split(b"\0"):
        if b"=" in item:
            k, v = item.decode("utf-8", "replace").split("=", 1)
            pairs.append((k, v))
    return pairs
