"""The exceptions the core raises, and who should see them.

    DevserverError
    ├── ConfigError      a device spec or CLI flag is wrong (the user's to fix)
    ├── AccessError      a frontend sent an access that no PCI bus can carry
    │                    (offset past 4095, size 3, unknown device or BAR)
    └── BackendError     a host resource failed (file, socket, tap)

Guest misbehaviour is never an exception: the core ignores it, or latches a
device's NEEDS_RESET, as the PCI and virtio specs allow.
"""

from __future__ import annotations


class DevserverError(Exception):
    """Base class of everything the device server raises on purpose."""


class ConfigError(DevserverError):
    """A device definition or a command-line value is invalid."""


class AccessError(DevserverError):
    """A frontend request that is malformed for the PCI bus it addresses."""


class BackendError(DevserverError):
    """A host-side resource (image file, socket, tap) failed."""
