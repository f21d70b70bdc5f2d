"""Prometheus metrics: the Stats RPC's counters, scraped over HTTP.

    python -m devserver --metrics 127.0.0.1:9464 ...
    curl -s 127.0.0.1:9464/metrics | grep devmodel_

The collector reads the live counters at scrape time (plain int reads, safe
from the exporter's thread); nothing is copied on the access path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .stats import DeviceCounters, ServerCounters

_SERVER_HELP = {
    "sessions_total": "frontends attached since start",
    "frontend_messages": "stream messages received from frontends",
    "requests": "requests (accesses) received",
    "server_messages": "stream messages sent to frontends",
    "events": "events sent (BAR decode changes, interrupts, DMA requests)",
    "rejected_requests": "requests that ended a stream with an error status",
    "memory_map_updates": "guest memory map updates applied",
}


class CountersCollector(Collector):
    def __init__(
        self,
        counters: ServerCounters,
        attached: Callable[[], bool],
        device_names: Callable[[], dict[int, str]],
    ) -> None:
        self._counters = counters
        self._attached = attached
        self._device_names = device_names

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        for name, help_text in _SERVER_HELP.items():
            # prometheus_client appends _total to counter names itself.
            metric = name.removesuffix("_total")
            yield CounterMetricFamily(f"devmodel_{metric}", help_text, value=getattr(c, name))
        yield GaugeMetricFamily(
            "devmodel_frontend_attached",
            "1 while a frontend is attached",
            value=int(self._attached()),
        )
        names = self._device_names()
        for field in dataclasses.fields(DeviceCounters):
            family = CounterMetricFamily(
                f"devmodel_device_{field.name}",
                f"per device: {field.name.replace('_', ' ')}",
                labels=["device_id", "name"],
            )
            for device_id, counters in sorted(c.devices.items()):
                family.add_metric(
                    [str(device_id), names.get(device_id, "")], getattr(counters, field.name)
                )
            yield family


def serve_metrics(host: str, port: int, collector: CountersCollector) -> tuple[WSGIServer, int]:
    """Start the exporter on its own thread; return it and the port it bound."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
