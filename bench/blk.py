"""virtio-blk under fio in a Linux guest: our served device against QEMU's own.

    python -m bench.blk [--runs 3] [--runtime 10] [--size-mib 256] [--out bench/results/blk.md]
        [--only none,shared,messages,builtin,host] [--jobs qd1,qd32,seqread,seqwrite]

In one invocation, on the same QEMU (TCG), guest kernel and initramfs (with
fio), against the same raw image file, one guest boot per column and run:

- served, cache=none (`none`): our virtio-blk in a device server process,
  reached through the vfio-user bridge; the server maps guest RAM (memory mode
  SHARED) and opens the image O_DIRECT, bypassing the host page cache as the
  built-in drive does: the headline ratio compares this column with the
  built-in, O_DIRECT with O_DIRECT;
- served, cache=writeback (`shared`): the same through the host page cache
  (buffered pread/pwrite, the server's default);
- served, DMA messages (`messages`): writeback, but every transfer of guest
  memory is a DmaRequest over the gRPC stream (memory mode DMA_MESSAGES). A
  server that cannot run virtqueues in this mode latches DEVICE_NEEDS_RESET,
  Linux gets no /dev/vda, and the column reads "n/a: refused";
- QEMU built-in (`builtin`): `-device virtio-blk-pci` on
  `-drive ...,cache=none,aio=io_uring` (shared/bench/README.md's baseline);
- host (`host`): the same fio jobs run on the host on the image file itself
  (the physical limit of the data path); "n/a: no host fio" without a host
  fio (the bench installs nothing).

The fio jobs are shared/bench/README.md's fio-qd1, fio-qd32 and fio-seq, plus
the same sequential job writing; all direct=1 on /dev/vda, time-based.
`--only` and `--jobs` pick columns and jobs for a quick run.
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
import shutil
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

    def command(self, runtime: int, filename: str = "/dev/vda") -> str:
        return (
            f"fio --name={self.name} --filename={filename} --ioengine=libaio --direct=1 "
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
    mode: str = ""  # a served column's memory mode (the bridge's --memory-mode)
    cache: str = ""  # a served column's virtio-blk cache=


COLUMNS: tuple[Column, ...] = (
    Column("none", "served, cache=none, shared memory", "shared", "none"),
    Column("shared", "served, cache=writeback, shared memory", "shared", "writeback"),
    Column("messages", "served, cache=writeback, DMA messages", "messages", "writeback"),
    Column("builtin", "QEMU built-in virtio-blk-pci"),
    Column("host", "host: fio on the image file"),
)
# Ratios against the built-in device, the headline (O_DIRECT both sides) first.
RATIO_COLUMNS = ("none", "shared", "messages")
NOT_RUN = "not run"

NA_MARK = "BENCH-NA"


@dataclass(frozen=True)
class Figure:
    iops: float
    mb_s: float
    lat_us: float  # mean total latency (submission to completion)


def guest_script(runtime: int, jobs: Sequence[Job] = JOBS) -> str:
    lines = [
        f'[ -b /dev/vda ] || {{ echo "{NA_MARK} no /dev/vda"; exit 0; }}',
        "echo disk_sectors=$(cat /sys/block/vda/size)",
    ]
    for job in jobs:
        lines += [
            f"echo BENCH-JOB-BEGIN {job.name}",
            f"{job.command(runtime)} || echo {NA_MARK} fio failed: {job.name}",
            f"echo BENCH-JOB-END {job.name}",
        ]
    return "\n".join(lines) + "\n"


def parse_output(output: str, jobs: Sequence[Job] = JOBS) -> dict[str, Figure] | str:
    """fio's figures per job, or the reason the column has none."""
    for line in output.splitlines():
        if line.startswith(NA_MARK):
            return line[len(NA_MARK) :].strip()
    figures: dict[str, Figure] = {}
    for job in jobs:
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


def host_fio(image: Path, runtime: int, jobs: Sequence[Job]) -> dict[str, Figure] | str:
    """The jobs run by the host's fio on the image file (the physical limit)."""
    if shutil.which("fio") is None:
        return "no host fio"
    parts: list[str] = []
    for job in jobs:
        command = shlex.split(job.command(runtime, str(image)))
        run = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=120 + 3 * runtime
        )
        if run.returncode != 0:
            first = (run.stderr.strip().splitlines() or ["?"])[0][:120]
            return f"host fio failed: {job.name}: {first}"
        parts += [f"BENCH-JOB-BEGIN {job.name}", run.stdout, f"BENCH-JOB-END {job.name}"]
    return parse_output("\n".join(parts) + "\n", jobs)


