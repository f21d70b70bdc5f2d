"""virtio-blk reads with guest memory reached by DMA messages, against SHARED.

    python -m bench.messages [--runs 3] [--requests 200] [--batch 8] [--out FILE]

A device server process (bench/devserver_process.py) serves one virtio-blk
disk (a 1 MiB raw image). This process is the frontend and the guest at once:
a fake driver (tests/unit/virtio/driver.py) lays the rings out in guest RAM
and reaches the device only through BarWrite/BarRead on the Attach stream.
Guest RAM is, by memory mode:

- SHARED: a memfd the server maps (/proc/PID/fd/N), the baseline;
- DMA_MESSAGES: a bytearray only this process can reach; the server sends a
  DmaRequest for every guest-memory access and this process answers it from
  the bytearray, on the session's loop thread.

Workloads, each in both modes in the same run:

- qd1: one 4 KiB read (header, data, status: a three-descriptor chain) made
  available, a kick, then a BarRead, which the server answers only after the
  kick's bounded step is done (requests are served in order); repeated;
- batch: `--batch` such reads made available before one kick.

Reported per request: wall time (kick to the BarRead's answer, the BarRead's
own round trip included) and DmaRequests the frontend answered.
"""

from __future__ import annotations

import argparse
import datetime
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from devmodel.v1 import devmodel_pb2 as pb
from devserver.devices.blk import HEADER, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.virtio.pci_transport import VIRTIO_BAR, VirtioPciFunction
from devserver.virtio.ring import U16
from tests.unit.virtio.driver import RAM_SIZE, EchoDevice, FakeVirtioDriver
from vmm_client.client import (
    FrontendOptions,
    MemoryRegion,
    SyncSession,
)

from .devserver_process import start_server

SLOT = 3
IMAGE_SIZE = 1 << 20
READ_SIZE = 4096
MODES = {"shared": pb.MEMORY_MODE_SHARED, "messages": pb.MEMORY_MODE_DMA_MESSAGES}


