"""QEMU's `-device` arguments for the bridge's sockets: one vfio-user-pci per device."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from .device import SAFE_NAME, Device


def qemu_device_args(
    devices: Iterable[Device], *, msg_timeout_ms: int | None = None, root_ports: bool = True
) -> list[str]:
    """`-device` arguments for `devices`, each behind its own pcie-root-port when
    `root_ports` (see VfioUserBridge.qemu_args)."""
    args: list[str] = []
    for number, device in enumerate(devices, start=1):
        port = f"devmodel-rp{number}"
        if root_ports:
            args += [
                "-device",
                f"pcie-root-port,id={port},bus=pcie.0,chassis={number},slot={number}",
            ]
        spec: dict[str, object] = {
            "driver": "vfio-user-pci",
            "id": f"vfu-{device.name}" if SAFE_NAME.fullmatch(device.name) else None,
            "socket": {"type": "unix", "path": os.fspath(device.socket_path)},
        }
        if root_ports:
            spec["bus"] = port
        if spec["id"] is None:
            del spec["id"]
        if msg_timeout_ms is not None:
            spec["x-msg-timeout"] = msg_timeout_ms
        args += ["-device", json.dumps(spec, separators=(",", ":"))]
    return args
