"""`python -m vmm_client.demo`: the frontend half of the main job (scripts/demo.sh).

scripts/demo.sh starts a device server with every device type; this boots a
Linux guest under QEMU whose PCI devices are all that server's (through the
vfio-user bridge), runs scripts/demo-guest.sh in it, shows its output as it
comes, and plays the host ends of its virtio-console meanwhile:

- hvc0's socket: keeps what the guest writes there;
- the named port's socket (org.devmodel.agent): answers each line the guest
  sends. When the line says the guest drew on its framebuffer (`drawn=yes`),
  the answer waits for a screendump of the vesa-fb (saved as PNG, or PPM),
  so the picture is taken while the guest still shows it and the guest
  hears about it on the same port. A line asking for the balloon (`balloon`)
  sets a virtio-balloon's target (Balloon RPC) and is answered once the
  guest's driver holds it (or the wait ran out), with what it holds.

Then it prints what the host ends got and exits non-zero, with the reason,
when the guest failed or a host end missed what it should have seen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import struct
import sys
import threading
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from devserver.service.balloon import balloon
from devserver.service.screendump import Picture, ScreendumpError, screendump

from .client import ClientError, open_channel
from .guest.console import BEGIN, END
from .qemu.drivers import modules_for, served_devices
from .qemu.frontend import boot_served_guest

AGENT_PORT = "org.devmodel.agent"
HVC0_GREETING = "hello from the guest on hvc0"
# The fbdev emulation copies to VRAM from a worker: take pictures until two
# in a row agree (a bound, not a wait: the guest already paused for it).
SCREENDUMP_TRIES = 10
SCREENDUMP_PAUSE_S = 0.3
MIB = 1 << 20
BALLOON_TARGET_BYTES = 32 * MIB
# The driver inflates in steps of 256 pages; under TCG on a loaded machine
# that takes seconds, so the answer waits, polling, up to this long.
BALLOON_WAIT_S = 90.0
BALLOON_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class SavedPicture:
    path: Path
    width: int
    height: int
    bpp: int
    sha256: str  # of the RGB pixels, so PNG and PPM files of one picture agree


@dataclass(frozen=True, slots=True)
class BalloonSeen:
    """A virtio-balloon's target and what the guest's driver held, in bytes."""

    target: int
    actual: int

    def __str__(self) -> str:
        return f"target {self.target / MIB:g} MiB, the guest holds {self.actual / MIB:g} MiB"


@dataclass(slots=True)
class HostEnds:
    """What the console's host ends saw while the guest ran."""

    hvc0: bytearray = field(default_factory=bytearray)
    agent_lines: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    picture: SavedPicture | None = None
    balloon: BalloonSeen | None = None
    problems: list[str] = field(default_factory=list)


