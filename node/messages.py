"""What crosses the broker between node and workers: references, never pixel data.

Both directions are strict pydantic models so that a worker of another version fails loudly
instead of misreading a field.
"""

from __future__ import annotations

import enum

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
