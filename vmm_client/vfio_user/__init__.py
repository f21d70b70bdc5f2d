"""vfio-user bridge: stock QEMU (10.1+, `-device vfio-user-pci`) as a frontend.

`protocol` is the sans-I/O codec of the vfio-user protocol (QEMU
docs/interop/vfio-user.rst) and imports only the standard library. The
asyncio shell: `bridge` serves one UNIX socket per device (`Connection`) and
runs the whole bridge; `handler` answers one device's requests; `link` is the
one gRPC session all devices share; `irqs` the SET_IRQS eventfds; `dma` the
DMA_MAP windows and their mirror on the server. Run it with
`python -m vmm_client.vfio_user`.
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
