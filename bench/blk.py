"""virtio-blk under fio in a Linux guest: our served device against QEMU's own.

    python -m bench.blk [--runs 3] [--runtime 10] [--size-mib 256] [--out bench/results/blk.md]

In one invocation, on the same QEMU (TCG), guest kernel and initramfs (with
fio), against the same raw image file, one guest boot per column and run:

- served, shared memory: our virtio-blk in a device server process, reached
  through the vfio-user bridge; the server maps guest RAM (memory mode SHARED);
- served, DMA messages: the same, but every transfer of guest memory is a
  DmaRequest over the gRPC stream (memory mode DMA_MESSAGES). A server that
  cannot run virtqueues in this mode latches DEVICE_NEEDS_RESET, Linux gets no
  /dev/vda, and the column reads "n/a: refused";
- QEMU built-in: `-device virtio-blk-pci` on `-drive ...,cache=none,aio=io_uring`
  (shared/bench/README.md's baseline).

The fio jobs are shared/bench/README.md's fio-qd1, fio-qd32 and fio-seq, plus
the same sequential job writing; all direct=1 on /dev/vda, time-based.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench.devserver_process import start_server
from vmm_client.guest.image import BENCH_TOOLS, DEFAULT_TOOLS
from vmm_client.qemu.launch import GuestError, GuestResult, run_in_guest
from vmm_client.vfio_user.bridge import open_bridge

ROOT = Path(__file__).resolve().parent.parent
TOOLS = DEFAULT_TOOLS + BENCH_TOOLS


@dataclass(frozen=True)
class Job:
    name: str
    title: str
    args: str  # fio options past the common ones

    def command(self, runtime: int) -> str:
        return (
            f"fio --name={self.name} --filename=/dev/vda --ioengine=libaio --direct=1 "
            f"--runtime={runtime} --time_based {self.args} --output-format=json"
        )


JOBS: tuple[Job, ...] = (
    Job("qd1", "4k random read, QD1", "--rw=randread --bs=4k --iodepth=1"),
    Job("qd32", "4k random read, QD32", "--rw=randread --bs=4k --iodepth=32"),
    Job("seqread", "1 MiB sequential read, QD8", "--rw=read --bs=1M --iodepth=8"),
    Job("seqwrite", "1 MiB sequential write, QD8", "--rw=write --bs=1M --iodepth=8"),
)


@dataclass(frozen=True)
class Column:
    key: str
    title: str


COLUMNS: tuple[Column, ...] = (
    Column("shared", "served, shared memory"),
    Column("messages", "served, DMA messages"),
    Column("builtin", "QEMU built-in virtio-blk-pci"),
)

NA_MARK = "BENCH-NA"


@dataclass(frozen=True)
class Figure:
    iops: float
    mb_s: float
    lat_us: float  # mean total latency (submission to completion)


def guest_script(runtime: int) -> str:
    lines = [
        f'[ -b /dev/vda ] || {{ echo "{NA_MARK} no /dev/vda"; exit 0; }}',
        "echo disk_sectors=$(cat /sys/block/vda/size)",
    ]
    for job in JOBS:
        lines += [
            f"echo BENCH-JOB-BEGIN {job.name}",
            f"{job.command(runtime)} || echo {NA_MARK} fio failed: {job.name}",
            f"echo BENCH-JOB-END {job.name}",
        ]
    return "\n".join(lines) + "\n"


def parse_output(output: str) -> dict[str, Figure] | str:
    """fio's figures per job, or the reason the column has none."""
    for line in output.splitlines():
        if line.startswith(NA_MARK):
            return line[len(NA_MARK) :].strip()
    figures: dict[str, Figure] = {}
    for job in JOBS:
        begin = output.find(f"BENCH-JOB-BEGIN {job.name}\n")
        end = output.find(f"BENCH-JOB-END {job.name}", begin)
        if begin < 0 or end < 0:
            return f"no fio output for {job.name}"
        text = output[begin:end].split("\n", 1)[1]
        # fio may print notes before its JSON document.
        data = json.loads(text[text.index("{") :])
        result = data["jobs"][0]
        side = result["write"] if job.name == "seqwrite" else result["read"]
        figures[job.name] = Figure(
            iops=float(side["iops"]),
            mb_s=float(side["bw_bytes"]) / 1e6,
            lat_us=float(side["lat_ns"]["mean"]) / 1000,
        )
    return figures


def make_image(path: Path, size_mib: int) -> None:
    """A raw image full of non-zero data, so reads are of allocated blocks."""
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size_mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def builtin_args(image: Path) -> list[str]:
    return [
        "-drive",
        f"file={image},if=none,id=bench0,format=raw,cache=none,aio=io_uring",
        "-device",
        "virtio-blk-pci,drive=bench0",
    ]


class Refused(Exception):
    """The served device latched DEVICE_NEEDS_RESET (e.g. no virtqueues in this memory mode)."""


