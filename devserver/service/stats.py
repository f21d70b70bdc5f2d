"""Counters the Stats RPC reports."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(slots=True)
class DeviceCounters:
    config_reads: int = 0
    config_writes: int = 0
    bar_reads: int = 0
    bar_writes: int = 0
    bar_decode_changes: int = 0
    msis: int = 0
    intx_changes: int = 0
    resets: int = 0
    dma_requests: int = 0
    dma_errors: int = 0
    console_bytes_dropped: int = 0  # virtio-console: guest bytes its host ends refused


@dataclass(slots=True)
class ServerCounters:
    sessions_total: int = 0
    frontend_messages: int = 0
    requests: int = 0
    server_messages: int = 0
    events: int = 0
    rejected_requests: int = 0
    memory_map_updates: int = 0
    devices: defaultdict[int, DeviceCounters] = field(
        default_factory=lambda: defaultdict(DeviceCounters)
    )
