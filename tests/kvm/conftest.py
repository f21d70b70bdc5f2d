"""KVM tests: skip (with the reason) where /dev/kvm cannot be used; build the guest once."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from devserver.config import parse_device_spec
from devserver.service.server import DevServer, Listen
from vmm_client.kvm.guest.build import BuildError, build_pcitest
from vmm_client.kvm.vm import KvmUnavailable, open_kvm

DEVICES = ("pci-testdev", "pci-testdev,slot=5,name=second")


def kvm_problem() -> str | None:
    """Why KVM tests cannot run here, or None."""
    try:
        fd = open_kvm()
    except KvmUnavailable as e:
        return str(e)
    os.close(fd)
    return None


@pytest.fixture(autouse=True)
def _needs_kvm(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kvm") is None:
        return
    problem = kvm_problem()
    if problem is not None:
        pytest.skip(f"no usable KVM: {problem}")


@pytest.fixture(scope="session")
def pcitest_elf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    try:
        return build_pcitest(tmp_path_factory.mktemp("pcitest")).read_bytes()
    except BuildError as e:
        pytest.skip(str(e))


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[DevServer]:
    srv = DevServer(
        [parse_device_spec(d) for d in DEVICES], Listen(unix_path=tmp_path / "run" / "dev.sock")
    )
    await srv.start()
    yield srv
    await srv.stop(0)
