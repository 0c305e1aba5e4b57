"""One running node: SCP with its group commit, assembler, dispatcher, report consumer,
export outbox, retention, HTTP health/metrics and (on embedded defaults) a worker process."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path
from types import FrameType

import structlog

from config.settings import Settings
from node.assembler import Assembler
from node.dispatcher import Dispatcher
from node.embedded_worker import EmbeddedWorker
from node.exports import Exporter
from node.http import start_http
from node.index import StudyIndex
from node.ingest import IngestWriter
from node.metrics import NodeMetrics
from node.notifier import Notifier
from node.receivers import ReceiverPool
from node.reports import ReportConsumer
from node.retention import apply_purge, plan_purge
from node.scp import NodeServer, StorageSCP, start_scp
from node.store import StudyStore


class Node:
    def __init__(self, settings: Settings, config_file: Path | None = None, with_worker: bool | None = None) -> None:
        self.settings = settings
        self.store = StudyStore(settings.node.store_path)
        self.index = StudyIndex(settings.node.index_path, destinations=settings.destinations,
                                notify=[n.name for n in settings.notifications], urgent=settings.triage.urgent)
        count = settings.node.receiver_processes
        # Several receivers: DIMSE in child processes; this process keeps STOW-RS and everything else.
        self.receivers = ReceiverPool(settings, count) if count > 1 else None
        self.metrics = NodeMetrics(self.receivers.metrics_dir if self.receivers is not None else None)
        self.metrics.watch_index(self.index.counts_by_state)
        self.metrics.watch_exports(self.index.export_counts)
        self.writer = IngestWriter(self.index)
        self.scp = StorageSCP(settings.node, self.store, self.index, self.writer, self.metrics.receiving)
        self.server: NodeServer | None = None
        self.assembler = Assembler(settings, self.index)
        self.dispatcher = Dispatcher(settings, self.index, self.metrics)
        self.reports = ReportConsumer(settings, self.index, self.metrics)
        self.exporter = Exporter(settings, self.index, self.store, self.metrics)
        self.notifier = Notifier(settings, self.index, self.store, self.metrics)
        run_worker = settings.workers.embedded if with_worker is None else with_worker
        self.worker = EmbeddedWorker(settings, config_file) if run_worker else None
        self._stop = threading.Event()
        self._retention = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
        self._log = structlog.get_logger("pacsnode.node")
        self.dicom_port = settings.node.port
        self.http_port: int | None = None

    def start(self) -> None:
        if self.receivers is not None:
            self.receivers.start()
            self.dicom_port = self.receivers.port
        else:
            self.server = start_scp(self.settings.node, self.scp)
            self.dicom_port = int(self.server.server_address[1])
        if self.settings.http.enabled:
            self.http = start_http(self.settings, self.metrics, self.health, self.index, self.scp, self.store)
            self.http_port = int(self.http.server_address[1])
        self.assembler.start()
        self.dispatcher.start()
        self.reports.start()
        self.exporter.start()
        self.notifier.start()
        self._retention.start()
        if self.worker is not None:
            self.worker.start()
        self._log.info("node started", ae_title=self.settings.node.ae_title, port=self.dicom_port,
                       receivers=self.receivers.count if self.receivers is not None else 1,
                       store=str(self.store.root), tls=self.settings.node.tls.enabled,
                       broker="embedded" if self.settings.broker.url is None else "external")

    def health(self) -> dict[str, object]:
        """``/health``: not ok (503) when the disk is below its watermark or the embedded worker keeps failing."""
        free_ok = self.scp.free_space.enough()
        state: dict[str, object] = {"ok": free_ok, "disk_free_ok": free_ok, "studies": self.index.counts_by_state()}
        if self.receivers is not None:
            running = self.receivers.alive()
            state["receivers"] = {"running": running, "of": self.receivers.count}
            state["ok"] = free_ok and running > 0
        if self.worker is not None:
            worker = self.worker.health()
            state["ok"] = bool(state["ok"]) and not worker.failing
            state["embedded_worker"] = {"state": worker.state, "summary": worker.summary(), "failures": worker.failures}
        return state

    def _retention_loop(self) -> None:
        while not self._stop.wait(self.settings.retention.interval_s):
            try:
                items = plan_purge(self.index, self.store, self.settings.retention, time.time())
                if items:
                    purged, freed = apply_purge(self.index, self.store, items)
                    self._log.info("retention purge", studies=purged, bytes=freed)
            except (OSError, sqlite3.Error) as exc:  # retried at the next interval
                self._log.error("retention purge failed", error=type(exc).__name__, detail=str(exc))

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
        if self.receivers is not None:
            self.receivers.stop()
        if self.worker is not None:
            self.worker.stop()
        self.assembler.stop()
        self.dispatcher.stop()
        self.reports.stop()
        self.exporter.stop()
        self.notifier.stop()
        if self.settings.http.enabled:
            self.http.shutdown()
        self._log.info("node stopped")

    def run_forever(self) -> None:
        """Serve until SIGINT or SIGTERM."""
        def _on_signal(signum: int, frame: FrameType | None) -> None:
            self._stop.set()

        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        self.start()
        self._stop.wait()
        self.stop()
