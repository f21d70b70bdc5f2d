"""The server's NEEDS_RESET log line: one per device per interval, with the
latches in between counted (needs_reset_log.py)."""

from __future__ import annotations

import logging

import pytest

from devserver.service.needs_reset_log import NeedsResetLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_one_line_per_device_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="devserver.service.needs_reset_log")
    clock = Clock()
    log = NeedsResetLog(interval=10.0, clock=clock)
    assert log.latched(3, "disk", "descriptor loop")
    assert not log.latched(3, "disk", "descriptor loop")
    assert not log.latched(3, "disk", "avail.idx jumped")
    assert log.latched(4, "console", "bad ring")  # another device has its own budget
    assert log.suppressed(3) == 2
    clock.now += 9.9
    assert not log.latched(3, "disk", "again")
    clock.now += 0.2
    assert log.latched(3, "disk", "later")
    assert log.suppressed(3) == 0
    out = lines(caplog)
    assert len(out) == 3
    assert out[0] == "device 3 (disk) needs a reset (DEVICE_NEEDS_RESET): descriptor loop"
    assert "device 4 (console)" in out[1]
    assert out[2].endswith("later (3 more latches since the last line, not logged)")


def test_a_flood_costs_no_memory_per_latch() -> None:
    log = NeedsResetLog(interval=10.0, clock=Clock())
    for _ in range(100_000):
        log.latched(1, "disk", "x")
    assert log.suppressed(1) == 99_999
