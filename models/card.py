"""The model card: everything a worker, a PACS admin and an auditor need to know about a model version.

Stored as ``card.yaml`` beside ``model.safetensors``. Routing reads ``applies_to``; workers read the
input spec, the outputs with their coded concepts and operating thresholds; the SR carries the name,
version and Device UID (IHE AI Results: a new UID for every retraining, so results from two
trainings are never attributed to the same device).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from config.registry_layout import CARD
from models.preprocess import InputSpec
from models.tasks import CodedConcept, TaskKind, TaskName
from pretrain.backbones import EncoderSpec

CARD_FORMAT = "pacsnode-model/1"


class AppliesTo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...] = ()
    min_slices: int = Field(1, ge=1)


class OutputSpec(BaseModel):
    """One reported finding: its concept and the probability at or above which it is called present."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    concept: CodedConcept
    threshold: float = Field(ge=0, le=1)
    threshold_rule: str = "youden on validation"


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
    input: InputSpec
    outputs: list[OutputSpec]
    validation: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    encoder_source: dict[str, Any] = Field(default_factory=dict, description="The pretrained encoder's card summary")
    device_uid: str
    sha256: str = ""
    created: str


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
    card = ModelCard.model_validate(yaml.safe_load(path.read_text()))
    if card.format != CARD_FORMAT:
        raise ValueError(f"{path}: format {card.format!r}, this version reads {CARD_FORMAT!r}")
    return card
