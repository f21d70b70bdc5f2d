"""Build hook: generate the Python gRPC code from protos/ before packaging.

The generated package `devmodel` (devmodel/v1/*_pb2*.py and .pyi stubs) is
never committed; every build, editable or not, makes it from the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from protos.generate import generate  # noqa: E402


class BuildWithProtos(build_py):
    def run(self) -> None:
        generate(ROOT)
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
