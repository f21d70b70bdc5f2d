"""The main job, `scripts/demo.sh`, as a user runs it: every device type served,
a Linux guest drives each one, the console's host ends and the screendump see
what the guest did. The guest draws eight known colour bands, so the saved
picture is checked pixel for pixel.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from devserver.config import DEVICE_TYPES
from tests.unit.client.test_demo import read_png

pytestmark = [pytest.mark.usefixtures("qemu_ready"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# The guest's bands, top to bottom, as RGB (scripts/demo-guest.sh writes B, G, R, 0).
BANDS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
    (255, 255, 255),
    (64, 64, 64),
]


def test_demo_shows_every_device(tmp_path: Path) -> None:
    screen = tmp_path / "screen.png"
    proc = subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=ROOT,
        env={**os.environ, "DEMO_SCREENDUMP": str(screen)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    assert "FAILED" not in out + proc.stderr
    # Every device type, served and seen by the guest's PCI core.
    for ids in ("[1234:7e57]", "[1af4:1042]", "[1af4:1043]", "[1234:1111]"):
        assert ids in out, ids
    assert out.count("[1234:7e57]") == 2
    assert "Kernel driver in use: virtio-pci" in out
    assert "wrote and read back 256 KiB: identical" in out
    assert "hvc0 (" in out and "got: 'hello from the guest on hvc0'" in out
    assert "got 'hello from the guest on org.devmodel.agent, drawn=yes'" in out
    assert "the host answered: screendump saved: 1024x768" in out
    # virtio-net needs root (a tap); without it the demo says so and goes on.
    if os.geteuid() == 0:
        assert "[1af4:1041]" in out
        assert "is 10.0.78.2/24" in out
        assert re.search(r"ping 10\.0\.78\.1: 3 packets transmitted, [1-3] packets received", out)
        netns = re.search(r"tap's end in (devmodel-demo-\d+) \(10\.0\.78\.1\) got [1-9]", out)
        assert netns, out
        assert not Path("/run/netns", netns[1]).exists(), "the namespace outlived the demo"
    else:
        assert "virtio-net: skipped (needs root for a tap)" in out
    # The device types the demo adds where the server has them.
    if "virtio-scsi" in DEVICE_TYPES:
        assert "[1af4:1048]" in out
        assert re.search(r"32768 sectors, .* at \d+:0:0:0", out)  # the 16 MiB image, target 0
        assert "wrote and read back 64 KiB: identical" in out
    if "virtio-9p" in DEVICE_TYPES:
        assert "[1af4:1049]" in out
        assert "hello.txt says: hello from the host, through virtio-9p" in out
        assert re.search(r"the guest wrote \S+/from-guest\.txt: hello from the guest", out)
    if "virtio-balloon" in DEVICE_TYPES:
        assert "[1af4:1045]" in out
        assert "the host answered: balloon target 32 MiB, the guest holds 32 MiB" in out
        assert "\ntarget 32 MiB, the guest holds 32 MiB\n" in out
    width, height, rgb = read_png(screen.read_bytes())
    assert (width, height) == (1024, 768)
    band = height // len(BANDS)
    expected = b"".join(bytes(colour) * width * band for colour in BANDS)
    assert rgb == expected