class _NeedsResetWatch(logging.Handler):
    """Catches the bridge's "needs a reset" warning: Linux's virtio_blk then waits
    forever for its first request, so the guest would only end at the timeout."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reason = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "needs a reset" in message and not self.reason:
            self.reason = message


async def served(address: str, script: str, mode: str, timeout: float) -> GuestResult:
    watch = _NeedsResetWatch()
    bridge_log = logging.getLogger("vmm_client.vfio_user.bridge")
    bridge_log.addHandler(watch)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-vfu-") as vfu:
            pidfile = Path(vfu) / "qemu.pid"
            async with open_bridge(address, Path(vfu), memory_mode=mode) as bridge:
                args = [*bridge.qemu_args(), "-pidfile", str(pidfile)]
                guest = asyncio.ensure_future(
                    asyncio.to_thread(run_in_guest, script, args, tools=TOOLS, timeout=timeout)
                )
                while not guest.done():
                    await asyncio.wait({guest}, timeout=1.0)
                    if watch.reason and not guest.done() and pidfile.exists():
                        # Our own QEMU, by the pid it wrote: the guest cannot finish.
                        os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
                        with contextlib.suppress(GuestError):
                            await guest
                        raise Refused(watch.reason)
                return guest.result()
    finally:
        bridge_log.removeHandler(watch)


def run_column(
    column: Column, image: Path, directory: Path, runtime: int
) -> dict[str, Figure] | str:
    script = guest_script(runtime)
    timeout = 300.0 + 6 * runtime * len(JOBS)
    try:
        if column.key == "builtin":
            result = run_in_guest(script, builtin_args(image), tools=TOOLS, timeout=timeout)
        else:
            try:
                proc, address = start_server(directory, (f"virtio-blk,path={image}",))
            except SystemExit as e:  # start_server's way of saying it did not start
                return str(e)
            try:
                result = uvloop.run(served(address, script, column.key, timeout))
            finally:
                proc.terminate()
                proc.wait()
    except Refused as e:
        return f"refused ({e})"
    except GuestError as e:
        return f"guest failed: {str(e).splitlines()[0][:120]}"
    if result.exit_status != 0:
        return f"guest script exited with {result.exit_status}"
    return parse_output(result.output)


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "n/a"
    med = f"{statistics.median(values):,.{digits}f}"
    if len(values) == 1:
        return med
    return f"{med} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def render(figures: dict[str, list[dict[str, Figure] | str]], runs: int) -> tuple[str, list[str]]:
    """The markdown table and the ratio lines."""
    out = [
        "| workload | device | IOPS | MB/s | mean latency (µs) |",
        "|---|---|---|---|---|",
    ]
    for job in JOBS:
        for column in COLUMNS:
            got = [r[job.name] for r in figures[column.key] if isinstance(r, dict)]
            if not got:
                reasons = sorted({r for r in figures[column.key] if isinstance(r, str)})
                out.append(f"| {job.title} | {column.title} | n/a: {'; '.join(reasons)} | | |")
                continue
            out.append(
                f"| {job.title} | {column.title} | {cell([f.iops for f in got], 0)} | "
                f"{cell([f.mb_s for f in got], 1)} | {cell([f.lat_us for f in got], 0)} |"
            )
    ratios: list[str] = []
    base = [r for r in figures["builtin"] if isinstance(r, dict)]
    for column in COLUMNS[:2]:
        ours = [r for r in figures[column.key] if isinstance(r, dict)]
        if not ours or not base:
            continue
        parts = []
        for job in JOBS:
            a = statistics.median(f[job.name].iops for f in ours)
            b = statistics.median(f[job.name].iops for f in base)
            parts.append(f"{job.name} {a / b:.2f}x" if b else f"{job.name} n/a")
        ratios.append(f"{column.title} / built-in IOPS (medians of {runs}): " + ", ".join(parts))
    return "\n".join(out), ratios


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument(
        "--columns", default=",".join(c.key for c in COLUMNS), help="shared,messages,builtin"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "blk.md")
    args = parser.parse_args(argv)
    wanted = set(args.columns.split(","))
    command = "python -m bench.blk " + shlex.join(sys.argv[1:] if argv is None else argv)
    figures: dict[str, list[dict[str, Figure] | str]] = {c.key: [] for c in COLUMNS}
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="bench-blk-", dir=os.environ.get("TMPDIR")) as tmp:
        directory = Path(tmp)
        os.chmod(directory, 0o700)
        image = directory / "disk.img"
        make_image(image, args.size_mib)
        for run in range(args.runs):
            # Columns interleaved per run, so a burst of load elsewhere hits all of them.
            for column in COLUMNS:
                if column.key not in wanted:
                    figures[column.key].append("not run")
                    continue
                result = run_column(column, image, directory, args.runtime)
                figures[column.key].append(result)
                status = "ok" if isinstance(result, dict) else result
                print(f"run {run + 1}/{args.runs} {column.key}: {status}", file=sys.stderr)
    load_after = os.getloadavg()
    table, ratios = render(figures, args.runs)
    qemu = subprocess.run(
        [*_qemu_prefix(), "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    note = (
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {' '.join(qemu)} TCG, guest: 1 vCPU, 512 MiB). "
        f"Load average {load_before[0]:.1f} before and {load_after[0]:.1f} after: the machine "
        "was shared with other jobs (other helpers' builds, tests and QEMU guests), so "
        "compare figures within this run only. Medians of the runs, (min-max) when more "
        "than one; fio's mean total latency."
    )
    fio = "\n".join(f"    {job.command(args.runtime)}" for job in JOBS)
    text = (
        "# virtio-blk under fio: served device against QEMU's built-in\n\n"
        f"Command: `{command}`\n\n{note}\n\n{table}\n\n"
        + "".join(f"- {r}\n" for r in ratios)
        + f"\nImage: {args.size_mib} MiB raw file of random data on the host's ext4; "
        "built-in drive: `" + " ".join(builtin_args(Path("IMG"))) + "`. "
        "Not like for like on the host side: the device server reads and writes the "
        "image through the host's page cache (buffered pread/pwrite, like QEMU's "
        "cache=writeback), the built-in drive bypasses it (cache=none, O_DIRECT), so "
        "the served device's large reads can beat the built-in's.\n"
        f"The fio jobs in the guest (one boot per column and run):\n\n{fio}\n"
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


def _qemu_prefix() -> list[str]:
    from vmm_client.qemu.provision import provision, qemu_command

    return qemu_command(provision())


if __name__ == "__main__":
    main()
