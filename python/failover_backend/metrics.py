"""A Prometheus endpoint for the backends a process serves (``--metrics HOST:PORT``).

Values are read from the backends when Prometheus scrapes (a custom collector), so
nothing is copied on the datapath and a scrape always sees the current counters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .backend import StandbyBackend
from .errors import ConfigError

logger = logging.getLogger("failover_backend.metrics")

PREFIX = "failover_backend"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6; port 0 picks a free one)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError("metrics", f"expected HOST:PORT like 127.0.0.1:9100, got {value!r}")
    return host, int(port)


@dataclass(frozen=True)
class Served:
    """One backend, and the label its series carry."""

    label: str
    backend: StandbyBackend


class BackendCollector(Collector):
    """Per-queue counters, connection and negotiation of each backend."""

    def __init__(self, served: Iterable[Served]) -> None:
        self.served = list(served)

    def collect(self) -> Iterator[Metric]:
        queue_labels = ["standby", "queue", "direction"]
        frames = CounterMetricFamily(
            f"{PREFIX}_frames",
            "Frames through a virtqueue (tx: from the guest)",
            labels=queue_labels,
        )
        octets = CounterMetricFamily(
            f"{PREFIX}_bytes",
            "Bytes through a virtqueue, without the virtio-net header",
            labels=queue_labels,
        )
        drops = CounterMetricFamily(
            f"{PREFIX}_drops", "Frames lost on the host side", labels=queue_labels
        )
        errors = CounterMetricFamily(
            f"{PREFIX}_errors", "Descriptor chains refused as malformed", labels=queue_labels
        )
        connected = GaugeMetricFamily(
            f"{PREFIX}_connected", "1 while a vhost-user frontend is connected", labels=["standby"]
        )
        connections = CounterMetricFamily(
            f"{PREFIX}_connections", "Frontend connections accepted", labels=["standby"]
        )
        features = GaugeMetricFamily(
            f"{PREFIX}_feature_acked",
            "1 for each virtio feature the frontend acked on the current connection",
            labels=["standby", "feature"],
        )
        dirty = GaugeMetricFamily(
            f"{PREFIX}_dirty_logging",
            "1 while a migration has dirty-page logging on",
            labels=["standby"],
        )
        for served in self.served:
            backend, label = served.backend, served.label
            for q in backend.stats().queues:
                labels = [label, str(q.queue // 2), q.direction]
                frames.add_metric(labels, q.packets)
                octets.add_metric(labels, q.bytes)
                drops.add_metric(labels, q.drops)
                errors.add_metric(labels, q.errors)
            negotiation = backend.features
            connected.add_metric([label], 1.0 if backend.state == "connected" else 0.0)
            connections.add_metric([label], negotiation.connections)
            dirty.add_metric([label], 1.0 if negotiation.dirty_logging else 0.0)
            for name in negotiation.acked_names:
                features.add_metric([label, name], 1.0)
        yield from (frames, octets, drops, errors, connected, connections, features, dirty)


def serve_metrics(listen: str, served: Iterable[Served]) -> str:
    """Start the endpoint in a thread of its own; returns its URL."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry()
    registry.register(BackendCollector(served))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ConfigError("metrics", f"cannot listen on {listen}: {err}") from err
    bound = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/metrics"
    logger.info("metrics on %s", url)
    return url
