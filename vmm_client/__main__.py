"""`python -m vmm_client`: frontends of the device server.

python -m vmm_client probe [--devserver ADDR]   enumerate and program the bus like a guest
python -m vmm_client qemu ...                   boot Linux under QEMU through the vfio-user bridge
python -m vmm_client run --guest-program FILE [--smp N]   a freestanding program in our KVM VMM
python -m vmm_client run --kernel K [--initrd I] -m 512M   boot Linux in our KVM VMM (VMX/SVM)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from devserver.errors import ConfigError
from devserver.service.server import default_socket_path

from .client import ClientError, FrontendOptions, TlsClientFiles, open_channel


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--devserver",
        metavar="ADDR",
        default=f"unix:{default_socket_path()}",
        help="device server address: unix:PATH or HOST:PORT (default: %(default)s)",
    )
    parser.add_argument("--tls-ca", type=Path, help="CA (PEM) the server certificate chains to")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mTLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vmm_client", description="Frontends of the devmodel device server."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    probe = sub.add_parser(
        "probe",
        help="enumerate, size, assign and enable every device like a guest kernel, "
        "and print what it found",
    )
    _add_connection_flags(probe)
    probe.add_argument(
        "--move",
        action="store_true",
        help="also move each device's largest BAR while it decodes, and show the events",
    )
    qemu = sub.add_parser(
        "qemu",
        help="boot a Linux guest under QEMU (TCG) whose PCI devices are all served by the "
        "device server, through the vfio-user bridge",
    )
    _add_connection_flags(qemu)
    qemu.add_argument(
        "--device",
        metavar="TYPE[,key=value...]",
        action="append",
        default=[],
        help="start a private device server with these devices (repeatable; the same specs "
        "as python -m devserver --device) instead of using --devserver",
    )
    qemu.add_argument(
        "--script",
        help="shell script to run in the guest (default: show the served devices with lspci -vv)",
    )
    qemu.add_argument("--timeout", type=float, default=180.0, help="seconds (default: %(default)s)")
    qemu.add_argument("-m", "--memory", type=int, default=512, metavar="MiB", help="guest RAM")
    qemu.add_argument("--append", default="", help="extra kernel command line")
    qemu.add_argument(
        "--memory-mode",
        choices=("auto", "shared", "messages"),
        default="auto",
        help="how device DMA reaches guest RAM (see python -m vmm_client.vfio_user --help; "
        "default: %(default)s)",
    )
    run = sub.add_parser(
        "run",
        help="run a freestanding guest program (ELF, or flat binary at 1 MiB), or boot a Linux "
        "kernel (--kernel), in our own KVM VMM, its PCI devices served by the device server",
    )
    _add_connection_flags(run)
    run.add_argument(
        "--guest-program",
        type=Path,
        metavar="FILE",
        help="64-bit program entered in long mode (build vmm_client/kvm/guest/pcitest.c with "
        "--build-pcitest)",
    )
    run.add_argument(
        "--build-pcitest",
        action="store_true",
        help="build and run the bundled PCI test program (needs gcc)",
    )
    run.add_argument(
        "--kernel", type=Path, help="boot this Linux kernel (bzImage or vmlinux ELF, 64-bit entry)"
    )
    run.add_argument("--initrd", type=Path, help="initramfs for --kernel")
    run.add_argument("--append", default="", help="extra kernel command line for --kernel")
    run.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (default: 1)")
    run.add_argument(
        "--force",
        action="store_true",
        help="boot --kernel even under kvm_pvm, and report where it stopped",
    )
    run.add_argument(
        "-m", "--memory", default="64M", metavar="SIZE", help="guest RAM, e.g. 64M (default: 64M)"
    )
    run.add_argument("--timeout", type=float, default=120.0, help="seconds (default: %(default)s)")
    run.add_argument(
        "--no-devserver", action="store_true", help="run without PCI devices (no server needed)"
    )
    run.add_argument(
        "--ring3",
        action="store_true",
        help="enter the program at ring 3 with IOPL 3 (kvm_pvm runs ring 3 natively)",
    )
    return parser


def parse_size(text: str) -> int:
    """'64M', '1G', '65536' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in units else text
    if not digits.isdigit():
        raise SystemExit(f"vmm_client: error: memory size {text!r} is not like 64M or 1G")
    return int(digits) * scale


def _run(args: argparse.Namespace) -> int:
    import tempfile

    from .kvm.guest.build import build_pcitest
    from .kvm.runner import check_memory, run_program
    from .kvm.vm import PVM_NOTE, kvm_flavour

    if args.kernel is not None:
        from .kvm.linux_cli import run_kernel

        return run_kernel(args, parse_size(args.memory), _tls(args))
    if (args.guest_program is None) == (not args.build_pcitest):
        raise SystemExit("vmm_client: error: give --guest-program FILE or --build-pcitest")
    if kvm_flavour() == "pvm":
        print(f"note: {PVM_NOTE}", file=sys.stderr)
    memory = parse_size(args.memory)
    try:
        check_memory(memory)
    except ValueError as e:
        raise SystemExit(f"vmm_client: error: {e}") from None
    if args.build_pcitest:
        with tempfile.TemporaryDirectory(prefix="pcitest-") as directory:
            image = build_pcitest(Path(directory)).read_bytes()
    else:
        image = args.guest_program.read_bytes()
    try:
        run = run_program(
            image,
            None if args.no_devserver else args.devserver,
            memory=memory,
            timeout=args.timeout,
            tls=_tls(args),
            user=args.ring3,
            ncpus=args.smp,
        )
    except ValueError as e:  # a program that does not fit, a bad --smp: say so in one line
        raise SystemExit(f"vmm_client: error: {e}") from None
    sys.stdout.flush()
    result = run.result
    exits = ", ".join(f"{n} {k}" for k, n in sorted(result.exits.items()))
    print(
        f"guest ended: {result.reason}"
        + (f" status {result.status}" if result.status is not None else "")
        + (f": {result.message}" if result.message else "")
        + f" after {result.seconds:.2f} s ({exits}; {run.config_accesses} config and "
        f"{run.bar_accesses} BAR accesses forwarded, {run.msis} MSIs, "
        f"{sum(1 for _, up in run.irq_lines if up)} INTx assertions)",
        file=sys.stderr,
    )
    if result.reason == "exit-port" and result.status is not None:
        return min(result.status, 125)
    return 1