class Ram:
    """Guest RAM at 0: a memfd the server maps, or a bytearray only we reach."""

    def __init__(self, mode: int) -> None:
        self.fd = -1
        self.buffer: bytearray | mmap.mmap
        if mode == pb.MEMORY_MODE_SHARED:
            self.fd = os.memfd_create("bench-messages-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, RAM_SIZE)
            self.buffer = mmap.mmap(self.fd, RAM_SIZE)
        else:
            self.buffer = bytearray(RAM_SIZE)

    def regions(self) -> tuple[MemoryRegion, ...]:
        if self.fd < 0:
            return ()
        return (MemoryRegion(0, RAM_SIZE, path=f"/proc/{os.getpid()}/fd/{self.fd}"),)

    def close(self) -> None:
        if isinstance(self.buffer, mmap.mmap):
            self.buffer.close()
        if self.fd >= 0:
            os.close(self.fd)


class Frontend(SyncSession):
    """Answers the server's DmaRequests from `ram`, counting them."""

    def __init__(self, target: str, mode: int, ram: Ram) -> None:
        self.ram = ram
        self.served = 0
        options = FrontendOptions(
            "bench-messages", msi=False, memory_mode=mode, regions=ram.regions()
        )
        super().__init__(target, options, on_dma=self._serve_dma)

    def _serve_dma(self, request: pb.DmaRequest) -> None:
        self.served += 1
        gpa, length, buffer = request.address, request.length, self.ram.buffer
        if gpa + length > len(buffer):
            self._session.dma_reply(request.request_id, error=f"{gpa:#x}: no RAM there")
        elif request.write:
            buffer[gpa : gpa + length] = request.data
            self._session.dma_reply(request.request_id)
        else:
            self._session.dma_reply(request.request_id, data=bytes(buffer[gpa : gpa + length]))


class Driver(FakeVirtioDriver):
    """The fake driver over the stream, its rings in the frontend's RAM."""

    def __init__(self, frontend: Frontend) -> None:
        local = VirtioPciFunction(EchoDevice(), presentation=Presentation(msix=False))
        super().__init__(local, BytearrayMemory(0x10))
        self.frontend = frontend

    def read(self, offset: int, size: int) -> int:
        return self.frontend.bar_read(SLOT, VIRTIO_BAR, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.frontend.bar_write(SLOT, VIRTIO_BAR, offset, size, value)

    def cfg_read(self, offset: int, size: int) -> int:
        return self.frontend.config_read(0, SLOT, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.frontend.config_write(0, SLOT, 0, offset, size, value)

    def take(self) -> list[object]:  # type: ignore[override]
        return []

    def put(self, gpa: int, data: bytes) -> None:
        self.frontend.ram.buffer[gpa : gpa + len(data)] = data

    def get(self, gpa: int, length: int) -> bytes:
        return bytes(self.frontend.ram.buffer[gpa : gpa + length])


@dataclass
class Slot:
    header: int
    data: int
    status: int


def run_mode(address: str, mode: int, requests: int, batch: int) -> dict[str, tuple[float, float]]:
    """{workload: (µs per request, DmaRequests per request)} for one mode."""
    ram = Ram(mode)
    try:
        with Frontend(address, mode, ram) as frontend:
            drv = Driver(frontend)
            drv.start(1, msix=False)
            slots = []
            for _ in range(batch):
                header, data, status = drv.alloc(16), drv.alloc(READ_SIZE), drv.alloc(1)
                slots.append(Slot(header, data, status))
            sectors = IMAGE_SIZE // 512 - READ_SIZE // 512

            def post(slot: Slot, n: int) -> None:
                drv.put(slot.header, HEADER.pack(VIRTIO_BLK_T_IN, 0, (n * 8) % sectors))
                drv.put(slot.status, b"\xee")
                head = drv.add_chain(
                    0,
                    [
                        (slot.header, 16, False),
                        (slot.data, READ_SIZE, True),
                        (slot.status, 1, True),
                    ],
                )
                layout = drv.queues[0]
                drv.put(layout.avail + 4 + 2 * (layout.avail_idx % layout.size), U16.pack(head))
                layout.avail_idx = (layout.avail_idx + 1) & 0xFFFF

            def round_(count: int) -> None:
                for i in range(count):
                    post(slots[i], i)
                drv.set_avail_idx(0, drv.queues[0].avail_idx)
                drv.kick(0)
                drv.read(0x14, 1)  # answered once the kick's step is done
                used = drv.used(0)
                if len(used) != count:
                    raise SystemExit(f"bench: {len(used)} of {count} requests came back")
                for i in range(count):
                    if drv.get(slots[i].status, 1)[0] != VIRTIO_BLK_S_OK:
                        raise SystemExit("bench: a read failed")

            out: dict[str, tuple[float, float]] = {}
            for name, per_round in (("qd1", 1), ("batch", batch)):
                rounds = max(1, requests // per_round)
                round_(per_round)  # warm up
                served = frontend.served
                start = time.perf_counter()
                for _ in range(rounds):
                    round_(per_round)
                elapsed = time.perf_counter() - start
                n = rounds * per_round
                out[name] = (elapsed / n * 1e6, (frontend.served - served) / n)
            return out
    finally:
        ram.close()


def fmt(values: list[float], digits: int = 0) -> tuple[str, str, str]:
    med = statistics.median(values)
    return (f"{med:,.{digits}f}", f"{min(values):,.{digits}f}", f"{max(values):,.{digits}f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-messages-") as tmp:
        image = Path(tmp) / "disk.img"
        image.write_bytes(os.urandom(IMAGE_SIZE))
        proc, address = start_server(Path(tmp), [f"virtio-blk,slot={SLOT},path={image}"])
        try:
            for run in range(args.runs):
                for mode_name, mode in MODES.items():
                    got = run_mode(address, mode, args.requests, args.batch)
                    for workload, figures in got.items():
                        results.setdefault((workload, mode_name), []).append(figures)
                    print(f"run {run + 1}: {mode_name}: {got}", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(10)
    load_after = os.getloadavg()[0]

    titles = {"qd1": "4 KiB read, one per kick", "batch": f"4 KiB reads, {args.batch} per kick"}
    lines = [
        "| workload | memory mode | µs per request | min | max | DmaRequests per request |",
        "|---|---|---|---|---|---|",
    ]
    for (workload, mode_name), per_run in results.items():
        us = [f[0] for f in per_run]
        dma = statistics.median(f[1] for f in per_run)
        med, lo, hi = fmt(us)
        lines.append(f"| {titles[workload]} | {mode_name} | {med} | {lo} | {hi} | {dma:.1f} |")
    for workload in titles:
        shared = statistics.median(f[0] for f in results[(workload, "shared")])
        messages = statistics.median(f[0] for f in results[(workload, "messages")])
        lines.append("")
        lines.append(f"- {titles[workload]}: messages / shared = {messages / shared:.2f}x")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"Measured {when} on {platform.node()} ({os.cpu_count()} cores, Python "
        f"{platform.python_version()}); load average {load_before:.1f} before, "
        f"{load_after:.1f} after; medians of {args.runs} runs, {args.requests} requests "
        "per workload and run."
    )
    text = header + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