def run_column(
    column: Column, image: Path, directory: Path, runtime: int, jobs: Sequence[Job] = JOBS
) -> dict[str, Figure] | str:
    if column.key == "host":
        return host_fio(image, runtime, jobs)
    script = guest_script(runtime, jobs)
    timeout = 300.0 + 6 * runtime * len(jobs)
    try:
        if column.key == "builtin":
            result = run_in_guest(script, builtin_args(image), tools=TOOLS, timeout=timeout)
        else:
            spec = f"virtio-blk,path={image},cache={column.cache}"
            try:
                proc, address = start_server(directory, (spec,))
            except SystemExit as e:  # start_server's way of saying it did not start
                return str(e)
            try:
                result = uvloop.run(served(address, script, column.mode, timeout))
            finally:
                proc.terminate()
                proc.wait()
    except Refused as e:
        return f"refused ({e})"
    except GuestError as e:
        return f"guest failed: {str(e).splitlines()[0][:120]}"
    if result.exit_status != 0:
        return f"guest script exited with {result.exit_status}"
    return parse_output(result.output, jobs)


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "n/a"
    med = f"{statistics.median(values):,.{digits}f}"
    if len(values) == 1:
        return med
    return f"{med} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def render(
    figures: dict[str, list[dict[str, Figure] | str]], runs: int, jobs: Sequence[Job] = JOBS
) -> tuple[str, list[str]]:
    """The markdown table and the ratio lines (columns never run are left out)."""
    out = [
        "| workload | device | IOPS | MB/s | mean latency (µs) |",
        "|---|---|---|---|---|",
    ]
    shown = [c for c in COLUMNS if any(r != NOT_RUN for r in figures.get(c.key, []))]
    for job in jobs:
        for column in shown:
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
    base = [r for r in figures.get("builtin", []) if isinstance(r, dict)]
    titles = {c.key: c.title for c in COLUMNS}
    for key in RATIO_COLUMNS:
        ours = [r for r in figures.get(key, []) if isinstance(r, dict)]
        if not ours or not base:
            continue
        parts = []
        for job in jobs:
            a = statistics.median(f[job.name].iops for f in ours)
            b = statistics.median(f[job.name].iops for f in base)
            parts.append(f"{job.name} {a / b:.2f}x" if b else f"{job.name} n/a")
        ratios.append(f"{titles[key]} / built-in IOPS (medians of {runs}): " + ", ".join(parts))
    return "\n".join(out), ratios


def host_side_note(columns: set[str]) -> str:
    """What the host does with the image in the columns run (cache modes)."""
    notes = [
        "Host side: the built-in drive opens the image O_DIRECT (cache=none) and "
        "submits with io_uring; the device server's worker thread makes one "
        "synchronous preadv/pwritev at a time per device."
    ]
    if "none" in columns:
        notes.append(
            "`served, cache=none` opens it O_DIRECT too (page-aligned bounce buffer), so "
            "its ratio to the built-in compares O_DIRECT with O_DIRECT: like for like on "
            "the host's caching."
        )
    if columns & {"shared", "messages"}:
        notes.append(
            "The cache=writeback columns read and write through the host's page cache "
            "(buffered pread/pwrite, QEMU's cache=writeback): their large reads can beat "
            "the built-in's, and they are not the comparison to quote."
        )
    if "host" in columns:
        notes.append("`host` runs the same fio jobs on the image file itself, direct=1.")
    return " ".join(notes)


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"bench.blk: {what} {','.join(unknown)!r}: use some of {','.join(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument(
        "--only",
        "--columns",
        dest="only",
        default=",".join(c.key for c in COLUMNS),
        help="columns to run, comma-separated: " + ",".join(c.key for c in COLUMNS),
    )
    parser.add_argument(
        "--jobs",
        default=",".join(j.name for j in JOBS),
        help="fio jobs to run, comma-separated: " + ",".join(j.name for j in JOBS),
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "blk.md")
    args = parser.parse_args(argv)
    wanted = set(_names(args.only, [c.key for c in COLUMNS], "--only"))
    picked = set(_names(args.jobs, [j.name for j in JOBS], "--jobs"))
    jobs = [j for j in JOBS if j.name in picked]
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
                    figures[column.key].append(NOT_RUN)
                    continue
                result = run_column(column, image, directory, args.runtime, jobs)
                figures[column.key].append(result)
                status = "ok" if isinstance(result, dict) else result
                print(f"run {run + 1}/{args.runs} {column.key}: {status}", file=sys.stderr)
    load_after = os.getloadavg()
    table, ratios = render(figures, args.runs, jobs)
    qemu = subprocess.run(
        [*_qemu_prefix(), "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    note = (
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {' '.join(qemu)} TCG, guest: 1 vCPU, 512 MiB). "
        f"Load average {load_before[0]:.1f} before and {load_after[0]:.1f} after "
        "(above ~1 on 2 cores, other jobs shared the machine); compare figures within "
        "this run only. Medians of the runs, (min-max) when more than one; fio's mean "
        "total latency."
    )
    fio = "\n".join(f"    {job.command(args.runtime)}" for job in jobs)
    text = (
        "# virtio-blk under fio: served device against QEMU's built-in\n\n"
        f"Command: `{command}`\n\n{note}\n\n{table}\n\n"
        + "".join(f"- {r}\n" for r in ratios)
        + f"\nImage: {args.size_mib} MiB raw file of random data on the host's ext4; "
        "built-in drive: `"
        + " ".join(builtin_args(Path("IMG")))
        + "`. "
        + host_side_note(wanted)
        + f"\nThe fio jobs in the guest (one boot per column and run):\n\n{fio}\n"
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


def _qemu_prefix() -> list[str]:
    from vmm_client.qemu.provision import provision, qemu_command

    return qemu_command(provision())


if __name__ == "__main__":
    main()
