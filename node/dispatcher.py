"""The dispatch outbox publisher.

Jobs are committed to the index (``jobs`` table, state pending) before anything is sent. This
loop publishes pending jobs, urgent first, with the job id as Celery task id, and marks them
queued only after the broker took them. While the broker is unreachable it backs off and
retries; after a restart it simply finds the pending jobs again. A crash between publish and
mark re-publishes the same job id, which the idempotent workers absorb.
"""

from __future__ import annotations

import time

import structlog
from celery import Celery
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from redis.exceptions import RedisError

from config.settings import Settings
from node.broker import REDIS_PRIORITY, make_celery, pipeline_queue
from node.index import PRIORITY_NAME, JobRow, StudyIndex
from node.messages import PROCESS_STUDY_TASK, DispatchMessage, JobState, ReportMessage
from node.metrics import NodeMetrics
from node.service_thread import ServiceThread

BROKER_ERRORS = (OperationalError, RedisError, ConnectionError, OSError, TimeoutError)


class Dispatcher(ServiceThread):
    def __init__(self, settings: Settings, index: StudyIndex, metrics: NodeMetrics, poll_s: float = 0.25,
                 max_backoff_s: float = 10.0) -> None:
        super().__init__("dispatcher")
        self._index = index
        self._metrics = metrics
        self._poll_s = poll_s
        self._max_backoff_s = max_backoff_s
        self._app: Celery = make_celery(settings, name="pacsnode-dispatcher")
        self._log = structlog.get_logger("pacsnode.dispatcher")

    def _run(self) -> None:
        backoff = self._poll_s
        while not self._stop.wait(backoff):
            try:
                self.publish_pending()
                backoff = self._poll_s
            except BROKER_ERRORS as exc:
                self._metrics.broker_errors.inc()
                backoff = min(max(backoff * 2, 0.5), self._max_backoff_s)
                self._log.warning("broker unreachable; dispatches stay pending", error=type(exc).__name__,
                                  retry_in_s=backoff)

    def publish_pending(self) -> int:
        """Publish every pending job (urgent first); raises a broker error if the broker is down."""
        published = 0
        for job in self._index.pending_jobs():
            try:
                message = DispatchMessage.model_validate_json(job.payload)
            except ValidationError as exc:
                # Written by another version of the node: it can never be published as is, and
                # left pending it would block every job behind it. It fails, visibly, alone.
                reason = f"dispatch payload unreadable by this node version ({exc.error_count()} errors)"
                self._index.apply_report(ReportMessage(job_id=job.job_id, state=JobState.FAILED, reason=reason),
                                         time.time())
                self._log.error("dispatch failed", job_id=job.job_id, reason=reason)
                continue
            self._publish(job, message)
            self._index.mark_published(job.job_id, time.time())
            self._metrics.dispatches.labels(pipeline=job.pipeline).inc()
            self._log.info("dispatched", job_id=job.job_id, pipeline=job.pipeline,
                           priority=PRIORITY_NAME.get(job.priority, str(job.priority)))
            published += 1
        return published

    def _publish(self, job: JobRow, message: DispatchMessage) -> None:
        self._app.send_task(
            PROCESS_STUDY_TASK,
            kwargs={"message": message.model_dump(mode="json")},
            task_id=job.job_id,
            queue=pipeline_queue(job.pipeline),
            priority=REDIS_PRIORITY[message.priority],
            retry=False,
        )
