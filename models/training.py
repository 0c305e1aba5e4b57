"""Finetune one task model on a labelled folder and save it as a model version.

The one path from labelled DICOM to a registrable model folder: ``pacsnode finetune`` and
``pacsnode demo`` both call :func:`train_task_model`, so a demo model is built exactly as a
hospital's would be (patient-level split, validation thresholds, card with a fresh Device UID).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.card import ModelCard
from models.dataset import collect_studies, patient_split, subsample
from models.finetune import FinetuneConfig, FinetuneResult, build_data, finetune, initial_encoder, save_model
from models.tasks import task_spec

Progress = Callable[[int, float, float | None], None]


@dataclass(frozen=True)
class TrainedModel:
    card: ModelCard
    result: FinetuneResult
    folder: Path
    studies: dict[str, int]


def train_task_model(
    task: str, data: Path, labels: Path, config: FinetuneConfig, *, init: str, out: Path, name: str, version: str,
    slice_labels: Path | None = None, label_fraction: float | None = None, progress: Progress | None = None,
    announce: Callable[[str], None] = lambda line: None,
) -> TrainedModel:
    """Split by patient, finetune, pick thresholds on validation and write ``out`` (weights + card).

    Raises ``ValueError``/``FileNotFoundError`` with a message naming the bad input (labels for
    studies not in the data, an encoder with another input spec, ...).
    """
    spec = task_spec(task)
    encoder, source = initial_encoder(init, config, spec)
    items = collect_studies(data, labels, modality=spec.modalities, slice_labels=slice_labels)
    splits = patient_split(items, seed=config.seed)
    train_items = subsample(splits["train"], fraction=label_fraction, seed=config.seed) if label_fraction \
        else splits["train"]
    announce(f"{task}: {len(train_items)} training, {len(splits['val'])} validation, {len(splits['test'])} test "
             f"studies (patient-level split); init {init}, {config.regime}")
    input_spec = config.input_for(spec)
    train_data = build_data(spec, train_items, input_spec)
    val_data = build_data(spec, splits["val"], input_spec)
    result = finetune(spec, train_data, val_data, config, encoder=encoder, progress=progress,
                      checkpoint=out / "checkpoint.safetensors")
    studies = {k: len(v) for k, v in splits.items()} | {"train_used": len(train_items)}
    training: dict[str, Any] = {
        "data": str(data), "studies": studies, "label_fraction": label_fraction, "regime": config.regime,
        "patient_split": f"60/20/20 by patient, seed {config.seed}", "skipped": train_data.skipped,
    }
    card = save_model(out, spec, result, config, name=name, version=version, training=training,
                      encoder_source=source)
    (out / "checkpoint.safetensors").unlink(missing_ok=True)  # the crash copy; model.safetensors is the best
    return TrainedModel(card, result, out, studies)
