"""What crosses the broker between node and workers: references, never pixel data.

Both directions are strict pydantic models so that a worker of another version fails loudly
instead of misreading a field.
"""

from __future__ import annotations

import enum
import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROCESS_STUDY_TASK = "pacsnode.process_study"


class JobState(str, enum.Enum):
    PENDING = "pending"  # committed in the outbox, not yet published
    QUEUED = "queued"  # published to the broker
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"
    SUPERSEDED = "superseded"  # a newer study version replaced it before it ran


class SeriesRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    series_uid: str
    modality: str
    instances: list[str] = Field(description="paths relative to the study store")


class DispatchMessage(BaseModel):
    """Sent to the workers: process this version of this study with this pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    study_uid: str
    version: int = Field(ge=1)
    pipeline: str
    priority: str
    series: list[SeriesRef]
    completed_at: float = Field(default=0.0, description="when the node closed this study version (epoch s); "
                                "results carry it as their content time, so a re-run yields identical objects")


class ResultKind(str, enum.Enum):
    """What a result file is; destinations that cannot show SR/SEG get the KO and SC instead."""

    SR = "sr"
    SEG = "seg"
    KO = "ko"
    SC = "sc"


class ResultFile(BaseModel):
    """One DICOM object a worker wrote into the study store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="relative to the study store")
    sop_uid: str
    sop_class_uid: str
    kind: ResultKind


class ReportedFinding(BaseModel):
    """One model output for the study: its calibrated probability and the call at the model card's
    threshold; a finding the card does not assess has no call (``present`` and ``threshold`` null,
    ``assessed`` false) and the reason."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    probability: float = Field(ge=0, le=1)
    present: bool | None
    threshold: float | None = Field(default=None, ge=0, le=1)
    assessed: bool = True
    reason: str = Field(default="", description="why the finding is not assessed")
    lesions: int | None = Field(default=None, ge=0, description="segmentation models: lesions found")
    volume_mm3: float | None = Field(default=None, ge=0, description="segmentation models: their total volume")

    @model_validator(mode="after")
    def _call_or_reason(self) -> ReportedFinding:
        if self.assessed != (self.present is not None) or self.assessed == bool(self.reason):
            raise ValueError("a finding is either assessed (present true/false, no reason) or not "
                             "(present null, assessed false, a reason)")
        return self


class DisplayWindow(BaseModel):
    """A CT window in Hounsfield units, under its radiological name: how a model reads CT
    (``models.preprocess.Window``) and so how a key image is shown."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    centre: float
    width: float = Field(gt=0)

    @model_validator(mode="after")
    def _finite(self) -> DisplayWindow:
        if not (math.isfinite(self.centre) and math.isfinite(self.width)):
            raise ValueError(f"window {self.name!r}: centre and width must be finite")
        return self


class KeyImage(BaseModel):
    """An image a finding rests on (the radiograph, the slice that drives a CT score, a slice a
    lesion touches), and how the model read it: the window of its first CT channel, or ``None``
    for the robust-percentile mapping of every other image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sop_uid: str
    frame: int = Field(default=1, ge=1, description="1-based frame of a multi-frame image")
    findings: list[str] = Field(default_factory=list, description="the findings it is evidence for")
    window: DisplayWindow | None = None


class OutputSummary(BaseModel):
    """One model output's validation figures, as the model card has them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    assessed: bool
    threshold: float | None = None
    validation_auc: float | None = None
    positives: int | None = None
    negatives: int | None = None
    ece_before: float | None = None
    ece_after: float | None = None


class ModelSummary(BaseModel):
    """What a reader of the result needs to know of the model that made it: which model, and how it
    did on its validation data (the card's headline metric against its gate, per-output figures)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    metric: str = ""
    value: float | None = None
    gate: float | None = None
    deployability: str = ""
    outputs: list[OutputSummary] = Field(default_factory=list)


class ReportMessage(BaseModel):
    """Sent by the workers to the node's report queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    state: JobState
    reason: str = ""
    attempt: int = Field(default=1, ge=1)
    worker: str = ""
    results: list[ResultFile] = Field(default_factory=list)
    findings: dict[str, ReportedFinding | float] = Field(default_factory=dict)
    model: ModelSummary | None = Field(default=None, description="the model that made a DONE report's results")
    key_images: list[KeyImage] = Field(default_factory=list, description="what the worklist page shows")
