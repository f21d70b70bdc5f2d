"""Compile protos/devmodel/v1/*.proto into the importable package `devmodel`.

Run as `python -m protos.generate` (the set-up scripts do) or through the
setuptools build hook in setup.py.
"""

from __future__ import annotations

import sys
from pathlib import Path


def generate(root: Path) -> list[Path]:
    from grpc_tools import protoc  # build-time dependency only

    proto_dir = root / "protos"
    sources = sorted(proto_dir.glob("devmodel/v1/*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {proto_dir}/devmodel/v1")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={root}",
        f"--grpc_python_out={root}",
        f"--pyi_out={root}",
        *map(str, sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + ", ".join(map(str, sources)))
    package = root / "devmodel"
    for folder in (package, package / "v1"):
        (folder / "__init__.py").touch()
    (package / "py.typed").touch()
    return sources


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent
    for source in generate(here):
        print(f"generated code for {source.relative_to(here)}", file=sys.stderr)