DEFAULT_GUEST_SCRIPT = """\
echo "== PCI devices the guest sees (ours sit behind QEMU's pcie-root-ports)"
lspci -nn
for dev in /sys/bus/pci/devices/*; do
    case "$(cat "$dev/vendor")" in 0x8086|0x1b36) continue ;; esac
    lspci -vv -nn -s "${dev##*/}" 2>/dev/null
done
for disk in /sys/block/vd*; do
    [ -e "$disk" ] || continue
    echo "== ${disk##*/}: $(cat $disk/size) sectors, serial $(cat $disk/serial 2>/dev/null)"
    dd if=/dev/urandom of=/tmp/pattern bs=4096 count=16 2>/dev/null
    dd if=/tmp/pattern of=/dev/${disk##*/} bs=4096 oflag=direct 2>/dev/null
    dd if=/dev/${disk##*/} of=/tmp/back bs=4096 count=16 iflag=direct 2>/dev/null
    cmp /tmp/pattern /tmp/back && echo "   wrote and read back 64 KiB: identical"
done
"""


def _tls(args: argparse.Namespace) -> TlsClientFiles | None:
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key:
            raise SystemExit("vmm_client: error: --tls-cert/--tls-key need --tls-ca")
        return None
    return TlsClientFiles(args.tls_ca, args.tls_cert, args.tls_key)


async def _probe(args: argparse.Namespace) -> int:
    from devserver.effects import BarDecodeChanged, Effect

    from .client import AsyncSession
    from .probe import assign_and_enable, format_lspci, probe_bus
    from .routing import RoutingTable

    table = RoutingTable()

    def on_event(effect: Effect) -> None:
        if isinstance(effect, BarDecodeChanged):
            table.apply(effect)
            old = effect.old or "-"
            new = effect.new or "-"
            print(f"  event: device {effect.device_id} BAR{effect.bar} {old} -> {new}")

    async with open_channel(args.devserver, _tls(args)) as channel:
        session = await AsyncSession.attach(channel, FrontendOptions("vmm_client probe"), on_event)
        print(f"attached to {session.welcome.server_name} as session {session.welcome.session_id}")
        functions = await probe_bus(session)
        print(f"found {len(functions)} device(s); assigning and enabling:")
        await assign_and_enable(session, functions)
        for function in functions:
            print(format_lspci(function))
        if args.move:
            from devserver.effects import BarKind
            from devserver.pci import regs

            for f in functions:
                mover = max((b for b in f.bars if b.kind is BarKind.MEM32), key=lambda b: b.size)
                target = mover.address + 0x100_0000
                print(f"moving {f.bus:02x}:{f.device:02x}.0 BAR{mover.index} to {target:#x}:")
                register = regs.PCI_BASE_ADDRESS_0 + 4 * mover.index
                await session.config_write(f.bus, f.device, 0, register, 4, target)
        print(f"routing table ({len(table)} ranges):")
        for (device_id, bar), where in sorted(table.ranges().items()):
            print(f"  device {device_id} BAR{bar}: {where}")
        await session.close()
    return 0


async def _qemu(args: argparse.Namespace) -> int:
    from .qemu.frontend import private_devserver

    if not args.device:
        return await _qemu_on(args)
    if args.devserver_given:
        raise SystemExit("vmm_client: error: give either --devserver or --device, not both")
    async with private_devserver(args.device) as address:
        args.devserver = address
        return await _qemu_on(args)


async def _qemu_on(args: argparse.Namespace) -> int:
    from .qemu.drivers import modules_for, served_devices
    from .qemu.frontend import boot_served_guest

    # A served vesa-fb needs the bochs driver in the guest image.
    modules = modules_for(d.type for d in await served_devices(args.devserver, _tls(args)))
    print(f"booting a Linux guest under QEMU with the devices of {args.devserver} ...", flush=True)
    result = await boot_served_guest(
        args.devserver,
        args.script if args.script is not None else DEFAULT_GUEST_SCRIPT,
        tls=_tls(args),
        timeout=args.timeout,
        extra_append=args.append,
        memory_mb=args.memory,
        memory_mode=args.memory_mode,
        modules=modules,
    )
    print(result.output, end="")
    print(
        f"guest exited with status {result.exit_status} "
        f"(script started {result.boot_seconds:.1f} s after QEMU, "
        f"QEMU ran {result.total_seconds:.1f} s)"
    )
    for error in result.init_errors:
        print(f"guest /init: {error}", file=sys.stderr)
    return result.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.devserver_given = any(a == "--devserver" or a.startswith("--devserver=") for a in argv)
    try:
        if args.command == "probe":
            return asyncio.run(_probe(args))
        if args.command == "qemu":
            import uvloop

            return uvloop.run(_qemu(args))
        if args.command == "run":
            return _run(args)
    except ClientError as e:
        print(f"vmm_client: error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, ConfigError, OSError) as e:  # QEMU, KVM, guest image or spec problems
        print(f"vmm_client: error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
