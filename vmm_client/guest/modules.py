"""Kernel modules for the guest: dependency closure and load order.

Every virtio driver in Debian 12's kernel is a module (frontend-kvm.md §0.2),
so the initramfs carries them and /init loads them with insmod, dependencies
first. Dependencies come from modules.dep when the tree has one; Debian's
linux-image package does not ship it (depmod writes it at install time), so
otherwise they are read from each module's .modinfo `depends=` field, which
is what depmod would have written. `softdep=pre:` entries are honoured when
they name a module in the tree, or a crypto algorithm one of its
kernel/crypto modules provides (crc-t10dif needs "crct10dif" registered).

Names are compared with '-' and '_' equal, as the kernel does.
"""

from __future__ import annotations

import gzip
import lzma
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmm_client.guest.elf import ElfError, modinfo

__all__ = [
    "KernelModule",
    "ModuleError",
    "load_order",
    "module_name",
    "parse_modules_dep",
    "read_module",
    "resolve_modules",
]

SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class ModuleError(RuntimeError):
    pass


def normalize(name: str) -> str:
    return name.replace("-", "_")


def module_name(path: str) -> str:
    """`kernel/fs/9p/9p.ko.xz` -> `9p`; `kernel/block/t10-pi.ko` -> `t10_pi`."""
    base = os.path.basename(path)
    for suffix in SUFFIXES[::-1]:
        if base.endswith(suffix):
            return normalize(base[: -len(suffix)])
    raise ModuleError(f"not a module file name: {path}")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep: `path: dep-path dep-path ...` per line -> {path: [dep paths]}."""
    deps: dict[str, list[str]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if ":" not in line:
            raise ModuleError(f"modules.dep line {lineno}: no colon: {raw!r}")
        path, rest = line.split(":", 1)
        deps[path.strip()] = rest.split()
    return deps


def load_order(
    deps: Mapping[str, Sequence[str]],
    wanted: Iterable[str],
    *,
    builtin: Iterable[str] = (),
) -> list[str]:
    """Module paths to insmod, in an order where every module follows its dependencies.

    deps maps a module path to the paths it needs (modules.dep's shape);
    wanted are module names. Built-in names are skipped. Depth-first
    post-order over the wanted names in the order given, so the result is
    deterministic; a cycle or an unknown name is an error.
    """
    by_name: dict[str, str] = {}
    for path in deps:
        by_name.setdefault(module_name(path), path)
    skip = {normalize(b) for b in builtin}
    order: list[str] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(path: str) -> None:
        if path in done:
            return
        if path in active:
            cycle = [*active[active.index(path) :], path]
            raise ModuleError("module dependency cycle: " + " -> ".join(cycle))
        active.append(path)
        for dep in deps.get(path, ()):
            if module_name(dep) in skip:
                continue
            if dep not in deps:
                raise ModuleError(f"{path} needs {dep}, which is not in modules.dep")
            visit(dep)
        active.pop()
        done.add(path)
        order.append(path)

    missing: list[str] = []
    for name in wanted:
        n = normalize(name)
        if n in skip:
            continue
        found = by_name.get(n)
        if found is None:
            missing.append(name)
            continue
        visit(found)
    if missing:
        raise ModuleError(f"modules not found in the kernel: {', '.join(missing)}")
    return order


@dataclass
class KernelModule:
    path: str  # relative to /lib/modules/<version>, e.g. kernel/fs/9p/9p.ko
    name: str
    # Names loaded before this one: the hard dependencies, plus resolved soft ones.
    depends: list[str] = field(default_factory=list)
    softdeps_pre: list[str] = field(default_factory=list)  # names or aliases
    aliases: list[str] = field(default_factory=list)


def read_module(data: bytes, path: str) -> KernelModule:
    """Parses a (decompressed) .ko's modinfo into a KernelModule."""
    try:
        info = modinfo(data)
    except ElfError as e:
        raise ModuleError(f"{path}: {e}") from e
    mod = KernelModule(path=path, name=module_name(path))
    for key, value in info:
        if key == "depends":
            mod.depends += [normalize(d) for d in value.split(",") if d]
        elif key == "alias":
            mod.aliases.append(value)
        elif key == "softdep":
            # "pre: a b post: c"; only pre matters for load order.
            mode = ""
            for word in value.split():
                if word.endswith(":"):
                    mode = word[:-1]
                elif mode == "pre":
                    mod.softdeps_pre.append(word)
    return mod


def decompress_module(data: bytes, path: str) -> bytes:
    """A module's ELF bytes; insmod in busybox wants them uncompressed."""
    if path.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.endswith(".ko.zst"):
        raise ModuleError(f"{path}: zstd-compressed modules are not supported (no zstd in stdlib)")
    return data


def _index(moddir: Path) -> dict[str, str]:
    """name -> path relative to moddir, for every module file under moddir/kernel."""
    index: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(moddir / "kernel"):
        for f in files:
            if f.endswith(SUFFIXES):
                rel = os.path.relpath(os.path.join(dirpath, f), moddir)
                index.setdefault(module_name(rel), rel)
    return index


def _builtin(moddir: Path) -> set[str]:
    try:
        text = (moddir / "modules.builtin").read_text(encoding="utf-8")
    except OSError:
        return set()
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def _crypto_alias_index(moddir: Path, index: Mapping[str, str]) -> dict[str, str]:
    """alias -> module name, for the generic crypto modules (kernel/crypto).

    Soft dependencies name algorithms ("crct10dif"), not modules. The
    accelerated variants under arch/ are left out on purpose: TCG's default
    CPU lacks most of the instructions they need, so they would fail to load.
    """
    aliases: dict[str, str] = {}
    for name, rel in sorted(index.items()):
        if not rel.startswith("kernel/crypto/"):
            continue
        data = decompress_module((moddir / rel).read_bytes(), rel)
        for alias in read_module(data, rel).aliases:
            a = alias.removeprefix("crypto-")
            # Prefer the *_generic implementation when several provide one name.
            if a not in aliases or name.endswith("_generic"):
                aliases[a] = name
    return aliases


def resolve_modules(moddir: Path, wanted: Sequence[str]) -> list[KernelModule]:
    """The wanted modules and everything they need, in load order.

    moddir is an unpacked /lib/modules/<version>. Uses modules.dep when
    present, otherwise the modules' own .modinfo.
    """
    builtin = _builtin(moddir)
    dep_file = moddir / "modules.dep"
    if dep_file.is_file():
        deps = parse_modules_dep(dep_file.read_text(encoding="utf-8"))
        order = load_order(deps, wanted, builtin=builtin)
        out: list[KernelModule] = []
        for rel in order:
            needs = [module_name(d) for d in deps[rel]]
            mod = KernelModule(rel, module_name(rel), [n for n in needs if n not in builtin])
            out.append(mod)
        return out
    index = _index(moddir)
    graph: dict[str, list[str]] = {}
    mods: dict[str, KernelModule] = {}
    crypto: dict[str, str] | None = None
    todo = [normalize(w) for w in wanted if normalize(w) not in builtin]
    missing = [w for w in todo if w not in index]
    if missing:
        raise ModuleError(f"modules not found in {moddir}: {', '.join(missing)}")
    while todo:
        name = todo.pop()
        if name in mods:
            continue
        rel = index[name]
        mod = read_module(decompress_module((moddir / rel).read_bytes(), rel), rel)
        mods[name] = mod
        needs = [d for d in mod.depends if d not in builtin]
        for soft in mod.softdeps_pre:
            target = normalize(soft)
            if target not in index:
                if crypto is None:
                    crypto = _crypto_alias_index(moddir, index)
                target = crypto.get(soft, "")
            if target and target not in builtin and target not in needs:
                needs.append(target)
        for n in needs:
            if n not in index:
                raise ModuleError(f"{rel} needs {n}, which is not in {moddir}")
        graph[rel] = [index[n] for n in needs]
        mod.depends = needs
        todo += needs
    order = load_order(graph, [normalize(w) for w in wanted], builtin=builtin)
    return [mods[module_name(rel)] for rel in order]
