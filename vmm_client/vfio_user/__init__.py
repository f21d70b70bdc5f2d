"""vfio-user bridge: stock QEMU (10.1+, `-device vfio-user-pci`) as a frontend.

`protocol` is the sans-I/O codec of the vfio-user protocol (QEMU
docs/interop/vfio-user.rst), one module per part of the spec, importing only
the standard library. The asyncio shell, one module per job:

    bridge             every device's socket on one session; open_bridge, run_bridge
    connection         one client connection: read, frame, handle in order, reply
    fd_passing         SCM_RIGHTS send/receive and ownership of received fds
    device             a topology device: layout, socket name
    handler            one device's requests, dispatched and answered
    region_forwarding  REGION_READ/WRITE as config and BAR accesses on the server
    irqs               SET_IRQS eventfds, INTx EOI, interrupt delivery
    msix_mirror        QEMU's MSI-X vector masks mirrored into the server's table
    dma                DMA_MAP/DMA_UNMAP windows and their fds
    memory_mirror      RAM windows announced to the server (shared memory mode)
    client_dma         DMA_READ/DMA_WRITE to the client (message mode, fd-less windows)
    shared_bars        shared-memory BARs QEMU maps itself
    link               the gRPC session with the bridge's failure policy
    qemu_args          QEMU's -device arguments

Run it with `python -m vmm_client.vfio_user`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bridge import VfioUserBridge, open_bridge, run_bridge

__all__ = ["VfioUserBridge", "open_bridge", "run_bridge"]


def __getattr__(name: str) -> object:
    # Lazy, so `vmm_client.vfio_user.protocol` can be used without grpc.
    if name in __all__:
        from . import bridge

        return getattr(bridge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
