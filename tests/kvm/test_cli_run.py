"""`python -m vmm_client run`: the KVM frontend from the command line."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmm_client.kvm.guest.build import build_pcitest

ROOT = Path(__file__).resolve().parents[2]


def vmm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmm_client", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture
def devserver(tmp_path: Path) -> Iterator[str]:
    """A device server in its own process, as a user would run it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sock = run_dir / "dev.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devserver",
            "--listen",
            f"unix:{sock}",
            "--device",
            "pci-testdev",
            "--device",
            "pci-testdev,slot=5",
            "--log-level",
            "error",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "devserver did not start"
            time.sleep(0.05)
        yield f"unix:{sock}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_kernel_that_is_missing() -> None:
    result = vmm("run", "--kernel", "/nonexistent/vmlinuz")
    assert result.returncode == 2
    assert "No such file" in result.stderr and "Traceback" not in result.stderr


def test_needs_a_program() -> None:
    result = vmm("run")
    assert result.returncode != 0
    assert "--guest-program FILE or --build-pcitest" in result.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("flags", [[], ["--ring3"], ["--smp", "2"]], ids=["ring0", "ring3", "smp2"])
def test_runs_pcitest_against_a_devserver_process(
    devserver: str, tmp_path: Path, flags: list[str]
) -> None:
    elf = build_pcitest(tmp_path / "build")
    result = vmm("run", "--devserver", devserver, "--guest-program", str(elf), "-m", "32M", *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pcitest: 2 devices, 0 failures" in result.stdout
    assert "guest ended: exit-port status 0" in result.stderr
    smp = "--smp" in flags
    assert f"{4 if smp else 2} MSIs, 4 INTx assertions" in result.stderr
    if smp:
        assert "pcitest: start, 2 cpus" in result.stdout
        assert "CHECK ap-reads-ok got=0x20 want=0x20 ok" in result.stdout


@pytest.mark.kvm
def test_flat_binary_without_devices(tmp_path: Path) -> None:
    flat = build_pcitest(tmp_path / "build", flat=True)
    result = vmm("run", "--no-devserver", "--guest-program", str(flat))
    # An empty bus: the latch works, no test device is found (one failed check).
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CHECK cf8-latch got=0x80000000 want=0x80000000 ok" in result.stdout
    assert "pcitest: 0 devices, 1 failures" in result.stdout
