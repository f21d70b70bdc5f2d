"""The exceptions the core raises, and who should see them.

    DevserverError
    ├── ConfigError      a device spec or CLI flag is wrong (the user's to fix)
    ├── AccessError      a frontend sent an access that no PCI bus can carry
    │                    (offset past 4095, size 3, unknown device or BAR)
    ├── MemoryMapError   a frontend's guest-memory table is unusable (regions
    │                    overlap, size 0, wrap past 2^64, file too small)
    ├── GuestMemoryError a guest-physical access is not inside guest RAM (the
    │                    guest's doing: devices turn it into an error status)
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


class MemoryMapError(DevserverError):
    """A frontend's memory table (Hello.memory, MemoryMapUpdate) is invalid.

    `unreachable` marks a region whose file the server cannot open: the
    frontend may be on another host, which is a precondition, not a typo.
    """

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class GuestMemoryError(DevserverError):
    """A guest-physical range that is not wholly inside guest RAM (reliability.md C3)."""


class BackendError(DevserverError):
    """A host-side resource (image file, socket, tap) failed."""
