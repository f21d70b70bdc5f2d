"""`python -m vmm_client run --kernel K [--initrd I] [--append ...]`: boot Linux in the KVM VMM."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Final

from devmodel.v1 import devmodel_pb2 as pb

from ..client import FrontendOptions, MemoryRegion, SyncSession, TlsClientFiles
from . import linux
from .devices import PciHost
from .firmware import setup_framebuffer
from .linux_boot import Attached, boot_linux, plan
from .vm import Vm, kvm_flavour

PVM_REFUSAL: Final = (
    "vmm_client: stock Linux kernels cannot run under kvm_pvm (non-PVM guest code is emulated "
    "and rejects instructions the kernel needs); use a host with VMX/SVM KVM, "
    "or `python -m vmm_client qemu`, or --force to try anyway"
)
# Under kvm_pvm: drop what the emulator is known to refuse (frontend-kvm.md, addendum).
PVM_APPEND: Final = "noxsave clearcpuid=cx16,popcnt,smap,xsave,avx,avx2"


def _attach(devserver: str, tls: TlsClientFiles | None) -> Callable[[Vm, PciHost], Attached]:
    def attach(vm: Vm, pci: PciHost) -> Attached:
        shared = devserver.startswith("unix:")
        options = FrontendOptions(
            "vmm_client kvm linux",
            shared_memory_bars=True,
            memory_mode=pb.MEMORY_MODE_SHARED if shared else pb.MEMORY_MODE_NONE,
            regions=tuple(
                MemoryRegion(r.guest_address, r.size, vm.ram.path, r.offset) for r in vm.ram_regions
            )
            if shared
            else (),
        )
        session = SyncSession(devserver, options, on_event=pci.handle_event, tls=tls)
        pci.attach(session, session.topology)
        framebuffer = setup_framebuffer(session, session.topology)
        if framebuffer is not None:
            print(
                f"framebuffer: {framebuffer.width}x{framebuffer.height} 32 bpp at "
                f"{framebuffer.base:#x} (screen_info, VIDEO_TYPE_VLFB)",
                file=sys.stderr,
            )
        return Attached(session.close, framebuffer)

    return attach


def run_kernel(args: argparse.Namespace, memory: int, tls: TlsClientFiles | None) -> int:
    """Exit status: 0 when the guest rebooted/shut down, 1 on a failed boot, 2 on bad input,
    3 when refused under kvm_pvm."""
    try:
        kernel = args.kernel.read_bytes()
        initrd = args.initrd.read_bytes() if args.initrd is not None else None
    except OSError as e:
        print(f"vmm_client: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    cmdline = linux.DEFAULT_CMDLINE + (" rdinit=/init" if initrd else "")
    pvm = kvm_flavour() == "pvm"
    if pvm:
        cmdline += " " + PVM_APPEND
    if args.append:
        cmdline += " " + args.append
    try:
        image, _, _ = plan(kernel, initrd, cmdline, memory)
    except linux.NotAKernel as e:
        print(
            f"vmm_client: error: {args.kernel} is not a Linux kernel ({e}); give a bzImage "
            "(e.g. /boot/vmlinuz-*) or a vmlinux ELF",
            file=sys.stderr,
        )
        return 2
    except ValueError as e:
        print(f"vmm_client: error: {e}", file=sys.stderr)
        return 2
    if pvm:
        print(PVM_REFUSAL, file=sys.stderr, flush=True)
        if not args.force:
            return 3
    print(
        f"booting {image.kind} entry {image.entry:#x}, {memory >> 20} MiB, {args.smp} vCPU(s)",
        file=sys.stderr,
        flush=True,
    )
    attach = None if args.no_devserver else _attach(args.devserver, tls)
    run = boot_linux(
        kernel, initrd, cmdline, memory=memory, ncpus=args.smp, timeout=args.timeout, attach=attach
    )
    sys.stdout.flush()
    result = run.result
    exits = ", ".join(f"{n} {k}" for k, n in sorted(result.exits.items()))
    print(
        f"guest ended: {result.reason}"
        + (f": {result.message}" if result.message else "")
        + f" after {result.seconds:.2f} s ({exits})",
        file=sys.stderr,
    )
    # The normal ends: `poweroff -f` ("reboot: Power down"), or `reboot -f`, which
    # reboot=t turns into a triple fault.
    return 0 if result.reason in ("poweroff", "shutdown", "system-event") else 1
