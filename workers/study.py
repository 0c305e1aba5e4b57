"""What a worker does with one dispatched study version.

Models arrive with the model registry; until a pipeline has an installed model, its studies
end "not applicable" with that reason, never as a silent success.
"""

from __future__ import annotations

from config.settings import Settings
from node.messages import DispatchMessage, JobState, ReportMessage
from node.store import StudyStore


class StudyProcessor:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store_root = settings.node.store_path

    def process(self, job: DispatchMessage) -> ReportMessage:
        store = StudyStore(self._store_root)
        missing = [
            path for series in job.series for path in series.instances if not store.resolve(path).is_file()
        ]
        if missing:
            return ReportMessage(
                job_id=job.job_id, state=JobState.FAILED,
                reason=f"{len(missing)} instance files not found in the study store (is it mounted here?)",
            )
        model_dir = self._settings.workers.models_dir / job.pipeline
        if not model_dir.is_dir():
            return ReportMessage(
                job_id=job.job_id, state=JobState.NOT_APPLICABLE,
                reason=f"no model installed for pipeline {job.pipeline!r}",
            )
        return ReportMessage(
            job_id=job.job_id, state=JobState.FAILED,
            reason=f"pipeline {job.pipeline!r} has a model folder but this worker cannot run models yet",
        )
