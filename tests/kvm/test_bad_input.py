"""The issue's bad input, each a one-line error naming the fix (or, for a server that
dies mid-run, a guest that reads all-ones and ends): no /dev/kvm or no permission,
an unreachable server, a server killed while the guest runs, a file that is not a
program, RAM too small, a bad --smp."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmm_client import __main__ as cli
from vmm_client.client import FrontendOptions, SyncSession
from vmm_client.kvm import vm as vm_module
from vmm_client.kvm.boot import LOAD_ADDRESS, enter_long_mode, load_program
from vmm_client.kvm.devices import DEBUG_EXIT_PORT, DebugExit, PciHost
from vmm_client.kvm.vm import KvmUnavailable, Vm, open_kvm

ROOT = Path(__file__).resolve().parents[2]


def vmm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmm_client", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("vmm_client: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "exit0.bin"
    path.write_bytes(b"\x31\xc0\xe7" + bytes((DEBUG_EXIT_PORT,)))  # xor eax, eax; out 0xf4
    return path


def test_no_permission_names_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(13, "Permission denied", path)

    with monkeypatch.context() as patched:
        patched.setattr(os, "open", refuse)
        with pytest.raises(KvmUnavailable) as caught:
            open_kvm()
    assert "usermod -aG kvm" in str(caught.value)


def test_cli_without_kvm_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], program: Path
) -> None:
    missing = str(program.parent / "no-kvm-here")
    monkeypatch.setattr(vm_module, "open_kvm", lambda path=missing: open_kvm(missing))
    status = cli.main(["run", "--no-devserver", "--guest-program", str(program)])
    assert status == 1
    line = one_error_line(capsys.readouterr().err)
    assert "does not exist" in line and "modprobe" in line


def test_ram_too_small_for_a_program(program: Path) -> None:
    result = vmm("--no-devserver", "--guest-program", str(program), "-m", "1M")
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert "too small" in line and "use -m 4M or more" in line


def test_bad_smp(program: Path) -> None:
    result = vmm("--no-devserver", "--guest-program", str(program), "--smp", "0")
    assert result.returncode != 0
    assert "--smp 1..8" in one_error_line(result.stderr)


@pytest.mark.kvm
def test_not_a_64_bit_program(tmp_path: Path) -> None:
    elf32 = tmp_path / "prog32"
    elf32.write_bytes(b"\x7fELF\x01\x01\x01" + bytes(64))
    result = vmm("--no-devserver", "--guest-program", str(elf32))
    assert result.returncode != 0
    assert "64-bit little-endian ELF" in one_error_line(result.stderr)


@pytest.mark.kvm
def test_unreachable_server(tmp_path: Path, program: Path) -> None:
    start = time.monotonic()
    result = vmm("--devserver", f"unix:{tmp_path}/nobody.sock", "--guest-program", str(program))
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "cannot reach the device server" in line and "python -m devserver" in line
    assert time.monotonic() - start < 50  # refused at once, not after a long wait


@pytest.fixture
def devserver_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sock = run_dir / "dev.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "devserver", "--listen", f"unix:{sock}", "--log-level", "error"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "devserver did not start"
            time.sleep(0.05)
        yield proc, f"unix:{sock}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _mov_dx(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port)


def _mov_eax(value: int) -> bytes:
    return b"\xb8" + struct.pack("<I", value)


def _config_write(offset: int, value: int) -> bytes:
    return (
        _mov_dx(0xCF8) + _mov_eax(0x8000_0800 | offset) + b"\xef" + _mov_dx(0xCFC)
        + _mov_eax(value) + b"\xef"
    )  # fmt: skip


@pytest.mark.kvm
def test_server_killed_mid_run(
    devserver_process: tuple[subprocess.Popen[bytes], str],
) -> None:
    """The guest loops on a posted IO BAR write and a config read of 00:01.0's IDs;
    the server is SIGKILLed meanwhile. From then on the guest reads all-ones (so
    does its last read), the VMM says so once, and the run ends by itself."""
    proc, address = devserver_process
    n = 100_000
    code = _config_write(0x10, 0xC000) + _config_write(0x04, 1)  # BAR0 at 0xC000, IO on
    code += _mov_dx(0xCF8) + _mov_eax(0x8000_0800) + b"\xef"  # latch 00:01.0 offset 0
    code += b"\xb9" + struct.pack("<I", n)  # mov ecx, n
    loop = _mov_dx(0xC004) + b"\xef" + _mov_dx(0xCFC) + b"\xed" + b"\xff\xc9"  # ...; dec ecx
    code += loop + b"\x75" + struct.pack("<b", -(len(loop) + 2))  # jnz loop
    code += b"\xe7" + bytes((DEBUG_EXIT_PORT,))  # out 0xf4, eax: the last value read
    messages: list[str] = []
    with Vm(4 << 20) as vm:
        vm.pio.add(range(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 4), DebugExit())
        pci = PciHost(vm, on_lost=messages.append)
        with SyncSession(address, FrontendOptions("dies"), pci.handle_event) as session:
            pci.attach(session, session.topology)
            load_program(vm.ram, code)
            enter_long_mode(vm.create_vcpu(), LOAD_ADDRESS)

            def kill_when_busy() -> None:
                deadline = time.monotonic() + 60
                while pci.config_accesses < 50 and time.monotonic() < deadline:
                    time.sleep(0.005)
                os.kill(proc.pid, signal.SIGKILL)

            killer = threading.Thread(target=kill_when_busy)
            killer.start()
            result = vm.run(120)
            killer.join()
    assert (result.reason, result.status) == ("exit-port", 0xFFFF_FFFF), result
    assert len(messages) == 1, messages
    assert "device server went away" in messages[0] and "all-ones" in messages[0]
    assert pci.session is None and pci.session_error is not None
    assert 50 <= pci.config_accesses < n  # it died part-way; later reads never tried
