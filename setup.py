"""Build hook: generate the Python gRPC code from protos/ before packaging.

The generated package `devmodel` (devmodel/v1/*_pb2*.py and .pyi stubs) is
never committed. It is made here, before setup() looks for packages, so every
build (wheel, sdist, editable) finds and ships it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from protos.generate import generate  # noqa: E402

generate(ROOT)
setup()
