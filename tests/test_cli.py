"""The command lines: clear errors for bad flags, graceful stop on signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--device", "nosuch"], "unknown device type 'nosuch'; use one of pci-testdev"),
        (["--device", "pci-testdev,colour=red"], "has no option 'colour'"),
        (["--device", "pci-testdev,slot=99"], "slot 99 is not 1..31"),
        (["--device", "pci-testdev,slot=x"], "slot='x' is not a number"),
        (["--device", "pci-testdev,name=a", "--device", "pci-testdev,name=a"], "named 'a'"),
        (["--device", "pci-testdev,slot=3", "--device", "pci-testdev,slot=3"], "already taken"),
        (["--listen", "nonsense"], "expected unix:PATH or HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "not 0..65535"),
        (["--listen", "10.1.2.3:7000"], "--insecure-tcp"),
        (["--tls-cert", "/nonexistent.pem"], "TLS needs both"),
        (["--log-level", "chatty"], "invalid choice"),
    ],
)
def test_devserver_rejects_bad_flags_with_a_reason(flags: list[str], needle: str) -> None:
    result = run("-m", "devserver", *flags)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_devserver_help_lists_device_types() -> None:
    result = run("-m", "devserver", "--help")
    assert result.returncode == 0
    assert "pci-testdev" in result.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_devserver_stops_gracefully(tmp_path: Path, signum: int) -> None:
    sock = tmp_path / "run" / "dev.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "devserver", "--listen", f"unix:{sock}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        probe = run("-m", "vmm_client", "probe", "--devserver", f"unix:{sock}")
        assert probe.returncode == 0, probe.stderr
        assert "00:01.0" in probe.stdout and "Device Serial Number" in probe.stdout
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not sock.exists()


def test_vmm_client_says_when_the_server_is_not_there(tmp_path: Path) -> None:
    result = run("-m", "vmm_client", "probe", "--devserver", f"unix:{tmp_path}/none.sock")
    assert result.returncode == 1
    assert "cannot reach the device server" in result.stderr


def test_vmm_client_qemu_checks_device_specs_before_booting() -> None:
    result = run("-m", "vmm_client", "qemu", "--device", "nosuch")
    assert result.returncode == 1
    assert "unknown device type 'nosuch'" in result.stderr
    assert "Traceback" not in result.stderr


def test_vmm_client_qemu_takes_a_server_or_devices_not_both() -> None:
    result = run("-m", "vmm_client", "qemu", "--devserver", "unix:/x", "--device", "pci-testdev")
    assert result.returncode != 0
    assert "either --devserver or --device" in result.stderr
