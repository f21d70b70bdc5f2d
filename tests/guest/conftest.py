"""Fixtures for tests that boot real guests with served devices."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.qemu.hostutil import NeedsRootError
from vmm_client.qemu.provision import provision


@pytest.fixture(scope="session")
def qemu_ready() -> None:
    """QEMU is installed (cached), or the test skips saying why."""
    try:
        provision()
    except NeedsRootError as e:
        pytest.skip(f"no cached QEMU tree, and installing one needs root: {e}")


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DevServer]:
    """A device server with two PCI test devices (slots 1 and 5)."""
    srv = DevServer(
        [parse_device_spec("pci-testdev"), parse_device_spec("pci-testdev,slot=5,name=second")],
        Listen(unix_path=tmp_path / "run" / "dev.sock"),
    )
    await srv.start()
    yield srv
    await srv.stop(0)
