"""CLI: `python -m vmm_client.guest build|run`.

build  builds (or finds in the cache) the guest image and prints its paths
run    boots the guest under the cached QEMU and runs a shell script in it
"""

from __future__ import annotations

import argparse
import sys

from vmm_client.guest.image import build_image
from vmm_client.qemu.hostutil import HostError, NeedsRootError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmm_client.guest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kernel", default=None, help="kernel ABI, e.g. 6.1.0-56-amd64")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the guest image when not cached")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    r = sub.add_parser("run", help="boot the guest and run a script")
    r.add_argument("script", nargs="?", default=None, help="shell script (default: lspci -nn)")
    r.add_argument("--timeout", type=float, default=120.0)
    r.add_argument("--dmesg", action="store_true", help="print the kernel log after the script")
    r.add_argument("--console", action="store_true", help="stream the serial console")
    parser.epilog = "run: extra QEMU arguments go after --, e.g. run 'lspci' -- -device ..."
    argv = list(sys.argv[1:] if argv is None else argv)
    qemu_args: list[str] = []
    if "--" in argv:
        qemu_args = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    args = parser.parse_args(argv)
    try:
        image = build_image(args.kernel, force=getattr(args, "force", False))
        if args.cmd == "build":
            print(f"kernel:   {image.kernel_version}")
            print(f"vmlinux:  {image.vmlinux}")
            print(f"initrd:   {image.initrd}")
            print(f"manifest: {image.manifest}")
            print(f"modules:  {' '.join(image.modules)}")
            return 0
        from vmm_client.qemu.launch import GuestError, boot
        from vmm_client.qemu.provision import provision

        on_output = (
            (lambda s: print(s, end="", file=sys.stderr, flush=True)) if args.console else None
        )
        try:
            result = boot(
                image,
                provision(),
                args.script,
                extra_qemu_args=qemu_args,
                timeout=args.timeout,
                dmesg=args.dmesg,
                on_output=on_output,
            )
        except GuestError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        sys.stdout.write(result.output)
        if result.dmesg is not None:
            print("--- dmesg ---")
            print(result.dmesg)
        for err in result.init_errors:
            print(f"init: {err}", file=sys.stderr)
        print(
            f"exit status {result.exit_status}; script started after {result.boot_seconds:.1f} s, "
            f"QEMU done after {result.total_seconds:.1f} s",
            file=sys.stderr,
        )
        return result.exit_status
    except NeedsRootError as e:
        print(str(e), file=sys.stderr)
        return 2
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
