"""Builds tiny ELF64 files for tests: sections (a module's .modinfo), PT_INTERP, DT_NEEDED."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence


def make_elf(
    sections: Mapping[str, bytes] | None = None,
    *,
    interp: str | None = None,
    needed: Sequence[str] = (),
    soname: str | None = None,
) -> bytes:
    """An x86-64 ELF with one PT_LOAD that maps the file at vaddr == offset."""
    sections = dict(sections or {})
    body = bytearray()
    base = 64 + 56 * 3  # header, then room for three program headers

    def put(blob: bytes) -> int:
        while (base + len(body)) % 8:
            body.append(0)
        off = base + len(body)
        body.extend(blob)
        return off

    interp_off = put(interp.encode() + b"\0") if interp is not None else 0
    dynstr = bytearray(b"\0")
    name_offsets = []
    for n in [*needed, *([soname] if soname else [])]:
        name_offsets.append(len(dynstr))
        dynstr += n.encode() + b"\0"
    dynstr_off = put(bytes(dynstr))
    dyn = b""
    for o in name_offsets[: len(needed)]:
        dyn += struct.pack("<qQ", 1, o)  # DT_NEEDED
    if soname:
        dyn += struct.pack("<qQ", 14, name_offsets[-1])  # DT_SONAME
    dyn += struct.pack("<qQ", 5, dynstr_off)  # DT_STRTAB (a vaddr == offset)
    dyn += struct.pack("<qQ", 0, 0)
    dyn_off = put(dyn)
    shstr = bytearray(b"\0")
    shdrs = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    for name, data in sections.items():
        off = put(data)
        name_off = len(shstr)
        shstr += name.encode() + b"\0"
        shdrs.append(struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, off, len(data), 0, 0, 1, 0))
    shstr_name = len(shstr)
    shstr += b".shstrtab\0"
    shstr_off = put(bytes(shstr))
    shdrs.append(struct.pack("<IIQQQQIIQQ", shstr_name, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0))
    while (base + len(body)) % 8:
        body.append(0)
    shoff = base + len(body)
    total = shoff + 64 * len(shdrs)
    phdrs = [struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, total, total, 0x1000)]  # PT_LOAD
    if interp is not None:
        phdrs.append(
            struct.pack(
                "<IIQQQQQQ", 3, 4, interp_off, interp_off, 0, len(interp) + 1, len(interp) + 1, 1
            )
        )
    phdrs.append(struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, 0, len(dyn), len(dyn), 8))
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        3,
        62,
        1,
        0,
        64,
        shoff,
        0,
        64,
        56,
        len(phdrs),
        64,
        len(shdrs),
        len(shdrs) - 1,
    )
    phdr_blob = b"".join(phdrs).ljust(56 * 3, b"\0")
    return header + phdr_blob + bytes(body) + b"".join(shdrs)


def make_module(
    depends: Sequence[str] = (), *, softdep: str = "", aliases: Sequence[str] = ()
) -> bytes:
    info = [f"depends={','.join(depends)}"]
    if softdep:
        info.append(f"softdep={softdep}")
    info += [f"alias={a}" for a in aliases]
    info.append("vermagic=6.1.0-test SMP mod_unload modversions")
    return make_elf({".modinfo": "\0".join(info).encode() + b"\0"})
