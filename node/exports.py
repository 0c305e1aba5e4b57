"""The export outbox: sends result files to the configured destinations until each one took them
(C-STORE to a DIMSE peer, STOW-RS to a ``dicomweb`` one: ``node.stow``).

``StudyIndex.apply_report`` commits one pending row per (result file, destination) together
with the DONE report. This loop takes the due rows, sends each destination's files over one
association per round (``node.send.send_files``) and records every outcome in the index:

* success, or a storage warning (0xB000, 0xB006, 0xB007): sent;
* a failure status (e.g. 0xA700), a refused connection or a rejected association: retried at
  ``now + min(base_backoff_s * 2**attempts, max_backoff_s)``, until ``max_attempts`` attempts
  make it failed for good;
* a file that can never be sent (purged, not DICOM, or a destination no longer configured):
  failed at once.

The schedule lives in the index, not in timers or Celery countdowns, so it survives restarts.
Destinations are served one after another; one that hangs delays the others by at most the
send timeouts of ``node.send``.
A crash between a C-STORE and its record sends that file again; receivers treat a second
C-STORE of the same SOP Instance UID as a duplicate.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from pathlib import Path

import structlog

from config.settings import AnyDestination, DicomWebDestination, ExportSettings, Settings
from node.index import DueExport, ExportFailure, ExportKey, StudyIndex
from node.metrics import NodeMetrics
from node.send import SendReport, client_tls_args, scan, send_files
from node.service_thread import ServiceThread
from node.store import StudyStore
from node.stow import stow_files

SUCCESS_STATUS = "0x0000 Success"
MAX_EXPONENT = 64  # 2**64 * any sane base is far above any sane max_backoff_s; keeps floats finite


def backoff_s(policy: ExportSettings, attempts: int) -> float:
    """The wait after a failed attempt, given the attempts made before it (deterministic, no jitter)."""
    return float(min(policy.base_backoff_s * 2.0 ** min(attempts, MAX_EXPONENT), policy.max_backoff_s))


class Exporter(ServiceThread):
    def __init__(self, settings: Settings, index: StudyIndex, store: StudyStore, metrics: NodeMetrics) -> None:
        super().__init__("exporter")
        self._policy = settings.exports
        self._calling_ae = settings.node.ae_title
        self._destinations = {dest.name: dest for dest in settings.destinations}
        self._index = index
        self._store = store
        self._metrics = metrics
        self._log = structlog.get_logger("pacsnode.exports")

    def _run(self) -> None:
        while not self._stop.wait(self._policy.poll_s):
            try:
                self.export_due()
            except (sqlite3.Error, OSError) as exc:  # the rows stay pending; tried again at the next poll
                self._log.error("export round failed", error=type(exc).__name__, detail=str(exc))

    def export_due(self) -> int:
        """Send every due export, one association per destination; returns how many were sent."""
        by_destination: dict[str, list[DueExport]] = defaultdict(list)
        for row in self._index.due_exports(time.time()):
            by_destination[row.key.destination].append(row)
        sent = 0
        for name, rows in by_destination.items():
            dest = self._destinations.get(name)
            if dest is None:
                self._fail_for_good(name, rows, "destination no longer configured")
            else:
                sent += self._send(dest, rows)
        return sent

    def _send(self, dest: AnyDestination, rows: list[DueExport]) -> int:
        by_path: dict[str, list[DueExport]] = defaultdict(list)
        unsendable: dict[str, list[DueExport]] = defaultdict(list)
        for row in rows:
            try:
                path = self._store.resolve(row.path)
            except ValueError:
                unsendable["result path outside the study store"].append(row)
                continue
            if path.is_file():
                by_path[str(path)].append(row)
            else:
                unsendable["result file missing (purged?)"].append(row)
        scanned = SendReport()
        outgoing = scan([Path(p) for p in by_path], scanned)
        for skipped in scanned.skipped:
            unsendable["result file is not DICOM"].extend(by_path.pop(skipped))
        for reason, lost in unsendable.items():
            self._fail_for_good(dest.name, lost, reason)
        if not outgoing:
            return 0
        if isinstance(dest, DicomWebDestination):
            return self._record(dest, by_path, stow_files([item.path for item in outgoing], dest))
        try:
            tls_args = client_tls_args(dest.tls, dest.host)
        except OSError as exc:  # certificate or key unreadable: retried (and visible) like a refusal
            report = SendReport(failed={path: f"TLS setup failed: {exc}" for path in by_path})
        else:
            report = send_files(outgoing, dest.host, dest.port, dest.ae_title, calling_ae=self._calling_ae,
                                tls_args=tls_args)
        return self._record(dest, by_path, report)

    def _record(self, dest: AnyDestination, by_path: dict[str, list[DueExport]], report: SendReport) -> int:
        """Write one round's outcomes for one destination to the index, and count them."""
        now = time.time()
        sent: dict[ExportKey, str] = {}
        failures: list[ExportFailure] = []
        for path, rows in by_path.items():
            for row in rows:
                if path in report.failed:
                    failures.append(self._failure(row, report.failed[path], now))
                else:
                    sent[row.key] = report.warnings.get(path, SUCCESS_STATUS)
        self._index.record_export_outcomes(sent, failures, now)
        retried = [f for f in failures if f.retry_at is not None]
        given_up = [f for f in failures if f.retry_at is None]
        self._count(dest.name, sent=len(sent), retry=len(retried), failed=len(given_up))
        if sent:
            self._log.info("results exported", destination=dest.name, files=len(sent))
        if retried:
            self._log.warning("export attempt failed; retrying", destination=dest.name, files=len(retried),
                              status=retried[0].status, retry_in_s=round((retried[0].retry_at or now) - now, 1))
        for failure in given_up:
            self._log.error("export failed for good", destination=dest.name, job_id=failure.key.job_id,
                            sop_uid=failure.key.sop_uid, status=failure.status)
        return len(sent)

    def _failure(self, row: DueExport, status: str, now: float) -> ExportFailure:
        if row.attempts + 1 >= self._policy.max_attempts:
            return ExportFailure(row.key, f"{status} (gave up after {row.attempts + 1} attempts)", None)
        return ExportFailure(row.key, status, now + backoff_s(self._policy, row.attempts))

    def _fail_for_good(self, destination: str, rows: list[DueExport], reason: str) -> None:
        """Exports that no retry can help: failed at once, and listed."""
        self._index.record_export_outcomes({}, [ExportFailure(row.key, reason, None) for row in rows], time.time())
        self._count(destination, sent=0, retry=0, failed=len(rows))
        for row in rows:
            self._log.error("export failed for good", destination=destination, job_id=row.key.job_id,
                            sop_uid=row.key.sop_uid, status=reason)

    def _count(self, destination: str, sent: int, retry: int, failed: int) -> None:
        for outcome, n in (("sent", sent), ("retry", retry), ("failed", failed)):
            if n:
                self._metrics.exports.labels(destination=destination, outcome=outcome).inc(n)
