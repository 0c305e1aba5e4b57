"""Prometheus metrics of one node, on a registry of its own (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _ByState(Collector):
    """Reads counts by state from the index at scrape time (no counter to keep in sync)."""

    def __init__(self, name: str, documentation: str, counts: Callable[[], dict[str, int]]) -> None:
        self._name = name
        self._documentation = documentation
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=["state"])
        for state, count in sorted(self._counts().items()):
            family.add_metric([state], count)
        yield family


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances = Counter(
            "pacsnode_instances_received", "C-STORE requests by outcome", ["outcome"], registry=self.registry
        )
        self.bytes = Counter("pacsnode_bytes_received", "Bytes stored", registry=self.registry)
        self.associations = Counter(
            "pacsnode_associations", "Associations by result", ["result"], registry=self.registry
        )
        self.rejects = Counter(
            "pacsnode_association_rejects", "Rejected associations by reason", ["reason"], registry=self.registry
        )
        self.active_associations = Gauge(
            "pacsnode_active_associations", "Associations now open", registry=self.registry
        )
        self.dispatches = Counter(
            "pacsnode_dispatches_published", "Jobs published to the broker", ["pipeline"], registry=self.registry
        )
        self.broker_errors = Counter(
            "pacsnode_broker_errors", "Failed publish or consume attempts", registry=self.registry
        )
        self.reports = Counter(
            "pacsnode_reports", "Worker reports applied by state", ["state"], registry=self.registry
        )
        self.exports = Counter(
            "pacsnode_export_attempts", "Result C-STOREs to destinations by outcome (sent, retry, failed)",
            ["destination", "outcome"], registry=self.registry,
        )
        self.notifications = Counter(
            "pacsnode_notification_attempts", "HL7 ORU messages to RIS targets by outcome (sent, retry, failed)",
            ["target", "outcome"], registry=self.registry,
        )

    def watch_index(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_ByState("pacsnode_studies", "Studies in the index by state", counts))

    def watch_exports(self, counts: Callable[[], dict[str, int]]) -> None:
        """``pacsnode_exports{state="pending"}`` is the export backlog."""
        self.registry.register(_ByState("pacsnode_exports", "Result exports in the index by state", counts))
