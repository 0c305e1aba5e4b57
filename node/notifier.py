"""The notification outbox: an HL7 ORU^R01 per finished study to every ``notifications`` target.

``StudyIndex`` queues one row per target in the transaction that finishes a study (DONE), with
its urgency (``triage.urgent``). This loop takes due rows, urgent first, builds each message from
the index (findings, SR references) and the study's first instance (patient identity, accession
number: the index keeps no PHI), sends it over MLLP and records the outcome. A NAK, a refused
connection or a missing ACK is retried on the schedule of ``exports`` (back-off, ``max_attempts``),
and visible on the worklist meanwhile. The schedule lives in the index, so it survives restarts;
a crash between the ACK and its record sends the message again, with the same control ID.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime

import structlog

from config.settings import Hl7Notification, Settings
from node.exports import backoff_s
from node.hl7 import DeliveryFailed, build_oru, send_mllp
from node.index import NotificationRow, StudyIndex
from node.metrics import NodeMetrics
from node.service_thread import ServiceThread
from node.store import StudyStore
from node.study_facts import read_study_facts


class Notifier(ServiceThread):
    def __init__(self, settings: Settings, index: StudyIndex, store: StudyStore, metrics: NodeMetrics) -> None:
        super().__init__("notifier")
        self._policy = settings.exports
        self._targets = {target.name: target for target in settings.notifications}
        self._index = index
        self._store = store
        self._metrics = metrics
        self._log = structlog.get_logger("pacsnode.notifications")

    def _run(self) -> None:
        while not self._stop.wait(self._policy.poll_s):
            try:
                self.notify_due()
            except (sqlite3.Error, OSError) as exc:  # the rows stay pending; tried again at the next poll
                self._log.error("notification round failed", error=type(exc).__name__, detail=str(exc))

    def notify_due(self) -> int:
        """Send every due notification, urgent studies first; returns how many were acknowledged."""
        sent = 0
        for row in self._index.due_notifications(time.time()):
            if self._stop.is_set():
                break
            sent += self._notify(row)
        return sent

    def _notify(self, row: NotificationRow) -> int:
        target = self._targets.get(row.target)
        now = time.time()
        if target is None:
            self._index.record_notification(row, "target no longer configured", False, None, now)
            return 0
        try:
            message = build_oru(read_study_facts(self._index, self._store, row.study_uid, row.version),
                                self._index.version_outcomes(row.study_uid, row.version), row.urgent, target,
                                datetime.now())
            code = send_mllp(message, target)
        except DeliveryFailed as failure:
            return self._failed(row, target, str(failure))
        self._index.record_notification(row, f"ACK {code}", True, None, time.time())
        self._metrics.notifications.labels(target=target.name, outcome="sent").inc()
        self._log.info("result notified", target=target.name, study_uid=row.study_uid, version=row.version,
                       urgent=row.urgent)
        return 1

    def _failed(self, row: NotificationRow, target: Hl7Notification, reason: str) -> int:
        now = time.time()
        if row.attempts + 1 >= self._policy.max_attempts:
            self._index.record_notification(row, f"{reason} (gave up after {row.attempts + 1} attempts)", False,
                                            None, now)
            self._metrics.notifications.labels(target=target.name, outcome="failed").inc()
            self._log.error("notification failed for good", target=target.name, study_uid=row.study_uid,
                            status=reason)
        else:
            retry = now + backoff_s(self._policy, row.attempts)
            self._index.record_notification(row, reason, False, retry, now)
            self._metrics.notifications.labels(target=target.name, outcome="retry").inc()
            self._log.warning("notification attempt failed; retrying", target=target.name, study_uid=row.study_uid,
                              status=reason, retry_in_s=round(retry - now, 1))
        return 0
