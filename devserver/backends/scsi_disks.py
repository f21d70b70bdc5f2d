"""The disk images of every virtio-scsi spec, opened as FileBlockBackends
(file_block.py: the same raw-image backend as virtio-blk's, buffered I/O)."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import DeviceSpec, scsi_options
from .file_block import FileBlockBackend


def open_scsi_disks(specs: Sequence[DeviceSpec]) -> dict[int, list[FileBlockBackend]]:
    """Open every virtio-scsi spec's images (by spec index, in disk order), or
    ConfigError with every one opened so far closed again."""
    opened: dict[int, list[FileBlockBackend]] = {}
    try:
        for i, spec in enumerate(specs):
            if spec.type == "virtio-scsi":
                options = scsi_options(spec.options)
                disks = opened.setdefault(i, [])
                for path in options.disks:
                    disks.append(FileBlockBackend(path, read_only=options.readonly))
    except BaseException:
        close_scsi_disks(opened)
        raise
    return opened


def close_scsi_disks(opened: dict[int, list[FileBlockBackend]]) -> None:
    for disks in opened.values():
        for backend in disks:
            backend.close()
