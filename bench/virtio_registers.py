"""Virtio register accesses over the Attach stream: served on the event loop
against the old path (every write to a virtio function through a worker
thread), both in one run.

    python -m bench.virtio_registers [--runs 5] [--accesses 2000]

Two device server processes with one virtio-blk each (a scratch image): one as
shipped, one with virtio_runner.THREAD_EVERY_WRITE set (the old path). Runs
alternate between them so load on the machine hits both alike. Figures, each
the median of --runs runs (min and max), microseconds per access:

- select + read: a posted BarWrite of queue_select and a BarRead of queue_size,
  the pair Linux's virtio_pci_modern does per queue (the read orders after the
  write, so the pair is one round trip plus the write's serving);
- config write: a ConfigWrite to the function's command register (answered),
  as Linux's pci_set_master does;
- posted writes: BarWrites of device_feature_select back to back, closed by one
  read, per write (throughput: what the server takes per write);
- bar read: a BarRead of device_feature_select (served on the loop on both
  paths: the control).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.devserver_process import ROOT
from devserver.pci.regs import PCI_COMMAND
from devserver.virtio.pci_transport import (
    DEVICE_FEATURE_SELECT,
    QUEUE_SELECT,
    QUEUE_SIZE,
    VIRTIO_BAR,
)
from vmm_client.client import AsyncSession, FrontendOptions, open_channel

SLOT = 3
PATHS = ("loop", "thread")  # served as shipped; every write through a thread (old)

# The device server, with the runner's switch set before it starts.
_LAUNCH = """
import sys
from devserver.service import virtio_runner
virtio_runner.THREAD_EVERY_WRITE = sys.argv[1] == "thread"
from devserver.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def start(directory: Path, path: str, image: Path) -> tuple[subprocess.Popen[bytes], str]:
    sock = directory / f"{path}.sock"
    argv = [sys.executable, "-c", _LAUNCH, path, "--listen", f"unix:{sock}"]
    argv += ["--log-level", "error", "--device", f"virtio-blk,slot={SLOT},path={image}"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"bench: the {path} device server did not start")
        time.sleep(0.05)
    return proc, f"unix:{sock}"


async def figures(address: str, n: int) -> dict[str, float]:
    async with open_channel(address) as channel:
        s = await AsyncSession.attach(channel, FrontendOptions("bench", msi=False))
        for _ in range(100):  # warm up
            s.bar_write(SLOT, VIRTIO_BAR, QUEUE_SELECT, 2, 0)
            await s.bar_read(SLOT, VIRTIO_BAR, QUEUE_SIZE, 2)
        out: dict[str, float] = {}

        start = time.perf_counter()
        for i in range(n):
            s.bar_write(SLOT, VIRTIO_BAR, QUEUE_SELECT, 2, i & 1)
            await s.bar_read(SLOT, VIRTIO_BAR, QUEUE_SIZE, 2)
        out["select + read"] = (time.perf_counter() - start) / n * 1e6

        command = await s.config_read(0, SLOT, 0, PCI_COMMAND, 2)
        start = time.perf_counter()
        for _ in range(n):
            await s.config_write(0, SLOT, 0, PCI_COMMAND, 2, command)
        out["config write"] = (time.perf_counter() - start) / n * 1e6

        writes = n * 10
        start = time.perf_counter()
        for i in range(writes):
            s.bar_write(SLOT, VIRTIO_BAR, DEVICE_FEATURE_SELECT, 4, i)
        last = await s.bar_read(SLOT, VIRTIO_BAR, DEVICE_FEATURE_SELECT, 4)
        out["posted writes"] = (time.perf_counter() - start) / writes * 1e6
        assert last == writes - 1, "posted writes lost or reordered"

        start = time.perf_counter()
        for _ in range(n):
            await s.bar_read(SLOT, VIRTIO_BAR, DEVICE_FEATURE_SELECT, 4)
        out["bar read"] = (time.perf_counter() - start) / n * 1e6
        await s.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accesses", type=int, default=2000)
    args = parser.parse_args()

    results: dict[str, dict[str, list[float]]] = {p: {} for p in PATHS}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        image = Path(tmp) / "scratch.img"
        image.write_bytes(bytes(1 << 20))
        servers = {p: start(Path(tmp), p, image) for p in PATHS}
        try:
            for _ in range(args.runs):
                for p in PATHS:
                    for key, value in asyncio.run(figures(servers[p][1], args.accesses)).items():
                        results[p].setdefault(key, []).append(value)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    print(f"python -m bench.virtio_registers --runs {args.runs} --accesses {args.accesses}")
    print(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"load average {load:.1f} before and {os.getloadavg()[0]:.1f} after\n"
    )
    print("| µs per access | on the loop (new) | every write in a thread (old) | old / new |")
    print("|---|---|---|---|")
    for key in results["loop"]:
        new, old = results["loop"][key], results["thread"][key]
        ratio = statistics.median(old) / statistics.median(new)
        print(f"| {key} | {cell(new)} | {cell(old)} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
