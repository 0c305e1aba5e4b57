"""What a worker does with one dispatched study version: select, infer, encode, store, report.

Stateless: everything comes from the dispatch message, the shared study store and the model
registry; the outcome goes back to the node as a :class:`node.messages.ReportMessage`. A study the
model cannot use ends "not applicable" with the reason, undecodable pixels end "failed" with the
reason, never a silent success. Results are written into the study store under the same layout as
received instances; their UIDs and content are functions of (study version, model version), so a
redelivered task finds its files already there (identical bytes: nothing changes) and the
destinations receive one set however often the task ran.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage

from config.settings import Settings
from node.messages import DispatchMessage, JobState, ReportedFinding, ReportMessage, ResultFile, ResultKind
from node.store import InstanceKey, StoreOutcome, StudyStore
from pretrain.runtime import pick_device
from workers.inference import LoadedModel, ModelCache, Unreadable, run_model
from workers.report_details import key_images, model_summary
from workers.results import ResultContext, build_results
from workers.results.build import run_uids
from workers.series import NotApplicable, select_series

SR_CLASSES = {Comprehensive3DSRStorage, ComprehensiveSRStorage}
# Written last: a task killed half way leaves no SR, so an SR in the store means a complete set.
WRITE_ORDER = (ResultKind.SEG, ResultKind.KO, ResultKind.SC, ResultKind.SR)


def encode(ds: Dataset) -> bytes:
    """Part 10 bytes of a result object."""
    buffer = DicomBytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class StudyProcessor:
    """Per worker process: owns the warm models (loaded after the pool forked, on first use)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store = StudyStore(settings.node.store_path)
        self._models: ModelCache | None = None
        self._context = ResultContext(manufacturer=settings.node.manufacturer,
                                      software_version=importlib.metadata.version("pacsnode"),
                                      uid_root=settings.node.uid_root)

    @property
    def store_root(self) -> Path:
        return self._store.root

    def models(self) -> ModelCache:
        """Created in the child process on first use: CUDA is never touched before the fork."""
        if self._models is None:
            self._models = ModelCache(self._settings.workers.models_dir, pick_device(self._settings.workers.device))
        return self._models

    def warm_up(self, pipelines: list[str]) -> None:
        """Load the served pipelines' models now (worker_process_init), so the first study pays nothing."""
        for pipeline in pipelines:
            try:
                self.models().get(pipeline)
            except NotApplicable:
                continue

    def process(self, job: DispatchMessage) -> ReportMessage:
        missing = [path for series in job.series for path in series.instances
                   if not self._store.resolve(path).is_file()]
        if missing:
            return ReportMessage(job_id=job.job_id, state=JobState.FAILED,
                                 reason=f"{len(missing)} instance files not found in the study store "
                                        "(is it mounted here?)")
        try:
            model = self.models().get(job.pipeline)
            selected = select_series(self._store.root, job.series, model.card.applies_to)
            outcome = run_model(model, job, selected)
        except NotApplicable as exc:
            return ReportMessage(job_id=job.job_id, state=JobState.NOT_APPLICABLE, reason=str(exc))
        except Unreadable as exc:
            return ReportMessage(job_id=job.job_id, state=JobState.FAILED, reason=f"undecodable pixels: {exc}")
        current_sr = run_uids(outcome, self._context).uid("sr")
        results = build_results(outcome, self._context, previous=list(self._previous_srs(job, model, current_sr)))
        written = self._write(job, dict(results.all()))
        lesions = outcome.segmentation.lesions if outcome.segmentation is not None else None
        findings: dict[str, ReportedFinding | float] = {
            f.name: ReportedFinding(probability=round(f.probability, 4), present=f.present,
                                    threshold=None if f.threshold is None else round(f.threshold, 4),
                                    assessed=f.present is not None, reason=f.not_assessed_reason,
                                    lesions=None if lesions is None else len(lesions),
                                    volume_mm3=None if lesions is None else round(sum(x.volume_mm3 for x in lesions), 1))
            for f in outcome.findings}
        return ReportMessage(job_id=job.job_id, state=JobState.DONE, results=written, findings=findings,
                             reason=f"{model.card.name}@{model.card.version}", model=model_summary(model.card),
                             key_images=key_images(outcome))

    def _write(self, job: DispatchMessage, objects: dict[ResultKind, Dataset]) -> list[ResultFile]:
        """Store each object durably (SR last); an object already stored by an earlier run is kept."""
        written = []
        folders: set[Path] = set()
        for kind in WRITE_ORDER:
            ds = objects.get(kind)
            if ds is None:
                continue
            key = InstanceKey(job.study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            outcome, path = self._store.write(key, encode(ds))
            if outcome is StoreOutcome.CONFLICT:
                # An earlier run of this job stored it with other bytes (a GPU's last bits differ):
                # the first stays authoritative, it may already be at a destination.
                path.unlink(missing_ok=True)
                path = self._store.path_of(key)
            folders.update(self._store.touched_dirs(path))
            written.append(ResultFile(path=str(key.relative_path), sop_uid=key.sop_uid,
                                      sop_class_uid=str(ds.SOPClassUID), kind=kind))
        self._store.sync_dirs(folders)
        return written

    def _previous_srs(self, job: DispatchMessage, model: LoadedModel, current_sr: str) -> Iterator[Dataset]:
        """Our other SRs of this study by the same model name (earlier study versions, or an earlier model
        version): the new SR supersedes them (Predecessor Documents Sequence), so a viewer shows the
        newest and links the history. A re-run of this job finds the same set (its own SR excluded)."""
        folder = self._store.root / job.study_uid
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*/*.dcm")):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, OSError, ValueError):
                continue
            if str(ds.get("SOPClassUID")) not in SR_CLASSES:
                continue
            equipment = [item for item in ds.get("ContributingEquipmentSequence", [])
                         if item.get("Manufacturer") == self._context.manufacturer
                         and item.get("ManufacturerModelName") == model.card.name]
            if equipment and str(ds.SOPInstanceUID) != current_sr:
                yield ds
