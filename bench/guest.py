"""Guest-side figures: boot time, and MMIO from a Linux guest through the whole path.

    python -m bench.guest [--runs 3] [--reads 2000] [--writes 20000]

In one invocation, on the same QEMU (TCG), kernel and initramfs:

- boot: time from starting QEMU to the guest's script, with no extra
  devices, and with two PCI test devices served by a device server (in
  another process) through the vfio-user bridge;
- mmio: a static C program in the guest maps a BAR through sysfs and times
  32-bit reads and posted writes: of our served test device (guest → QEMU →
  vfio-user → bridge → gRPC → device server) and of QEMU's built-in `edu`
  device (the baseline: the same guest, the same QEMU, no process boundary).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import uvloop

from bench.devserver_process import start_server
from vmm_client.qemu.launch import GuestResult, run_in_guest
from vmm_client.vfio_user.bridge import open_bridge

ROOT = Path(__file__).resolve().parent.parent

MMIO_SCRIPT = """
find() {{ for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor):$(cat $d/device)" = "$1" ] && echo $d && return; done; }}
ours=$(find 0x1234:0x7e57); edu=$(find 0x1234:0x11e8)
echo 1 > $ours/enable; echo 1 > $edu/enable
echo "== ours"; /bin/guest_mmio $ours/resource2 0 {reads} {writes}
echo "== edu"; /bin/guest_mmio $edu/resource0 0 {reads} {writes}
"""


def compile_probe(directory: Path) -> bytes:
    binary = directory / "guest_mmio"
    subprocess.run(
        ["gcc", "-O2", "-static", "-o", str(binary), str(ROOT / "bench" / "guest_mmio.c")],
        check=True,
    )
    return binary.read_bytes()


async def served(
    address: str, script: str, extra: list[str], files: dict[str, bytes] | None = None
) -> GuestResult:
    with tempfile.TemporaryDirectory() as vfu:
        async with open_bridge(address, Path(vfu)) as bridge:
            return await asyncio.to_thread(
                run_in_guest, script, [*bridge.qemu_args(), *extra], extra_files=files
            )


def parse(output: str) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    current = ""
    for line in output.splitlines():
        if line.startswith("== "):
            current = line[3:]
            figures[current] = {}
        elif line.endswith("_ns " + line.rsplit(" ", 1)[-1]) and current:
            key, value = line.split()
            figures[current][key] = float(value)
    return figures


def row(name: str, values: list[float], unit: str) -> str:
    return (
        f"| {name} | {statistics.median(values):.1f} {unit} | {min(values):.1f} | "
        f"{max(values):.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--writes", type=int, default=20000)
    args = parser.parse_args()
    plain_boot: list[float] = []
    served_boot: list[float] = []
    ours_read: list[float] = []
    ours_write: list[float] = []
    edu_read: list[float] = []
    edu_write: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        probe = compile_probe(Path(tmp))
        proc, address = start_server(Path(tmp), ("pci-testdev", "pci-testdev,slot=4,name=second"))
        try:
            for _ in range(args.runs):
                plain_boot.append(run_in_guest("true").boot_seconds)
                result = uvloop.run(served(address, "true", []))
                served_boot.append(result.boot_seconds)
                script = MMIO_SCRIPT.format(reads=args.reads, writes=args.writes)
                result = uvloop.run(
                    served(address, script, ["-device", "edu"], {"/bin/guest_mmio": probe})
                )
                figures = parse(result.output)
                ours_read.append(figures["ours"]["read_ns"] / 1000)
                ours_write.append(figures["ours"]["write_ns"] / 1000)
                edu_read.append(figures["edu"]["read_ns"] / 1000)
                edu_write.append(figures["edu"]["write_ns"] / 1000)
        finally:
            proc.terminate()
            proc.wait()
    print(f"python -m bench.guest --runs {args.runs} --reads {args.reads} --writes {args.writes}\n")
    print("| measurement | median | min | max |")
    print("|---|---|---|---|")
    print(row("boot to script, no extra devices", plain_boot, "s"))
    print(row("boot to script, 2 served test devices", served_boot, "s"))
    print(row("BAR read, served device", ours_read, "µs"))
    print(row("BAR read, QEMU built-in edu", edu_read, "µs"))
    print(row("posted BAR write, served device", ours_write, "µs"))
    print(row("BAR write, QEMU built-in edu", edu_write, "µs"))
    ratio = statistics.median(ours_read) / statistics.median(edu_read)
    print(f"\nserved BAR read / built-in: {ratio:.0f}x")


if __name__ == "__main__":
    main()
