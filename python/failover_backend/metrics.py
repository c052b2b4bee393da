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
from .controller import FailoverController
from .errors import ConfigError
from .vm_life import MigrationRecord

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
        steering_counts = {
            name: CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=["standby"])
            for name, help_text in (
                ("announcements", "Announcements (RARP) of the guest's MAC sent on the host port"),
                ("steering_probes", "Probes steering sent (into the guest or through the switch)"),
                ("steering_answers", "Answers to steering's probes"),
                ("steering_held_back", "Frames of the standby's own chatter kept from the switch"),
                ("steering_looped", "Frames of the guest's own that came back from the switch"),
            )
        }
        steering_mode = GaugeMetricFamily(
            f"{PREFIX}_steering_mode",
            "1 for the mode steering is in (off, standby, releasing, plugged, primary)",
            labels=["standby", "mode"],
        )
        switch_path = GaugeMetricFamily(
            f"{PREFIX}_switch_path",
            "1 for where the host's switch is steered for the guest's MAC",
            labels=["standby", "path"],
        )
        for served in self.served:
            backend, label = served.backend, served.label
            steering = backend.steering()
            if steering is not None:
                steering_counts["announcements"].add_metric([label], steering.announcements)
                steering_counts["steering_probes"].add_metric([label], steering.probes)
                steering_counts["steering_answers"].add_metric([label], steering.answers)
                steering_counts["steering_held_back"].add_metric([label], steering.held_back)
                steering_counts["steering_looped"].add_metric([label], steering.looped)
                steering_mode.add_metric([label, steering.mode], 1.0)
                switch_path.add_metric([label, steering.path], 1.0)
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
        yield from (*steering_counts.values(), steering_mode, switch_path)


class VmCollector(Collector):
    """What ``run`` knows of the VM: each pair's failover state, and the outgoing
    migrations it followed. ``controllers`` is filled in once QMP is connected."""

    def __init__(self, record: MigrationRecord) -> None:
        self.record = record
        self.controllers: list[FailoverController] = []

    def collect(self) -> Iterator[Metric]:
        negotiated = GaugeMetricFamily(
            f"{PREFIX}_standby_negotiated",
            "1 once the guest negotiated STANDBY on the standby",
            labels=["standby"],
        )
        primary = GaugeMetricFamily(
            f"{PREFIX}_primary_present",
            "1 while the standby's primary is in the VM (plugged, not hidden)",
            labels=["standby"],
        )
        for controller in self.controllers:
            negotiated.add_metric([controller.standby_id], float(controller.negotiated))
            primary.add_metric([controller.standby_id], float(controller.primary_present))
        record = self.record
        ended = CounterMetricFamily(
            f"{PREFIX}_migrations",
            "Outgoing migrations, by how they ended",
            labels=["result"],
        )
        for result in ("completed", "cancelled", "failed"):
            ended.add_metric([result], record.ended.get(result, 0))
        cancels = CounterMetricFamily(
            f"{PREFIX}_wait_unplug_cancels",
            "Migrations cancelled because the guest held its primary past the deadline",
        )
        cancels.add_metric([], record.deadline_cancels)
        yield from (negotiated, primary, ended, cancels)
        last = {
            "wait_unplug_seconds": record.wait_unplug_s,
            "total_seconds": None if record.total_time_ms is None else record.total_time_ms / 1e3,
            "downtime_seconds": None if record.downtime_ms is None else record.downtime_ms / 1e3,
        }
        for name, value in last.items():
            if value is not None:
                yield GaugeMetricFamily(
                    f"{PREFIX}_last_migration_{name}",
                    f"The last outgoing migration's {name.replace('_', ' ')}",
                    value=value,
                )


def serve_metrics(listen: str, served: Iterable[Served], more: Iterable[Collector] = ()) -> str:
    """Start the endpoint in a thread of its own; returns its URL. ``more``: further
    collectors (``run``'s :class:`VmCollector`)."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry()
    registry.register(BackendCollector(served))
    for collector in more:
        registry.register(collector)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ConfigError("metrics", f"cannot listen on {listen}: {err}") from err
    bound = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/metrics"
    logger.info("metrics on %s", url)
    return url
