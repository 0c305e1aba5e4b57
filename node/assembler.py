"""Study assembly: decides when a receiving study is complete and commits its dispatches.

Complete means one of: the quiet period passed with no new image; every rule that matches the
study declares an expectation and all are met; or COMPLETED MPPS steps list images that have
all arrived, and no image arrived that they do not list. Completion routes the study and
commits its jobs to the outbox in the same transaction (``StudyIndex.complete_study``);
publishing is the dispatcher's business.
"""

from __future__ import annotations

import sqlite3
import time

import structlog

from config.settings import Settings
from node.headers import InstanceKind
from node.index import PRIORITY_VALUE, JobSpec, StudyIndex, StudyRow, job_id_for
from node.messages import DispatchMessage, SeriesRef
from node.routing import Route, expectation_met, route
from node.service_thread import ServiceThread


class Assembler(ServiceThread):
    def __init__(self, settings: Settings, index: StudyIndex, poll_s: float = 0.25) -> None:
        super().__init__("assembler", join_timeout_s=10)
        self._settings = settings
        self._index = index
        self._poll_s = poll_s
        self._log = structlog.get_logger("pacsnode.assembler")

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.tick(time.time())
            except sqlite3.Error as exc:  # a locked or full index: try again on the next tick
                self._log.error("assembly tick failed", error=type(exc).__name__, detail=str(exc))

    def tick(self, now: float) -> int:
        """Complete every study that is due; returns how many were completed."""
        completed = 0
        for study in self._index.receiving_studies():
            series = self._index.image_series(study.study_uid)
            routes = route(self._settings.routing.rules, series)
            why = self._completion_reason(study, routes, now)
            if why is None:
                continue
            jobs = [self._job(study, r, now) for r in routes]
            if self._index.complete_study(study.study_uid, study.version, jobs, now):
                completed += 1
                self._log.info("study complete", study_uid=study.study_uid, version=study.version, why=why,
                               pipelines=[r.rule.pipeline for r in routes] or None)
        return completed

    def _completion_reason(self, study: StudyRow, routes: list[Route], now: float) -> str | None:
        if now - study.last_instance_at >= self._settings.node.quiet_period_s:
            return "quiet period"
        # An expectation names series, and a series arrives instance by instance: met on a series'
        # first image, the study would complete, its model run on part of the series, and the
        # rest reopen it. So the expectation is judged once no image came for a moment.
        settled = now - study.last_instance_at >= self._settings.node.expectation_settle_s
        if settled and routes and all(r.rule.expect is not None and expectation_met(r.rule.expect, r.series)
                                      for r in routes):
            return "routing expectation met"
        expected = self._index.mpps_expected(study.study_uid)
        # Every listed instance arrived, and no image arrived that the completed steps do not
        # list (a step still in progress, or images sent after the step ended, re-opening the
        # study): those wait for the quiet period.
        if (expected and expected <= self._index.received_sop_uids(study.study_uid)
                and self._index.received_sop_uids(study.study_uid, InstanceKind.IMAGE) <= expected):
            return "mpps completed"
        return None

    def _job(self, study: StudyRow, r: Route, now: float) -> JobSpec:
        message = DispatchMessage(
            job_id=job_id_for(study.study_uid, study.version, r.rule.pipeline),
            study_uid=study.study_uid,
            version=study.version,
            pipeline=r.rule.pipeline,
            priority=r.rule.priority,
            completed_at=now,
            series=[
                SeriesRef(series_uid=s.series_uid, modality=s.modality,
                          instances=self._index.series_instances(s.series_uid))
                for s in r.series
            ],
        )
        return JobSpec(pipeline=r.rule.pipeline, rule=r.rule.name, priority=PRIORITY_VALUE[r.rule.priority],
                       payload=message.model_dump_json())
