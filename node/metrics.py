"""Prometheus metrics of one node, on a registry of its own (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
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


class ReceiverMetrics:
    """What a receiver counts: instances, bytes, associations, refusals, open associations.

    In a receiver process these live in prometheus_client's multiprocess files (its environment
    names the folder), and the node sums them over every receiver, dead ones' counters included
    (:class:`SummedReceivers`); the open-association gauge counts live processes only.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.instances = Counter(
            "pacsnode_instances_received", "C-STORE requests by outcome", ["outcome"], registry=registry
        )
        self.bytes = Counter("pacsnode_bytes_received", "Bytes stored", registry=registry)
        self.associations = Counter(
            "pacsnode_associations", "Associations by result", ["result"], registry=registry
        )
        self.rejects = Counter(
            "pacsnode_association_rejects", "Rejected associations by reason", ["reason"], registry=registry
        )
        self.active_associations = Gauge(
            "pacsnode_active_associations", "Associations now open", registry=registry, multiprocess_mode="livesum"
        )


class SummedReceivers(Collector):
    """The node's own receiving metrics (STOW-RS, an in-process SCP) plus those of its receiver
    processes, summed sample by sample into one family per name."""

    def __init__(self, local: CollectorRegistry, directory: Path) -> None:
        self._local = local
        self._directory = directory

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        sources = [self._local.collect()]
        if any(self._directory.glob("*.db")):
            sources.append(MultiProcessCollector(None, path=str(self._directory)).collect())
        for family in chain(*sources):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged = values.setdefault(family.name, {})
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # per-process creation times: not summable
                key = (sample.name, tuple(sorted(sample.labels.items())))
                merged[key] = merged.get(key, 0.0) + sample.value
        for name, family in families.items():
            for (sample_name, labels), value in sorted(values[name].items()):
                family.add_sample(sample_name, dict(labels), value)
            yield family


class NodeMetrics:
    def __init__(self, receivers_dir: Path | None = None) -> None:
        """``receivers_dir``: the multiprocess folder of the node's receiver processes, whose
        receiving metrics are summed with the node's own; None when the node receives in-process."""
        self.registry = CollectorRegistry()
        if receivers_dir is None:
            self.receiving = ReceiverMetrics(self.registry)
        else:
            local = CollectorRegistry()
            self.receiving = ReceiverMetrics(local)
            self.registry.register(SummedReceivers(local, receivers_dir))
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
