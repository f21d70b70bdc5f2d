"""The protocol between the host and the guest's /init, over the kernel command line and serial.

Host to guest: the kernel command line carries `devmodel.nonce=<hex>` and,
when it fits, the script as `devmodel.cmd=<base64>`; a longer script goes in
an extra cpio archive appended to the initrd as /devmodel/cmd.sh (the
x86 command line is limited to 2048 bytes).

Guest to host, on the serial console, after the modules are loaded:

    DEVMODEL-BEGIN <nonce>
    <the script's stdout and stderr>
    <one newline added by /init>
    DEVMODEL-END <nonce>
    DEVMODEL-EXIT=<status>
    [DEVMODEL-DMESG <nonce> ... DEVMODEL-DMESG-END <nonce>]   (when asked for)

The nonce is random per boot, so nothing a script prints (not even
/proc/cmdline) can fake the end marker. /init always writes a newline before
the end marker, and the parser takes it off again, so the output is exact
whether or not the script ended its last line. Kernel messages are kept off
the console while the script runs (dmesg -n 1) unless asked for, so they
cannot interleave with its output. Serial CRLF line ends become LF.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass

__all__ = [
    "BEGIN",
    "END",
    "EXIT",
    "INIT_ERROR",
    "MAX_CMDLINE_SCRIPT",
    "ParsedConsole",
    "decode_script",
    "encode_script",
    "new_nonce",
    "parse_console",
]

BEGIN = "DEVMODEL-BEGIN"
END = "DEVMODEL-END"
EXIT = "DEVMODEL-EXIT="
DMESG_BEGIN = "DEVMODEL-DMESG"
DMESG_END = "DEVMODEL-DMESG-END"
INIT_ERROR = "devmodel-init: "
# Room left for the fixed parameters and the caller's own within COMMAND_LINE_SIZE (2048).
MAX_CMDLINE_SCRIPT = 1400


def new_nonce() -> str:
    return secrets.token_hex(8)


def encode_script(script: str) -> str:
    """The script as one command-line word: base64 has no spaces, quotes or newlines."""
    return base64.b64encode(script.encode()).decode("ascii")


def decode_script(word: str) -> str:
    try:
        return base64.b64decode(word, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError(f"not a base64 script: {word[:40]!r}") from e


@dataclass(frozen=True)
class ParsedConsole:
    output: str | None  # None when the begin or end marker is missing
    exit_status: int | None
    init_errors: tuple[str, ...]
    dmesg: str | None
    begin_offset: int | None  # where in the normalized console the script output starts


def normalize_console(text: str) -> str:
    return text.replace("\r\n", "\n")


def _find_line(text: str, line: str, start: int = 0) -> int:
    """Index of `line` where it is a whole line of text (from start), or -1."""
    pos = start
    while True:
        i = text.find(line + "\n", pos)
        if i < 0:
            return -1
        if i == 0 or text[i - 1] == "\n":
            return i
        pos = i + 1


def parse_console(console: str, nonce: str) -> ParsedConsole:
    text = normalize_console(console)
    begin_line = f"{BEGIN} {nonce}"
    # The nonce makes the marker unique, so it need not start a line (it
    # does, since /init prints a newline first, unless a stray kernel message interleaved).
    b = text.find(begin_line + "\n")
    # Not only at line starts: a console line may begin with firmware or kernel text.
    init_errors = tuple(
        line[line.index(INIT_ERROR) + len(INIT_ERROR) :]
        for line in (text if b < 0 else text[:b]).splitlines()
        if INIT_ERROR in line
    )
    if b < 0:
        return ParsedConsole(None, None, init_errors, None, None)
    start = b + len(begin_line) + 1
    end_marker = f"\n{END} {nonce}\n"
    # The newline that /init adds before the marker is part of end_marker.
    e = text.find(end_marker, start)
    if e < 0:
        return ParsedConsole(None, None, init_errors, None, start)
    output = text[start:e]
    after = e + len(end_marker)
    m = re.compile(rf"^{re.escape(EXIT)}(-?\d+)$", re.MULTILINE).search(text, after)
    status = int(m[1]) if m else None
    dmesg: str | None = None
    d = _find_line(text, f"{DMESG_BEGIN} {nonce}", after)
    if d >= 0:
        dstart = d + len(DMESG_BEGIN) + len(nonce) + 2
        dend = text.find(f"\n{DMESG_END} {nonce}\n", dstart)
        if dend >= 0:
            dmesg = text[dstart:dend]
    return ParsedConsole(output, status, init_errors, dmesg, start)
