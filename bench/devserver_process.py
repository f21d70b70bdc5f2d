"""A device server in its own process, as benchmarks need it (the real split)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_server(
    directory: Path, devices: Sequence[str] = ("pci-testdev",)
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m devserver` on a socket in `directory`; return it and its address."""
    sock = directory / "devserver.sock"
    argv = [sys.executable, "-m", "devserver", "--listen", f"unix:{sock}", "--log-level", "error"]
    for device in devices:
        argv += ["--device", device]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("bench: the device server did not start")
        time.sleep(0.05)
    return proc, f"unix:{sock}"
