"""CLI: `python -m vmm_client.qemu provision|check|command`.

provision  installs the QEMU tree when absent (needs root once) and prints its path
check      runs the tree's QEMU and checks its version and vfio-user-pci
command    prints the argv prefix that runs the tree's QEMU without chroot
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from vmm_client.qemu.hostutil import HostError, NeedsRootError
from vmm_client.qemu.provision import check_qemu, load_tree, provision, qemu_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmm_client.qemu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tree", type=Path, default=None, help="tree directory (default: cache)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("provision", help="install the QEMU tree when absent")
    p.add_argument("--force", action="store_true", help="rebuild even when a tree exists")
    sub.add_parser("check", help="run QEMU and check version and vfio-user-pci")
    sub.add_parser("command", help="print the command prefix that runs QEMU")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "provision":
            tree = provision(args.tree, force=args.force)
            version = check_qemu(tree)
            print(f"tree: {tree.path}")
            print(f"qemu: {version} ({tree.package_version})")
            print(f"command: {shlex.join(qemu_command(tree))}")
            return 0
        found = load_tree(args.tree)
        if found is None:
            print("no QEMU tree; run: python -m vmm_client.qemu provision", file=sys.stderr)
            return 1
        if args.cmd == "check":
            print(f"{found.path}: QEMU {check_qemu(found)} with vfio-user-pci")
        else:
            print(shlex.join(qemu_command(found)))
        return 0
    except NeedsRootError as e:
        print(str(e), file=sys.stderr)
        return 2
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
