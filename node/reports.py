"""Consumes the workers' report queue and applies each report to the index.

Workers never open the index: they may run on other hosts. A report is acknowledged only after
the index committed it, so a node crash redelivers it (applying a report twice is harmless).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import structlog
from kombu import Connection, Consumer, Message
from pydantic import ValidationError

from config.settings import Settings
from node.broker import connection, report_queue
from node.dispatcher import BROKER_ERRORS
from node.index import StudyIndex
from node.messages import ReportMessage
from node.metrics import NodeMetrics
from node.service_thread import ServiceThread


class ReportConsumer(ServiceThread):
    def __init__(self, settings: Settings, index: StudyIndex, metrics: NodeMetrics) -> None:
        super().__init__("report-consumer")
        self._settings = settings
        self._index = index
        self._metrics = metrics
        self._log = structlog.get_logger("pacsnode.reports")

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with connection(self._settings) as conn:
                    self._consume(conn)
                backoff = 0.5
            except BROKER_ERRORS as exc:
                self._metrics.broker_errors.inc()
                self._log.warning("report queue unreachable", error=type(exc).__name__, retry_in_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _consume(self, conn: Connection) -> None:
        conn.ensure_connection(max_retries=1)
        with Consumer(conn, queues=[report_queue(self._settings)], callbacks=[self._on_message],
                      accept=["json"], prefetch_count=50, on_decode_error=self._on_decode_error):
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    continue

    def _on_decode_error(self, message: Message, exc: Exception) -> None:
        """Not JSON, or not a content type we accept: drop it (kombu's default would raise out of
        ``drain_events`` and end this thread, leaving every later report unapplied)."""
        self._log.error("undecodable report dropped", content_type=message.content_type, error=type(exc).__name__)
        message.reject()

    def _on_message(self, body: Any, message: Message) -> None:
        try:
            report = ReportMessage.model_validate(body)
        except ValidationError as exc:
            self._log.error("malformed report dropped", errors=exc.error_count())
            message.reject()
            return
        try:
            known = self._index.apply_report(report, time.time())
        except sqlite3.Error as exc:
            self._log.error("report not applied; left on the queue", job_id=report.job_id, error=type(exc).__name__)
            message.requeue()
            self._stop.wait(1.0)
            return
        if known:
            self._metrics.reports.labels(state=report.state.value).inc()
            self._log.info("report", job_id=report.job_id, state=report.state.value, reason=report.reason or None)
        else:
            self._log.warning("report for unknown job", job_id=report.job_id)
        message.ack()
