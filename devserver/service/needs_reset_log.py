"""The server's log line for a device that latched DEVICE_NEEDS_RESET, rate-limited.

A latch is the guest's doing (a broken ring, memory that went away) and the
person running the server needs to hear of it: the frontend gets the
DeviceNeedsReset event, but Linux's drivers do not act on the status bit, so a
device that stopped working is otherwise silent here. A hostile guest can latch
and reset at will, so each device gets at most one line per `interval`
seconds; the latches in between are counted and the count goes out with the
next line (reliability.md §1, "Rate-limit the log line").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

# Seconds between two lines about one device.
NEEDS_RESET_LOG_INTERVAL: Final = 10.0


class NeedsResetLog:
    """One server's record of which device last logged a latch, and when."""

    def __init__(
        self,
        interval: float = NEEDS_RESET_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._clock = clock
        # Keyed by device id: bounded by the devices the server was started with.
        self._last: dict[int, float] = {}
        self._suppressed: dict[int, int] = {}

    def latched(self, device_id: int, name: str, reason: str) -> bool:
        """A device latched NEEDS_RESET: log it, or count it if its last line is
        too recent. True if a line went out."""
        now = self._clock()
        last = self._last.get(device_id)
        if last is not None and now - last < self.interval:
            self._suppressed[device_id] = self._suppressed.get(device_id, 0) + 1
            return False
        self._last[device_id] = now
        suppressed = self._suppressed.pop(device_id, 0)
        more = f" ({suppressed} more latches since the last line, not logged)" if suppressed else ""
        log.warning(
            "device %d (%s) needs a reset (DEVICE_NEEDS_RESET): %s%s",
            device_id,
            name,
            reason,
            more,
        )
        return True

    def suppressed(self, device_id: int) -> int:
        """Latches of `device_id` counted but not logged yet."""
        return self._suppressed.get(device_id, 0)