def png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG (no filter on any row): small enough to write by hand."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = width * 3
    raw = b"".join(b"\0" + rgb[y * row : (y + 1) * row] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _same(a: Picture | None, b: Picture | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.width, a.height, a.rgb) == (b.width, b.height, b.rgb)


async def capture(channel: grpc.aio.Channel, device_id: int, out: Path) -> SavedPicture:
    """Screendump device `device_id` until two pictures agree, and save the last."""
    picture = await screendump(channel, device_id)
    for _ in range(SCREENDUMP_TRIES - 1):
        await asyncio.sleep(SCREENDUMP_PAUSE_S)
        last, picture = picture, await screendump(channel, device_id)
        if _same(picture, last):
            break
    if picture is None:
        raise ScreendumpError("the vesa-fb shows nothing (the guest's driver left it off)")
    data = png(picture.width, picture.height, picture.rgb) if out.suffix == ".png" else None
    await asyncio.to_thread(out.write_bytes, data if data is not None else picture.ppm())
    digest = hashlib.sha256(picture.rgb).hexdigest()
    return SavedPicture(out, picture.width, picture.height, picture.mode.bpp, digest)


async def inflate(
    channel: grpc.aio.Channel,
    device_id: int,
    target: int = BALLOON_TARGET_BYTES,
    wait_s: float = BALLOON_WAIT_S,
    poll_s: float = BALLOON_POLL_S,
) -> BalloonSeen:
    """Set the balloon's target; poll until the guest holds it or `wait_s` ran out."""
    reply = await balloon(channel, device_id, target)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while reply.actual_bytes != reply.target_bytes and loop.time() < deadline:
        await asyncio.sleep(poll_s)
        reply = await balloon(channel, device_id)
    return BalloonSeen(reply.target_bytes, reply.actual_bytes)


async def keep_hvc0(reader: asyncio.StreamReader, ends: HostEnds) -> None:
    while chunk := await reader.read(4096):
        ends.hvc0 += chunk


async def answer_agent(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ends: HostEnds,
    take_picture: Callable[[], Awaitable[SavedPicture]] | None,
    set_balloon: Callable[[], Awaitable[BalloonSeen]] | None = None,
) -> None:
    """Answer every line the guest sends on the named port (one line each)."""
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line past the stream's limit: not our guest script
            ends.problems.append(f"{AGENT_PORT}: the guest sent an over-long line")
            return
        if not line:
            return
        text = line.decode(errors="replace").strip()
        ends.agent_lines.append(text)
        answer = "hello from the host"
        if text.startswith("balloon"):
            answer = await balloon_answer(ends, set_balloon)
        elif "drawn=yes" in text:
            if take_picture is None:
                answer = "no screendump: the server has no vesa-fb"
            else:
                try:
                    ends.picture = saved = await take_picture()
                    answer = (
                        f"screendump saved: {saved.width}x{saved.height}, sha256 "
                        + (saved.sha256[:16])
                    )
                except (ScreendumpError, grpc.aio.AioRpcError, OSError) as e:
                    ends.problems.append(f"screendump failed: {e}")
                    answer = "the screendump failed"
        writer.write(answer.encode() + b"\n")
        await writer.drain()
        ends.answers.append(answer)


async def balloon_answer(
    ends: HostEnds, set_balloon: Callable[[], Awaitable[BalloonSeen]] | None
) -> str:
    if set_balloon is None:
        return "no balloon: the server has no virtio-balloon"
    try:
        ends.balloon = seen = await set_balloon()
    except grpc.aio.AioRpcError as e:
        ends.problems.append(f"the Balloon RPC failed: {e.code().name}: {e.details()}")
        return "the Balloon RPC failed"
    if seen.actual != seen.target:
        ends.problems.append(f"the balloon never reached its target: {seen}")
    return f"balloon {seen}"


class LiveScript:
    """Prints the guest script's output, line by line, as the console brings it.

    Called from QEMU's reader thread with text in pieces of any size; only the
    lines between /init's begin and end markers are the script's.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._inside = False
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self._lock:
            self._pending += text.replace("\r", "")
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                if line.startswith(BEGIN):
                    self._inside = True
                elif line.startswith(END):
                    self._inside = False
                elif self._inside:
                    print(line, flush=True)


async def connect(path: Path, port: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The host end of a console port: the server listens, we are its one client."""
    try:
        return await asyncio.open_unix_connection(str(path))
    except OSError as e:
        raise RuntimeError(
            f"cannot connect to {port}'s host end at {path} ({e.strerror}); "
            "is the server's virtio-console listening there?"
        ) from None


async def run(
    devserver: str,
    script: str,
    hvc0: Path,
    agent: Path,
    screendump_to: Path,
    timeout: float,
) -> int:
    """The whole frontend half; 0 when the guest and every host end did their part."""
    devices = await served_devices(devserver)
    ends = HostEnds()
    print(f"the device server at {devserver} serves {len(devices)} devices:")
    for d in devices:
        ids = f"{d.vendor_id:04x}:{d.product_id:04x}"
        print(f"  slot {d.device:2}  {d.name:<16} {ids}  {d.type}")
    fb = next((d.device_id for d in devices if d.type == "vesa-fb"), None)
    bal = next((d.device_id for d in devices if d.type == "virtio-balloon"), None)
    async with open_channel(devserver) as channel:

        async def take_picture() -> SavedPicture:
            assert fb is not None
            return await capture(channel, fb, screendump_to)

        async def set_balloon() -> BalloonSeen:
            assert bal is not None
            return await inflate(channel, bal)

        hvc0_io = await connect(hvc0, "hvc0")
        try:
            agent_io = await connect(agent, AGENT_PORT)
        except RuntimeError:
            hvc0_io[1].close()
            raise
        tasks = [
            asyncio.create_task(keep_hvc0(hvc0_io[0], ends)),
            asyncio.create_task(
                answer_agent(
                    *agent_io,
                    ends,
                    take_picture if fb is not None else None,
                    set_balloon if bal is not None else None,
                )
            ),
        ]
        print("booting the guest under QEMU (TCG); its script's output follows as it runs:")
        print(flush=True)
        try:
            result = await boot_served_guest(
                devserver,
                script,
                timeout=timeout,
                modules=modules_for(d.type for d in devices),
                # No blinking cursor on the framebuffer the demo draws on.
                extra_append="vt.global_cursor_default=0",
                on_output=LiveScript(),
            )
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except OSError as e:  # the server closed a host end under us
                    ends.problems.append(f"a console host end failed: {e}")
            for _, writer in (hvc0_io, agent_io):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    for error in result.init_errors:
        ends.problems.append(f"guest /init: {error}")
    report(ends, fb is not None, bal is not None, hvc0, agent)
    print(
        f"guest exited with status {result.exit_status} "
        f"(script started {result.boot_seconds:.1f} s after QEMU, "
        f"QEMU ran {result.total_seconds:.1f} s)"
    )
    if result.exit_status != 0:
        ends.problems.append(f"the guest script exited with status {result.exit_status}")
    for problem in ends.problems:
        print(f"demo: FAILED: {problem}", file=sys.stderr)
    return 1 if ends.problems else 0


def report(ends: HostEnds, has_fb: bool, has_balloon: bool, hvc0: Path, agent: Path) -> None:
    """What the host ends got; what they missed goes to ends.problems."""
    print()
    print("== the host ends of the virtio-console")
    got = ends.hvc0.decode(errors="replace").replace("\r", "")
    print(f"hvc0 ({hvc0}) got: {got.strip()!r}")
    if HVC0_GREETING not in got:
        ends.problems.append(f"hvc0's host end never got {HVC0_GREETING!r}")
    print(f"{AGENT_PORT} ({agent}):")
    for line, answer in zip(ends.agent_lines, ends.answers, strict=False):
        print(f"  got {line!r}, answered {answer!r}")
    if not ends.answers:
        ends.problems.append(f"the {AGENT_PORT} port's host end never got a line")
    if has_fb:
        print("== the screen (Screendump of the vesa-fb while the guest showed it)")
        if ends.picture is None:
            ends.problems.append("no screendump was taken")
        else:
            p = ends.picture
            print(f"{p.path}: {p.width}x{p.height}, guest mode {p.bpp} bpp")
            print(f"sha256 of its RGB pixels: {p.sha256}")
    if has_balloon:
        print(
            "== the balloon (Balloon RPC: the target the host set, what the guest's driver holds)"
        )
        if ends.balloon is None:
            ends.problems.append("the guest never asked for the balloon")
        else:
            print(ends.balloon)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vmm_client.demo",
        description="The main job's guest and host ends (scripts/demo.sh starts the server).",
    )
    parser.add_argument("--devserver", required=True, metavar="ADDR", help="unix:PATH")
    parser.add_argument("--script", type=Path, required=True, help="the guest's shell script")
    parser.add_argument("--hvc0", type=Path, required=True, help="hvc0's host-end socket")
    parser.add_argument(
        "--agent", type=Path, required=True, help=f"the {AGENT_PORT} port's host-end socket"
    )
    parser.add_argument(
        "--screendump", type=Path, required=True, help="where to save the picture (.png or .ppm)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default: 600)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        script = args.script.read_text()
        import uvloop

        return uvloop.run(
            run(args.devserver, script, args.hvc0, args.agent, args.screendump, args.timeout)
        )
    except (ClientError, RuntimeError, OSError) as e:  # QEMU, the image, the server, the sockets
        print(f"demo: FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
