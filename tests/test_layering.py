"""The core does no I/O: it imports only the standard library's pure parts and itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = [
    *sorted((ROOT / "devserver" / "pci").glob("*.py")),
    *sorted((ROOT / "devserver" / "virtio").glob("*.py")),
    *sorted((ROOT / "devserver" / "devices").rglob("*.py")),
    ROOT / "devserver" / "effects.py",
    ROOT / "devserver" / "memory.py",
    ROOT / "devserver" / "ports.py",
    ROOT / "devserver" / "errors.py",
    ROOT / "devserver" / "config.py",
    ROOT / "vmm_client" / "addressing.py",
    ROOT / "vmm_client" / "routing.py",
    *sorted((ROOT / "vmm_client" / "vfio_user" / "protocol").glob("*.py")),
]
FORBIDDEN = {
    "asyncio",
    "devmodel",
    "grpc",
    "mmap",
    "os",
    "selectors",
    "socket",
    "subprocess",
    "threading",
    "uvloop",
    "vmm_client.client",
    "devserver.service",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_does_no_io(path: Path) -> None:
    bad = {
        name
        for name in imported_modules(path)
        for forbidden in FORBIDDEN
        if name == forbidden
        or name.startswith(forbidden + ".")
        # relative imports of the service layer from inside devserver
        or name.lstrip(".").startswith("service")
    }
    assert not bad, f"{path.name} imports {sorted(bad)}: the core must stay free of I/O"


def test_only_the_service_layer_imports_grpc() -> None:
    for path in sorted((ROOT / "devserver").rglob("*.py")):
        if "service" in path.parts:
            continue
        assert not {n for n in imported_modules(path) if n.startswith("grpc")}, path
