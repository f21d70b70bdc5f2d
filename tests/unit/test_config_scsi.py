"""`--device virtio-scsi,...`: its keys (disk= repeatable), checked without I/O,
and the builder's need for the opened disks."""

from __future__ import annotations

from pathlib import Path

import pytest

from devserver.backends.scsi_disks import close_scsi_disks, open_scsi_disks
from devserver.config import REPEAT_SEP, build_bus, parse_device_spec, scsi_options
from devserver.devices.scsi import MAX_DISKS, VirtioScsi
from devserver.errors import ConfigError
from devserver.virtio.pci_transport import VirtioPciFunction
from tests.unit.devices.test_blk import FakeDisk


def test_disk_is_repeatable_in_order() -> None:
    spec = parse_device_spec("virtio-scsi,disk=/a.img,disk=/b.img,readonly=on")
    assert spec.options["disk"] == f"/a.img{REPEAT_SEP}/b.img"
    checked = scsi_options(spec.options)
    assert checked.disks == ("/a.img", "/b.img") and checked.readonly


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("virtio-scsi", "needs disk=IMAGE"),
        ("virtio-scsi,disk=", "needs disk=IMAGE"),
        ("virtio-scsi,disk=/a,readonly=yes", "readonly='yes'"),
        ("virtio-scsi,disk=/a,path=/b", "has no option 'path'"),
    ],
)
def test_bad_options(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        scsi_options(parse_device_spec(text).options)


def test_too_many_disks() -> None:
    text = "virtio-scsi" + ",disk=/x" * (MAX_DISKS + 1)
    with pytest.raises(ConfigError, match="at most"):
        scsi_options(parse_device_spec(text).options)


def test_build_needs_the_opened_disks() -> None:
    specs = [parse_device_spec("virtio-scsi,disk=/a,disk=/b")]
    with pytest.raises(ConfigError, match="not opened"):
        build_bus(specs)
    bus = build_bus(specs, scsi_disks={0: [FakeDisk(), FakeDisk()]})
    (function,) = [f for _, f in bus if isinstance(f, VirtioPciFunction)]
    assert isinstance(function.device, VirtioScsi) and len(function.device.luns) == 2


def test_open_and_close_images(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(4096))
    b.write_bytes(bytes(8192))
    specs = [parse_device_spec("pci-testdev"), parse_device_spec(f"virtio-scsi,disk={a},disk={b}")]
    opened = open_scsi_disks(specs)
    try:
        assert list(opened) == [1] and [d.size for d in opened[1]] == [4096, 8192]
    finally:
        close_scsi_disks(opened)
    missing = [parse_device_spec(f"virtio-scsi,disk={a},disk={tmp_path / 'none.img'}")]
    with pytest.raises(ConfigError, match="cannot open"):
        open_scsi_disks(missing)
