"""The Celery app of the workers: stateless compute on the broker the node publishes to.

GPU discipline (Celery's advice for long GPU tasks): late acknowledgement with reject on worker
loss (prefork pool, one child process per GPU), prefetch 1 (all in ``node.broker.make_celery``),
nothing CUDA-related before the pool forks, and the models loaded in ``worker_process_init``, in
the child, where they stay warm. A job that keeps killing its worker is counted in the study store
(``workers.attempts``) and ends failed after ``workers.max_attempts`` starts.
"""

from __future__ import annotations

import socket
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from pydantic import ValidationError

from config.settings import Settings
from node.broker import connection, make_celery
from node.messages import PROCESS_STUDY_TASK, DispatchMessage, JobState, ReportMessage
from workers.attempts import AttemptLog
from workers.reporting import publish_report
from workers.study import StudyProcessor


def create_app(settings: Settings, pipelines: list[str] | None = None) -> Celery:
    """A Celery app whose one task processes a dispatched study version; ``pipelines`` are warmed up
    in each pool process as it starts."""
    app = make_celery(settings, name="pacsnode-worker")
    processor = StudyProcessor(settings)
    worker_name = socket.gethostname()

    def _warm_up(**_: Any) -> None:
        processor.warm_up(pipelines or [])

    worker_process_init.connect(_warm_up, weak=False)

    @app.task(name=PROCESS_STUDY_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def process_study(task: Any, message: dict[str, Any]) -> str:
        try:
            job = DispatchMessage.model_validate(message)
        except ValidationError as exc:
            # Another version's message: fail the job where the node can see it, instead of
            # leaving its study queued forever.
            job_id = message.get("job_id") if isinstance(message, dict) else None
            if not isinstance(job_id, str) or not job_id:
                raise
            with connection(settings) as conn:
                publish_report(conn, settings, ReportMessage(
                    job_id=job_id, state=JobState.FAILED, worker=worker_name,
                    reason=f"dispatch message not readable by this worker ({exc.error_count()} errors)"))
            return JobState.FAILED.value
        attempts = AttemptLog(processor.store_root, job.job_id)
        attempt = attempts.start(worker_name)
        with connection(settings) as conn:
            if attempt > settings.workers.max_attempts:
                publish_report(conn, settings, ReportMessage(
                    job_id=job.job_id, state=JobState.FAILED, attempt=attempt, worker=worker_name,
                    reason=f"stopped after {attempt - 1} attempts: the study ended its worker each time"))
                attempts.finish()
                return JobState.FAILED.value
            publish_report(conn, settings, ReportMessage(job_id=job.job_id, state=JobState.PROCESSING,
                                                         attempt=attempt, worker=worker_name))
            try:
                outcome = processor.process(job)
            except Exception as exc:
                # Reported before Celery records the failure: the job must not stay "processing".
                publish_report(conn, settings, ReportMessage(
                    job_id=job.job_id, state=JobState.FAILED, attempt=attempt, worker=worker_name,
                    reason=f"worker error: {type(exc).__name__}: {exc}"[:500]))
                attempts.finish()
                raise
            publish_report(conn, settings, outcome.model_copy(update={"attempt": attempt, "worker": worker_name}))
        attempts.finish()
        return outcome.state.value

    return app
