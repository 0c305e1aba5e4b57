"""The model card: everything a worker, a PACS admin and an auditor need to know about a model version.

Stored as ``card.yaml`` beside ``model.safetensors``. Routing reads ``applies_to``; workers read the
input spec, whether the model is deployable, and the outputs with their coded concepts, calibration,
operating thresholds and whether each is assessed at all; the SR carries the name, version and
Device UID (IHE AI Results: a new UID for every retraining, so results from two trainings are never
attributed to the same device).

Format 2 added calibration, the per-finding and per-model gates; a format 1 card lacks what
workers need to make a call a reader can trust, so it is refused, not read with defaults.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from config.registry_layout import CARD
from models.calibration import Calibration
from models.preprocess import InputSpec
from models.tasks import CodedConcept, TaskKind, TaskName
from pretrain.backbones import EncoderSpec

CARD_FORMAT = "pacsnode-model/2"


class AppliesTo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...] = ()
    min_slices: int = Field(1, ge=1)


class OutputSpec(BaseModel):
    """One reported finding: its concept, how its score becomes a probability, the probability at or
    above which it is called present, and whether it is called at all.

    ``threshold`` is on the calibrated scale; ``None`` where validation had too few cases of a
    class to choose one. ``assessed`` is false where the finding must get no present/absent call
    anywhere (no threshold, or validation AUC below the gate), ``not_assessed_reason`` says why.
    ``validation_auc``, ``positives`` and ``negatives`` are the finding's study-level validation
    numbers the decision was made on (``None`` where not measured, e.g. untrained test models).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    concept: CodedConcept
    calibration: Calibration = Field(default_factory=Calibration)
    threshold: float | None = Field(None, ge=0, le=1)
    threshold_rule: str
    validation_auc: float | None = Field(None, ge=0, le=1)
    positives: int | None = Field(None, ge=0)
    negatives: int | None = Field(None, ge=0)
    assessed: bool
    not_assessed_reason: str = ""

    @model_validator(mode="after")
    def _call_needs_threshold(self) -> OutputSpec:
        if self.assessed and (self.threshold is None or self.not_assessed_reason):
            raise ValueError(f"output {self.name!r}: an assessed finding needs a threshold and no not_assessed_reason")
        if not self.assessed and not self.not_assessed_reason:
            raise ValueError(f"output {self.name!r}: a finding that is not assessed needs a not_assessed_reason")
        return self

    @property
    def operating_threshold(self) -> float | None:
        """The threshold a call is made at; ``None``: this finding gets no call."""
        return self.threshold if self.assessed else None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = CARD_FORMAT
    name: str
    version: str
    task: TaskName
    kind: TaskKind
    description: str
    applies_to: AppliesTo
    encoder: EncoderSpec
    head_stride: int = Field(32, description="The encoder feature-map stride the head reads (models.networks)")
    input: InputSpec
    input_channels: list[str] = Field(default_factory=list, description="What each input channel is, in order")
    outputs: list[OutputSpec]
    deployable: bool = Field(description="Whether workers may run it: its validation headline metric passed its gate")
    deployability: str = Field(min_length=1, description="Why it is or is not deployable (metric, value, gate)")
    validation: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    encoder_source: dict[str, Any] = Field(default_factory=dict, description="The pretrained encoder's card summary")
    device_uid: str
    sha256: str = ""
    created: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def mask_threshold(self) -> float:
        """A segmentation model's voxel probability at or above which a voxel is lesion."""
        threshold = self.outputs[0].threshold if self.kind == "segmentation" else None
        if threshold is None:
            raise ValueError(f"model {self.ref} ({self.kind}) has no voxel threshold")
        return threshold


def new_device_uid() -> str:
    """A fresh UID under the 2.25 (UUID) root: one per training run, never reused."""
    return f"2.25.{uuid.uuid4().int}"


def write_card(folder: Path, card: ModelCard) -> Path:
    path = folder / CARD
    path.write_text(yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False))
    return path


def read_card(folder: Path) -> ModelCard:
    path = folder / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CARD}: not a model version folder")
    raw = yaml.safe_load(path.read_text())
    found = raw.get("format") if isinstance(raw, dict) else None
    if found != CARD_FORMAT:
        raise ValueError(f"{path}: card format {found!r}, this version reads only {CARD_FORMAT!r} (calibrated, "
                         "gated outputs); finetune the model again to get a card of this format")
    return ModelCard.model_validate(raw)
