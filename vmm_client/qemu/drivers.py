"""The guest kernel modules the served devices need, beyond the default image's.

The default guest image loads the virtio drivers; a device type whose Linux
driver is not among them (the vesa-fb's bochs) adds its modules here, so
`python -m vmm_client qemu --device vesa-fb` gets /dev/fb0 without a flag.
Each extra module set is a different cached initramfs, so only the types
actually served add theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc

from devmodel.v1 import devmodel_pb2 as pb

from ..client import ClientError, TlsClientFiles, get_topology, open_channel
from ..guest.image import DEFAULT_MODULES, DISPLAY_MODULES

TOPOLOGY_TIMEOUT_S = 30.0  # a loaded machine answers within seconds; a missing server at once
EXTRA_MODULES: dict[str, tuple[str, ...]] = {"vesa-fb": DISPLAY_MODULES}


def modules_for(device_types: Iterable[str]) -> tuple[str, ...]:
    """DEFAULT_MODULES plus what these device types need, each module once, in order."""
    modules = list(DEFAULT_MODULES)
    for device_type in device_types:
        modules += [m for m in EXTRA_MODULES.get(device_type, ()) if m not in modules]
    return tuple(modules)


async def served_devices(devserver: str, tls: TlsClientFiles | None = None) -> list[pb.DeviceInfo]:
    """Every device the server at `devserver` serves (GetTopology)."""
    async with open_channel(devserver, tls) as channel:
        try:
            topology = await asyncio.wait_for(get_topology(channel), TOPOLOGY_TIMEOUT_S)
        except TimeoutError:
            raise ClientError(
                f"the device server at {devserver} did not list its devices "
                f"within {TOPOLOGY_TIMEOUT_S:.0f} s"
            ) from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise ClientError(
                    f"cannot reach the device server at {devserver} ({e.details()}); "
                    "is `python -m devserver` running and listening there?",
                    e.code(),
                ) from None
            raise ClientError(
                f"the device server at {devserver} did not list its devices "
                f"({e.code().name}: {e.details()})",
                e.code(),
            ) from None
    return list(topology.devices)
