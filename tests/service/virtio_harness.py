"""A hostile guest against a real device server process (reliability.md §6, tool H:
memfd guest RAM, a ring builder and a gRPC client; QEMU's qtest without a VM).

`DevserverProcess` runs `python -m devserver` in its own process, so its RSS is
the server's alone and a crash shows as an exit. `GuestRam` is a sealed memfd
this process maps; in SHARED mode the server maps it too (by /proc/PID/fd/N),
in DMA_MESSAGES `FrontendSession` answers the server's DmaRequests from it.
`WireDriver` is tests/unit/virtio/driver.py's FakeVirtioDriver with every
register access sent over the Attach stream (BarWrite, BarRead, ConfigWrite)
and its rings written into that memfd, so the server reads exactly what a
guest would leave there.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from devmodel.v1 import devmodel_pb2 as pb
from devserver.effects import DeviceNeedsReset, Effect
from devserver.memory import BytearrayMemory
from devserver.pci.function import Presentation
from devserver.pci.regs import PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, PCI_CAPABILITY_LIST
from devserver.virtio.pci_transport import (
    CAP_CFG_TYPE,
    CONFIG_MSIX_VECTOR,
    DEVICE_STATUS,
    MSIX_BAR,
    MSIX_TABLE_OFFSET,
    VIRTIO_BAR,
    VirtioPciFunction,
)
from devserver.virtio.spec import DeviceStatus
from tests.unit.virtio.driver import MSIX_CAP_FLAGS, MSIX_ENABLE, EchoDevice, FakeVirtioDriver
from vmm_client.client import (
    EventHandler,
    FrontendOptions,
    MemoryRegion,
    SyncSession,
)

START_TIMEOUT: Final = 60.0  # a busy 2-core machine starts Python slowly
MSI_ADDRESS: Final = 0xFEE0_0000
MSI_DATA_BASE: Final = 0x40  # vector v sends data 0x40 + v (as the unit driver programs it)


@dataclass
class DevserverProcess:
    """`python -m devserver` on a private UNIX socket, its log in a file."""

    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def status_kib(self, field: str) -> int:
        """A /proc/PID/status field in KiB (VmRSS, VmHWM, RssAnon...)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0])
        raise KeyError(field)

    def log_text(self, since: int = 0) -> str:
        """The server's log from byte `since` on (a test looks at its own part)."""
        with self.log.open("rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log.stat().st_size


@contextlib.contextmanager
def devserver_process(directory: Path, devices: Sequence[str]) -> Iterator[DevserverProcess]:
    """Start the server with `devices`; stop it (SIGTERM, then SIGKILL) at the end."""
    sock = directory / "run" / "dev.sock"
    log = directory / "devserver.log"
    argv = [sys.executable, "-m", "devserver", "--listen", f"unix:{sock}", "--log-level", "info"]
    for spec in devices:
        argv += ["--device", spec]
    with log.open("wb") as sink:
        # The log goes to a file, never a pipe nobody reads (a full pipe would stall it).
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    server = DevserverProcess(proc, f"unix:{sock}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            if not server.alive():
                raise RuntimeError(f"the device server did not start:\n{server.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the device server did not listen within {START_TIMEOUT} s")
            time.sleep(0.05)
        yield server
    finally:
        if server.alive():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class GuestRam:
    """Guest RAM: a memfd sealed against shrinking and growing (as QEMU's
    memory-backend-memfd is), mapped here; sparse, so a large one costs nothing."""

    def __init__(self, size: int, name: str = "hostile-guest-ram") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.map = mmap.mmap(self.fd, size)

    @property
    def path(self) -> str:
        """How another process opens it."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def region(
        self, guest_address: int = 0, *, read_only: bool = False, shared: bool = True
    ) -> MemoryRegion:
        """This RAM at `guest_address`; named by path only when the server maps it."""
        path = self.path if shared else ""
        return MemoryRegion(guest_address, self.size, path=path, read_only=read_only)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class EventLog:
    """Events the session delivered (on the client's loop thread), in order."""

    def __init__(self) -> None:
        self.events: list[Effect] = []

    def __call__(self, effect: Effect) -> None:
        self.events.append(effect)

    def needs_reset(self, device_id: int) -> list[DeviceNeedsReset]:
        return [
            e for e in self.events if isinstance(e, DeviceNeedsReset) and e.device_id == device_id
        ]


@dataclass(frozen=True)
class Placed:
    """A GuestRam at a guest-physical address, as the frontend announces it."""

    guest_address: int
    ram: GuestRam
    read_only: bool = False


class FrontendSession(SyncSession):
    """SyncSession that, in MEMORY_MODE_DMA_MESSAGES, answers the server's
    DmaRequest events from the guest RAM this process maps, as a frontend on
    another host would: bounds-checked, read-only RAM refused for writes."""

    def __init__(
        self,
        target: str,
        options: FrontendOptions,
        on_event: EventHandler,
        rams: Sequence[Placed],
    ) -> None:
        self.rams = tuple(rams)
        self.dma_served = 0
        # A hostile frontend: answer reads with this many bytes too few or too many.
        self.read_skew = 0
        super().__init__(target, options, on_event, on_dma=self._serve_dma)

    def unplug(self, guest_address: int) -> None:
        """Stop serving the RAM at `guest_address` (with a MemoryMapUpdate removing it)."""
        self.rams = tuple(p for p in self.rams if p.guest_address != guest_address)

    def plug(self, placed: Placed) -> None:
        self.rams = (*self.rams, placed)

    def _serve_dma(self, request: pb.DmaRequest) -> None:
        """On the session's loop thread: one transfer against our maps."""
        self.dma_served += 1
        gpa, length = request.address, request.length
        for placed in self.rams:
            offset = gpa - placed.guest_address
            if offset >= 0 and length <= placed.ram.size - offset:
                break
        else:
            self._session.dma_reply(request.request_id, error=f"{gpa:#x} +{length:#x}: no RAM")
            return
        if not request.write:
            data = bytes(placed.ram.map[offset : offset + length])
            if self.read_skew < 0:
                data = data[: length + self.read_skew]
            elif self.read_skew > 0:
                data += bytes(self.read_skew)
            self._session.dma_reply(request.request_id, data=data)
        elif placed.read_only or len(request.data) != length:
            self._session.dma_reply(request.request_id, error="read-only RAM or a bad write")
        else:
            placed.ram.map[offset : offset + length] = request.data
            self._session.dma_reply(request.request_id)


def open_session(
    server: DevserverProcess,
    rams: Sequence[Placed],
    events: EventLog,
    mode: int,
    *,
    msi: bool = False,
) -> FrontendSession:
    """A frontend with guest RAM, mapped by the server (SHARED) or served by us
    (DMA_MESSAGES); without MSI unless asked (interrupts are INTx and the ISR)."""
    shared = mode == pb.MEMORY_MODE_SHARED
    regions = tuple(
        p.ram.region(p.guest_address, read_only=p.read_only, shared=shared) for p in rams
    )
    return FrontendSession(
        server.address,
        FrontendOptions("hostile-guest", msi=msi, memory_mode=mode, regions=regions),
        events,
        rams,
    )


class WireDriver(FakeVirtioDriver):
    """FakeVirtioDriver for the virtio function in `slot`, over the stream.

    Rings and buffers live in `ram` (guest-physical 0); the base class's own
    function and memory only satisfy its constructor and are never used.
    """

    def __init__(
        self, session: SyncSession, slot: int, ram: GuestRam, arena: tuple[int, int]
    ) -> None:
        unused = VirtioPciFunction(EchoDevice(), presentation=Presentation(msix=False))
        super().__init__(unused, BytearrayMemory(0x10))
        self.session = session
        self.slot = slot
        self.ram = ram
        # [start, end) of RAM this driver carves rings and buffers from, so two
        # drivers in one guest never share bytes.
        self._next_free, self.arena_end = arena
        assert 0 < self._next_free < self.arena_end <= ram.size

    # -- accesses

    def read(self, offset: int, size: int) -> int:
        return self.session.bar_read(self.slot, VIRTIO_BAR, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.session.bar_write(self.slot, VIRTIO_BAR, offset, size, value)

    def cfg_read(self, offset: int, size: int) -> int:
        return self.session.config_read(0, self.slot, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.effects.extend(self.session.config_write(0, self.slot, 0, offset, size, value))

    def take(self) -> list[Effect]:
        out, self.effects = self.effects, []
        return out

    def alloc(self, size: int, align: int = 16) -> int:
        at = (self._next_free + align - 1) & ~(align - 1)
        self._next_free = at + size
        assert self._next_free <= self.arena_end, "the test ran out of its RAM arena"
        return at

    # -- guest RAM, bounds-checked here too (a test's own slip must not look like the server's)

    def put(self, gpa: int, data: bytes) -> None:
        assert gpa >= 0 and gpa + len(data) <= self.ram.size
        self.ram.map[gpa : gpa + len(data)] = data

    def get(self, gpa: int, length: int) -> bytes:
        assert gpa >= 0 and gpa + length <= self.ram.size
        return bytes(self.ram.map[gpa : gpa + length])

    # -- what a guest's PCI core does

    def _capability_list(self) -> list[tuple[int, int]]:
        """(id, offset) of each capability, walked as Linux does (at most 48 hops)."""
        found: list[tuple[int, int]] = []
        at = self.cfg_read(PCI_CAPABILITY_LIST, 1) & ~3
        while at and len(found) < 48:
            found.append((self.cfg_read(at, 1), at))
            at = self.cfg_read(at + 1, 1) & ~3
        return found

    def capabilities(self) -> dict[int, int]:
        """Capability id -> offset of the first one with that id."""
        found: dict[int, int] = {}
        for cap_id, at in self._capability_list():
            found.setdefault(cap_id, at)
        return found

    def vendor_capabilities(self) -> dict[int, int]:
        """virtio cfg_type -> offset of the first vendor capability of that type (§4.1.4)."""
        found: dict[int, int] = {}
        for cap_id, at in self._capability_list():
            if cap_id == PCI_CAP_ID_VNDR:
                found.setdefault(self.cfg_read(at + CAP_CFG_TYPE, 1), at)
        return found

    def enable_msix(self) -> None:
        """Program every vector (address MSI_ADDRESS, data MSI_DATA_BASE + v,
        unmasked) through the MSI-X BAR, enable MSI-X, config changes on vector 0."""
        cap = self.capabilities()[PCI_CAP_ID_MSIX]
        vectors = (self.cfg_read(cap + MSIX_CAP_FLAGS, 2) & 0x7FF) + 1
        for v in range(vectors):
            entry = MSIX_TABLE_OFFSET + 16 * v
            self.session.bar_write(self.slot, MSIX_BAR, entry, 4, MSI_ADDRESS)
            self.session.bar_write(self.slot, MSIX_BAR, entry + 4, 4, 0)
            self.session.bar_write(self.slot, MSIX_BAR, entry + 8, 4, MSI_DATA_BASE + v)
            self.session.bar_write(self.slot, MSIX_BAR, entry + 12, 4, 0)
        self.cfg_write(cap + MSIX_CAP_FLAGS, 2, MSIX_ENABLE)
        self.write(CONFIG_MSIX_VECTOR, 2, 0)

    # -- conveniences

    @property
    def broken(self) -> bool:
        return bool(self.status & DeviceStatus.DEVICE_NEEDS_RESET)

    def restart(self, queues: int, features: int | None = None, *, msix: bool = False) -> None:
        """Status 0 (the reset that clears NEEDS_RESET), then Linux's probe again,
        with fresh rings (the old ones may hold what broke the device)."""
        self.set_status(0)
        assert self.status == 0
        self.queues = {}
        self.start(queues, msix=msix, features=features)

    def wait_used(self, q: int, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Used entries until `count` arrived or `timeout` passed (a read orders
        after the posted kick; continuations may finish a little later)."""
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while True:
            self.read(DEVICE_STATUS, 1)
            got += self.used(q)
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.005)
