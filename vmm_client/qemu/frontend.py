"""Boot a Linux guest under QEMU whose PCI devices are all served by a device server.

QEMU's vfio-user client talks to our bridge, the bridge forwards every access
over one gRPC stream to the device server: the guest's own PCI core and
drivers drive our device models.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from ..client import TlsClientFiles
from ..guest.image import DEFAULT_MODULES, DEFAULT_TOOLS, GuestTool
from ..vfio_user.bridge import open_bridge
from .launch import GuestResult, run_in_guest


async def boot_served_guest(
    devserver: str,
    script: str | None,
    *,
    tls: TlsClientFiles | None = None,
    timeout: float = 180.0,
    extra_qemu_args: Sequence[str] = (),
    extra_append: str = "",
    memory_mb: int = 512,
    on_output: Callable[[str], None] | None = None,
    memory_mode: str = "auto",
    tools: Sequence[GuestTool] = DEFAULT_TOOLS,
    modules: Sequence[str] = DEFAULT_MODULES,
) -> GuestResult:
    """Bridge every device of `devserver` into a QEMU guest and run `script` there.

    With `script` None the guest prints `lspci -nn` and powers off.
    `memory_mode` is the bridge's ("shared", "messages" or "auto": shared for
    a unix: server); guest RAM is a shared memfd either way, so "messages"
    serves DmaRequests from the bridge's own map of it. `tools` are the
    guest image's extra programs (vmm_client.guest.image.STORAGE_TOOLS, ...)
    and `modules` its kernel modules (add "ext4" to mount one).
    """
    with tempfile.TemporaryDirectory(prefix="devmodel-vfu-") as directory:
        async with open_bridge(
            devserver, Path(directory), tls=tls, name="qemu", memory_mode=memory_mode
        ) as bridge:
            args = [*bridge.qemu_args(), *extra_qemu_args]
            # QEMU runs in a thread: the bridge must keep answering on this loop.
            return await asyncio.to_thread(
                _run,
                script,
                args,
                timeout,
                extra_append,
                memory_mb,
                on_output,
                tools,
                modules,
            )


def _run(
    script: str | None,
    args: list[str],
    timeout: float,
    extra_append: str,
    memory_mb: int,
    on_output: Callable[[str], None] | None,
    tools: Sequence[GuestTool],
    modules: Sequence[str],
) -> GuestResult:
    return run_in_guest(
        script if script is not None else "lspci -nn",
        args,
        timeout=timeout,
        extra_append=extra_append,
        memory_mb=memory_mb,
        on_output=on_output,
        tools=tools,
        modules=modules,
    )


@contextlib.asynccontextmanager
async def private_devserver(devices: Sequence[str], timeout: float = 30.0) -> AsyncIterator[str]:
    """Run a device server with `devices` (--device specs) on a private socket.

    For one-command use (`python -m vmm_client qemu --device ...`): the specs
    are checked here first, so a typo is reported before anything starts.
    """
    from devserver.config import parse_device_spec

    for spec in devices:
        parse_device_spec(spec)  # raises ConfigError with the reason
    with tempfile.TemporaryDirectory(prefix="devmodel-srv-") as directory:
        sock = Path(directory) / "run" / "devserver.sock"
        argv = [sys.executable, "-m", "devserver", "--listen", f"unix:{sock}"]
        argv += ["--log-level", "warning"]
        for spec in devices:
            argv += ["--device", spec]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while not sock.exists():
                if proc.returncode is not None:
                    err = await proc.stderr.read() if proc.stderr else b""
                    raise RuntimeError(f"the device server did not start: {err.decode().strip()}")
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"the device server did not listen within {timeout} s")
                await asyncio.sleep(0.05)
            yield f"unix:{sock}"
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
