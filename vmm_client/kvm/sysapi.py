"""libc calls ctypes needs for KVM: ioctl, mmap/munmap, pthread_kill.

ctypes releases the GIL around every foreign call, so a vCPU thread blocked
in KVM_RUN does not stall the gRPC client's event-loop thread (fcntl.ioctl
with a buffer argument would hold the GIL).
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

_libc = ctypes.CDLL(None, use_errno=True)

_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int

_mmap = _libc.mmap
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_mmap.restype = ctypes.c_void_p

_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munmap.restype = ctypes.c_int

_pthread_kill = _libc.pthread_kill
_pthread_kill.argtypes = (ctypes.c_ulong, ctypes.c_int)
_pthread_kill.restype = ctypes.c_int

PROT_READ: Final = 1
PROT_WRITE: Final = 2
MAP_SHARED: Final = 1
MAP_FAILED: Final = ctypes.c_void_p(-1).value

IoctlArg = int | ctypes.Structure | ctypes.Array[ctypes.c_char] | None


def ioctl(fd: int, request: int, arg: IoctlArg = 0, what: str = "") -> int:
    """ioctl(2); raises OSError (with the request's name when given) on failure."""
    if arg is None or isinstance(arg, int):
        pointer: int | ctypes.c_void_p | None = arg
    else:
        pointer = ctypes.addressof(arg)
    result = int(_ioctl(fd, request, pointer))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what or hex(request)}: {os.strerror(errno)}")
    return result


def ioctl_errno(fd: int, request: int, arg: int = 0) -> int:
    """ioctl(2) for the hot path: the result, or -errno (no exception to build)."""
    result = int(_ioctl(fd, request, arg))
    return result if result >= 0 else -ctypes.get_errno()


def mmap_shared(fd: int, length: int, offset: int = 0) -> int:
    """Map `fd` read-write and shared; returns the host address."""
    address = _mmap(None, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)
    if address is None or address == MAP_FAILED:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mmap of {length} bytes: {os.strerror(errno)}")
    return int(address)


def munmap(address: int, length: int) -> None:
    if _munmap(address, length) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"munmap: {os.strerror(errno)}")


def pthread_kill(thread_id: int, signal_number: int) -> None:
    """Signal one thread: interrupts its blocking KVM_RUN with EINTR."""
    _pthread_kill(thread_id, signal_number)
