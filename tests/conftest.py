"""Shared fixtures and Hypothesis profiles.

`ci` (when the CI environment variable is set) is deterministic and has no
deadline, so a loaded runner neither flakes nor finds new examples each run;
`dev` explores fresh examples locally.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from hypothesis import settings

from devserver.devices.testdev import PciTestDevice
from devserver.pci.bus import PciBus
from tests.strategies import SLOT_A, SLOT_B, make_bus, testdev

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
# A generous deadline: it catches pathological slowness, not a busy laptop.
settings.register_profile("dev", deadline=timedelta(seconds=1))
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def bus() -> PciBus:
    """Bus 0 with two PCI test devices, at slots 1 and 2, all BARs unprogrammed."""
    return make_bus(2)


@pytest.fixture
def dev(bus: PciBus) -> PciTestDevice:
    return testdev(bus, SLOT_A)


@pytest.fixture
def dev_b(bus: PciBus) -> PciTestDevice:
    return testdev(bus, SLOT_B)
