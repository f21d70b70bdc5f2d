"""Cost of one forwarded access over the Attach stream, against a raw-socket floor.

    python -m bench.stream [--runs 5] [--reads 2000] [--writes 20000]

Each figure is the median of --runs runs (with min and max), measured in the
same invocation on the same machine:

- floor: a 4-byte ping-pong between two Python processes over a UNIX
  socketpair, the least any out-of-process device model can cost;
- config read: one ConfigRead round trip to a device server in another
  process (AsyncSession, one request in flight);
- config read, sync: the same through SyncSession, as a vCPU thread calls it;
- pipelined reads: 32 reads in flight, so the stream batches them;
- posted writes: BarWrites queued back to back, closed by one read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.devserver_process import start_server
from vmm_client.client import AsyncSession, FrontendOptions, SyncSession, open_channel

SLOT, IO_BAR, SCRATCH = 1, 0, 0x04


# The echo side of the floor: a separate interpreter, like a device server.
_ECHO = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
while data := sock.recv(64):
    sock.sendall(data)
"""


def floor_us(rounds: int) -> float:
    """Microseconds per round trip of a UNIX socketpair ping-pong between processes."""
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    try:
        for _ in range(100):  # warm up
            ours.sendall(b"ping")
            ours.recv(64)
        start = time.perf_counter()
        for _ in range(rounds):
            ours.sendall(b"ping")
            ours.recv(64)
        return (time.perf_counter() - start) / rounds * 1e6
    finally:
        ours.close()
        child.wait()


async def stream_figures(address: str, reads: int, writes: int) -> dict[str, float]:
    async with open_channel(address) as channel:
        s = await AsyncSession.attach(channel, FrontendOptions("bench"))
        for _ in range(100):
            await s.config_read(0, SLOT, 0, 0, 4)
        start = time.perf_counter()
        for _ in range(reads):
            await s.config_read(0, SLOT, 0, 0, 4)
        read_us = (time.perf_counter() - start) / reads * 1e6

        start = time.perf_counter()
        for _ in range(reads // 32):
            await asyncio.gather(*(s.config_read(0, SLOT, 0, 0, 4) for _ in range(32)))
        pipelined = (reads // 32 * 32) / (time.perf_counter() - start)

        start = time.perf_counter()
        for value in range(writes):
            s.bar_write(SLOT, IO_BAR, SCRATCH, 4, value)
        last = await s.bar_read(SLOT, IO_BAR, SCRATCH, 4)
        posted = writes / (time.perf_counter() - start)
        assert last == writes - 1, "posted writes lost or reordered"
        await s.close()
    return {
        "config read (µs)": read_us,
        "pipelined reads (/s)": pipelined,
        "posted writes (/s)": posted,
    }


def sync_read_us(address: str, reads: int) -> float:
    with SyncSession(address, FrontendOptions("bench-sync")) as s:
        for _ in range(100):
            s.config_read(0, SLOT, 0, 0, 4)
        start = time.perf_counter()
        for _ in range(reads):
            s.config_read(0, SLOT, 0, 0, 4)
        return (time.perf_counter() - start) / reads * 1e6


def summary(name: str, values: list[float], fmt: Callable[[float], str]) -> str:
    return (
        f"| {name} | {fmt(statistics.median(values))} | {fmt(min(values))} | {fmt(max(values))} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--writes", type=int, default=20000)
    args = parser.parse_args()

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        proc, address = start_server(Path(tmp))
        try:
            for _ in range(args.runs):
                results.setdefault("floor: socketpair ping-pong (µs)", []).append(
                    floor_us(args.reads)
                )
                for key, value in asyncio.run(
                    stream_figures(address, args.reads, args.writes)
                ).items():
                    results.setdefault(key, []).append(value)
                results.setdefault("config read, sync facade (µs)", []).append(
                    sync_read_us(address, args.reads)
                )
        finally:
            proc.terminate()
            proc.wait()

    def number(v: float) -> str:
        return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"

    print(f"python -m bench.stream --runs {args.runs} --reads {args.reads} --writes {args.writes}")
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| measurement | median | min | max |")
    print("|---|---|---|---|")
    for name, values in results.items():
        print(summary(name, values, number))
    floor = statistics.median(results["floor: socketpair ping-pong (µs)"])
    read = statistics.median(results["config read (µs)"])
    print(f"\nconfig read / floor: {read / floor:.1f}x")


if __name__ == "__main__":
    main()
