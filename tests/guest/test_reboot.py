"""Several boots in one QEMU process (vmm_client.qemu.reboot): the console split
per boot, and a real guest that reboots itself twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm_client.qemu.launch import qemu_argv
from vmm_client.qemu.reboot import (
    BOOT_BEGIN,
    BOOT_END,
    NO_SCRIPT_STATUS,
    dispatcher_script,
    run_across_reboots,
    split_boots,
)

NONCE = "0123456789abcdef"


def framed(boot: int, body: str, status: int | None) -> str:
    text = f"{BOOT_BEGIN} {NONCE} {boot}\r\n{body}"
    if status is not None:
        text += f"\r\n{BOOT_END} {NONCE} {boot} {status}\r\n"
    return text


def test_split_boots_in_console_order() -> None:
    console = (
        "SeaBIOS\r\nDEVMODEL-BEGIN x\r\n"
        + framed(1, "one\r\n", 0)
        + "[    6.7] reboot: Restarting system\r\nSeaBIOS\r\n"
        + framed(2, "two", 3)
    )
    boots = split_boots(console, NONCE)
    assert [(b.boot, b.output, b.exit_status) for b in boots] == [(1, "one\n", 0), (2, "two", 3)]


def test_a_boot_cut_short_has_no_status_and_other_nonces_do_not_count() -> None:
    console = (
        framed(1, "a\r\n", 0).replace(NONCE, "ffffffffffffffff")  # printed by a script: ignored
        + framed(1, "started\r\n[ 9.1] Kernel panic\r\n", None)
        + framed(2, "no script for boot 2\r\n", NO_SCRIPT_STATUS)
    )
    boots = split_boots(console, NONCE)
    assert [(b.boot, b.exit_status) for b in boots] == [(1, None), (2, NO_SCRIPT_STATUS)]
    assert boots[0].output.startswith("started\n")


def test_only_a_reboot_run_drops_no_reboot() -> None:
    assert "-no-reboot" in qemu_argv(["qemu"], Path("/v"), Path("/i"), "")
    assert "-no-reboot" not in qemu_argv(["qemu"], Path("/v"), Path("/i"), "", reboot=True)


def test_dispatcher_reboots_only_between_boots() -> None:
    script = dispatcher_script(3)
    assert '[ "$boot" -lt 3 ]' in script
    assert "reboot -f" in script
    assert "@" not in script  # every placeholder filled


@pytest.mark.usefixtures("qemu_ready")
def test_three_boots_in_one_qemu() -> None:
    result = run_across_reboots(
        ["echo first; cat /proc/sys/kernel/random/boot_id", "echo second", "echo third"],
        timeout=300,
    )
    boots = result.boots
    assert [(b.boot, b.exit_status) for b in boots] == [(1, 0), (2, 0), (3, 0)], (
        result.guest.console
    )
    assert [b.output.splitlines()[0] for b in boots] == ["first", "second", "third"]
    assert result.guest.exit_status == 0
    # One QEMU process: without -no-reboot, and the kernel restarted in it.
    assert "-no-reboot" not in result.guest.argv
    assert result.guest.console.count("Linux version") in (0, 3)  # quiet may hide it
    assert result.guest.console.count("SeaBIOS") == 3
