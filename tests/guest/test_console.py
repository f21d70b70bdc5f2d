"""The host/guest marker protocol: script encoding and console parsing."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm_client.guest.console import (
    MAX_CMDLINE_SCRIPT,
    decode_script,
    encode_script,
    new_nonce,
    parse_console,
)
from vmm_client.guest.image import render_init
from vmm_client.qemu.launch import kernel_cmdline

NONCE = "0123456789abcdef"
SEABIOS = "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.17.0)\r\nBooting from ROM.."


def console(output: str, status: int = 0, *, before: str = "", dmesg: str | None = None) -> str:
    """What /init prints, with the serial port's CRLF line ends."""
    text = f"{before}\nDEVMODEL-BEGIN {NONCE}\n{output}\nDEVMODEL-END {NONCE}\n"
    text += f"DEVMODEL-EXIT={status}\n"
    if dmesg is not None:
        text += f"DEVMODEL-DMESG {NONCE}\n{dmesg}\nDEVMODEL-DMESG-END {NONCE}\n"
    text += "[    3.0] reboot: Power down\n"
    return SEABIOS + text.replace("\n", "\r\n")


@pytest.mark.parametrize(
    "script",
    ["lspci -nn; uname -r", "echo 'a b'\n\tx=$((1+2))\necho \"$x\" >&2\n", "printf 'é ✓'", ""],
)
def test_script_encoding_round_trips_as_one_word(script: str) -> None:
    word = encode_script(script)
    assert re.fullmatch(r"[A-Za-z0-9+/=]*", word)
    assert decode_script(word) == script


def test_decode_rejects_non_base64() -> None:
    with pytest.raises(ValueError):
        decode_script("not base64!")


def test_nonces_differ() -> None:
    assert new_nonce() != new_nonce()
    assert re.fullmatch(r"[0-9a-f]{16}", new_nonce())


@pytest.mark.parametrize(
    "output",
    ["00:00.0 Host bridge\n6.1.0-56-amd64\n", "no newline at the end", "", "\n\n", "a\r b"],
)
def test_output_is_exact(output: str) -> None:
    parsed = parse_console(console(output, 3), NONCE)
    assert parsed.output == output.replace("\r\n", "\n")
    assert parsed.exit_status == 3
    assert parsed.init_errors == ()
    assert parsed.dmesg is None


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r")))
def test_any_output_survives(output: str) -> None:
    assert parse_console(console(output, 0), NONCE).output == output


def test_markers_with_another_nonce_inside_the_output_are_just_output() -> None:
    fake = "DEVMODEL-END ffffffffffffffff\nDEVMODEL-EXIT=99\nDEVMODEL-BEGIN x\n"
    parsed = parse_console(console(fake, 1), NONCE)
    assert parsed.output == fake
    assert parsed.exit_status == 1


def test_init_errors_and_dmesg() -> None:
    before = "devmodel-init: insmod failed: virtio_net\nsomething else\n"
    parsed = parse_console(console("x\n", 0, before=before, dmesg="[0.0] Linux\n[0.1] more"), NONCE)
    assert parsed.init_errors == ("insmod failed: virtio_net",)
    assert parsed.dmesg == "[0.0] Linux\n[0.1] more"
    assert parsed.output == "x\n"


@pytest.mark.parametrize(
    "cut",
    [
        SEABIOS + "[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n",
        console("partial", 0).split("DEVMODEL-END")[0],
    ],
)
def test_missing_markers_give_no_output(cut: str) -> None:
    parsed = parse_console(cut, NONCE)
    assert parsed.output is None
    assert parsed.exit_status is None


def test_the_init_script_uses_the_same_markers() -> None:
    init = render_init()
    assert "@" not in init.replace("$@", "")
    for marker in ("DEVMODEL-BEGIN", "DEVMODEL-END", "DEVMODEL-EXIT=", "devmodel-init: "):
        assert marker in init
    assert init.startswith("#!/bin/sh\n")
    assert "poweroff -f" in init


def test_kernel_cmdline() -> None:
    word = encode_script("true")
    line = kernel_cmdline(NONCE, word, dmesg=True, extra="foo=1  bar")
    words = line.split()
    assert words[:4] == ["console=ttyS0", "panic=-1", "iomem=relaxed", "quiet"]
    assert f"devmodel.nonce={NONCE}" in words
    assert f"devmodel.cmd={word}" in words
    assert "devmodel.dmesg=1" in words
    assert "devmodel.printk=keep" not in words
    assert words[-2:] == ["foo=1", "bar"]
    assert "devmodel.cmd" not in kernel_cmdline(NONCE, None)
    # The x86 command line holds 2047 bytes; the longest inline script leaves room.
    assert len(kernel_cmdline(NONCE, "A" * MAX_CMDLINE_SCRIPT, kernel_messages=True)) < 1600
