"""What an exit costs in the KVM frontend, from the guest's instruction to its completion.

    python -m bench.kvm [--runs 3] [--exits 20000] [--reads 1000]

Tiny 64-bit guests loop on one instruction; the figure is the run's wall
time divided by the iterations (the loop's own instructions are noise next
to an exit, even emulated). Medians of --runs runs, with min and max:

- PIO exit: `out` to a port a no-op Python handler takes (no device server),
  from ring 0 (emulated under kvm_pvm) and ring 3 (native there);
- MMIO exit: a store to an address nothing claims (no device server; below
  2 GiB because the absolute disp32 form sign-extends);
- config read: `in` from 0xCFC -> PciHost -> SyncSession -> gRPC -> a device
  server in another process -> back into the guest;
- IO BAR read: `in` from the test device's IO BAR, routed by the routing table;
- posted IO BAR write: `out` to it (BarWrite, no reply awaited);
- memslot move: KVM_SET_USER_MEMORY_REGION re-addressing a 1 MiB slot (the
  ioctl alone, from Python);
- shared BAR move, whole path: the guest writes a vesa-fb's VRAM BAR (config
  write through 0xCF8/0xCFC) back and forth; each write is a round trip to the
  server, whose BarDecodeChanged event moves the memslot before the reply.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from pathlib import Path

from bench.devserver_process import start_server
from vmm_client.client import FrontendOptions, SyncSession
from vmm_client.kvm.boot import LOAD_ADDRESS, enter_long_mode, load_program
from vmm_client.kvm.devices import DEBUG_EXIT_PORT, DebugExit, PciHost
from vmm_client.kvm.vm import GuestRam, Vm

CF8, CFC = 0xCF8, 0xCFC
IO_BAR_BASE = 0xC000
FB_SLOT = 2
FB_A, FB_B = 0x6000_0000, 0x7000_0000  # below 2 GiB, like the MMIO case's store
EXIT = b"\x31\xc0\xe7" + bytes((DEBUG_EXIT_PORT,))  # xor eax, eax; out 0xf4, eax


def _mov_dx(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port)


def _mov_eax(value: int) -> bytes:
    return b"\xb8" + struct.pack("<I", value)


def _loop(body: bytes, n: int) -> bytes:
    """mov ecx, n; body; dec ecx; jnz body."""
    jump = -(len(body) + 4)
    return b"\xb9" + struct.pack("<I", n) + body + b"\xff\xc9\x75" + struct.pack("<b", jump)


def _config_write(offset: int, value: int, slot: int = 1) -> bytes:
    return (
        _mov_dx(CF8)
        + _mov_eax(0x8000_0000 | slot << 11 | offset)  # 00:slot.0
        + b"\xef"
        + _mov_dx(CFC)
        + _mov_eax(value)
        + b"\xef"
    )


class _Sink:
    def pio_read(self, port: int, size: int) -> int:
        return 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        pass


def time_guest(code: bytes, n: int, address: str | None = None, user: bool = False) -> float:
    """Microseconds per loop iteration of `code` (which ends through the exit port)."""
    with Vm(4 << 20) as vm:
        vm.pio.add(range(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 4), DebugExit())
        vm.pio.add(range(0x80, 0x81), _Sink())
        pci = PciHost(vm)
        options = FrontendOptions("bench-kvm", shared_memory_bars=True)
        session = SyncSession(address, options, pci.handle_event) if address else None
        try:
            if session is not None:
                pci.attach(session)
            load_program(vm.ram, code)
            enter_long_mode(vm.create_vcpu(), LOAD_ADDRESS, user=user)
            start = time.perf_counter()
            result = vm.run(300)
            elapsed = time.perf_counter() - start
        finally:
            if session is not None:
                session.close()
            pci.shared_bars.close()
    if not result.ok:
        raise SystemExit(f"bench: the guest failed: {result}")
    return elapsed / n * 1e6


def time_memslot_move(n: int) -> float:
    """Microseconds per KVM_SET_USER_MEMORY_REGION that moves a 1 MiB slot."""
    extra = GuestRam(1 << 20, "bench-slot")
    try:
        with Vm(4 << 20) as vm:
            slot = vm.add_memslot(FB_A, extra.size, extra.address)
            start = time.perf_counter()
            for i in range(n):
                vm.move_memslot(slot, FB_B if i % 2 == 0 else FB_A)
            elapsed = time.perf_counter() - start
            vm.delete_memslot(slot)
    finally:
        extra.close()
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kvm", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--exits", type=int, default=20_000)
    parser.add_argument("--reads", type=int, default=1000)
    args = parser.parse_args()
    n, r = args.exits, args.reads
    setup_bar = _config_write(0x10, IO_BAR_BASE) + _config_write(0x04, 1)  # BAR0, IO decode
    # The vesa-fb in slot 2: VRAM BAR0 at FB_A, memory decoding on; then move it.
    setup_fb = _config_write(0x10, FB_A, FB_SLOT) + _config_write(0x04, 2, FB_SLOT)
    fb_moves = _config_write(0x10, FB_B, FB_SLOT) + _config_write(0x10, FB_A, FB_SLOT)
    unclaimed_store = b"\x89\x04\x25" + struct.pack("<I", 0x7000_0000)
    config_prologue = _mov_dx(CF8) + _mov_eax(0x8000_0800) + b"\xef" + _mov_dx(CFC)
    # name: (loop body, iterations, needs the server, prologue, ring 3)
    cases = {
        "PIO exit (Python no-op handler)": (b"\xe6\x80", n, False, b"", False),
        "PIO exit from ring 3": (b"\xe6\x80", n, False, b"", True),
        "MMIO exit (unclaimed store)": (unclaimed_store, n, False, b"", False),
        "MMIO exit from ring 3": (unclaimed_store, n, False, b"", True),
        "config read, whole path": (b"\xed", r, True, config_prologue, False),
        "IO BAR read (BarRead)": (b"\xed", r, True, setup_bar + _mov_dx(IO_BAR_BASE), False),
        "IO BAR write (posted BarWrite)": (
            b"\xef",
            n // 4,
            True,
            setup_bar + _mov_dx(IO_BAR_BASE + 4),
            False,
        ),
        "shared BAR move, whole path (per move)": (fb_moves, r // 2, True, setup_fb, False),
    }
    per_iteration = {"shared BAR move, whole path (per move)": 2}
    with tempfile.TemporaryDirectory(prefix="bench-kvm-") as directory:
        server, address = start_server(
            Path(directory), ("pci-testdev", f"vesa-fb,slot={FB_SLOT},vram=1")
        )
        try:
            print("| exit | median | min | max |\n|---|---|---|---|")
            for name, (body, count, remote, prologue, user) in cases.items():
                code = prologue + _loop(body, count) + EXIT
                values = [
                    time_guest(code, count, address if remote else None, user)
                    / per_iteration.get(name, 1)
                    for _ in range(args.runs)
                ]
                print(
                    f"| {name} | {statistics.median(values):.1f} us | {min(values):.1f} us "
                    f"| {max(values):.1f} us |",
                    flush=True,
                )
            moves = [time_memslot_move(n) for _ in range(args.runs)]
            print(
                f"| memslot move (KVM_SET_USER_MEMORY_REGION, same slot) | "
                f"{statistics.median(moves):.1f} us | {min(moves):.1f} us | {max(moves):.1f} us |",
                flush=True,
            )
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
