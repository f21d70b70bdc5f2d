"""devserver: PCI and virtio device models served over gRPC.

The core (`devserver.pci`, `devserver.devices`, `devserver.effects`) does no
I/O; `devserver.service` is the only package that speaks gRPC.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
