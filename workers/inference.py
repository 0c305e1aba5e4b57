"""Run one registered model on the selected images of one study version.

Pixels go through :func:`models.preprocess.image_input`, the function finetuning and evaluation
use, so a model sees at inference what it was trained on. The network runs in batches under
``torch.inference_mode`` (autocast on CUDA). Study scores follow the training definitions:
the maximum over images (a chest radiograph series) or slices (head CT, which keeps the driving
slices as evidence); metastasis segmentation is mapped back onto the source grid, thresholded at
the card's operating point and split into 26-connected lesions with volumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset
from scipy import ndimage
from torch import nn

from models.card import ModelCard, read_card
from models.metrics import label_lesions
from models.preprocess import image_input, mask_output, stack_neighbours
from models.registry import load_model, resolve
from node.messages import DispatchMessage
from pretrain.decode import PixelDataError, number_of_frames, read_dataset
from workers.outcome import FindingOutcome, LesionOutcome, SegmentationOutcome, StudyOutcome
from workers.series import NotApplicable, SelectedSeries, SliceInput

BATCH = 16
EVIDENCE_SLICES = 5  # at most this many slices are referenced per finding


class Unreadable(Exception):
    """Pixel data the model cannot use (the message says which and why)."""


@dataclass
class LoadedModel:
    """One model version in memory on its device, kept warm between tasks."""

    folder: Path
    card: ModelCard
    network: nn.Module
    device: torch.device

    @classmethod
    def load(cls, folder: Path, device: torch.device) -> LoadedModel:
        network, card = load_model(folder)
        return cls(folder, card, network.to(device), device)

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def probabilities(self, selected: SelectedSeries) -> torch.Tensor:
        """Per slice: (N, K) for classifiers, (N, S, S) for segmentation; float32 on the CPU."""
        out = []
        with torch.inference_mode(), self._autocast():
            for batch in _batches(selected, self.card):
                logits = self.network(batch.to(self.device)).float()
                out.append(torch.sigmoid(logits[:, 0] if logits.ndim == 4 else logits).cpu())
        return torch.cat(out)


def _batches(selected: SelectedSeries, card: ModelCard) -> Iterator[torch.Tensor]:
    """The card's input for every slice, in slice order (a 2.5D input stacks each slice's
    neighbours of the series), in batches of ``BATCH``."""
    datasets: dict[Path, Dataset] = {}
    slices: list[torch.Tensor] = []
    for item in selected.slices:
        source = _pixels(item, datasets)
        try:
            slices.append(image_input(source, item.frame, card.input))
        except PixelDataError as exc:
            raise Unreadable(f"image {item.sop_uid} frame {item.frame}: {exc.reason}") from exc
    yield from stack_neighbours(torch.stack(slices), card.input.neighbours).split(BATCH)


def _pixels(item: SliceInput, cache: dict[Path, Dataset]) -> Path | Dataset:
    """A multi-frame object is read once for all its frames; single frames are read by path."""
    if number_of_frames(item.header) == 1:
        return item.path
    if item.path not in cache:
        try:
            cache[item.path] = read_dataset(item.path)
        except PixelDataError as exc:
            raise Unreadable(f"image {item.sop_uid}: {exc.reason}") from exc
    return cache[item.path]


@dataclass
class ModelCache:
    """The models of one worker process: loaded once, on first use, and reloaded when a newer version
    of a pipeline's model is registered (the registry folder of a version never changes)."""

    models_dir: Path
    device: torch.device
    loaded: dict[str, LoadedModel] = field(default_factory=dict)

    def get(self, pipeline: str) -> LoadedModel:
        """The pipeline's newest model; ``NotApplicable`` when none is installed or its card says it
        is not deployable (its validation metric missed the gate): the study then ends not applicable
        with the reason, as it would without a model, rather than carrying calls nobody should trust."""
        try:
            folder = resolve(self.models_dir, pipeline)
        except LookupError as exc:
            raise NotApplicable(f"no model installed for pipeline {pipeline!r}") from exc
        current = self.loaded.get(pipeline)
        if current is None or current.folder != folder:
            card = read_card(folder)  # before the weights: a refused model never takes device memory
            if not card.deployable:
                raise NotApplicable(f"model {card.ref} is not deployable: {card.deployability}")
            current = LoadedModel.load(folder, self.device)
            self.loaded[pipeline] = current
        return current


def _evidence(slices: tuple[SliceInput, ...], scores: np.ndarray, threshold: float | None) -> tuple[Dataset, ...]:
    """The slices that drive a score: those at or above the threshold (else, or without a threshold,
    the top one), highest first."""
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    above = [i for i in order if threshold is not None and scores[i] >= threshold][:EVIDENCE_SLICES] or order[:1]
    return _distinct(slices[i].header for i in above)


def _key_slice(selected: SelectedSeries, index: int) -> tuple[str, int]:
    item = selected.slices[index]
    return item.sop_uid, item.frame + 1


def _distinct(headers: Iterator[Dataset] | list[Dataset]) -> tuple[Dataset, ...]:
    seen: dict[str, Dataset] = {}
    for ds in headers:
        seen.setdefault(str(ds.SOPInstanceUID), ds)
    return tuple(seen.values())


def _classification(model: LoadedModel, selected: SelectedSeries, probs: torch.Tensor
                    ) -> tuple[tuple[FindingOutcome, ...], tuple[Dataset, ...]]:
    """Per output: the calibrated study score (the highest image or slice; calibration keeps the
    order, so calibrating each slice first gives the same maximum) and, for an assessed finding, the
    call at the card's threshold on that scale; a finding the card does not assess gets no call."""
    values = probs.numpy()
    findings = []
    for k, output in enumerate(model.card.outputs):
        calibrated = output.calibration.apply(values[:, k])
        score = float(calibrated.max())
        threshold = output.operating_threshold
        findings.append(FindingOutcome(
            name=output.name, concept=output.concept, probability=score, threshold=threshold,
            present=None if threshold is None else score >= threshold,
            evidence=_evidence(selected.slices, calibrated, threshold),
            not_assessed_reason=output.not_assessed_reason,
            key_slice=_key_slice(selected, int(np.argmax(calibrated)))))
    return tuple(findings), findings[0].evidence


def _segmentation(model: LoadedModel, selected: SelectedSeries, probs: torch.Tensor
                  ) -> tuple[tuple[FindingOutcome, ...], tuple[Dataset, ...], SegmentationOutcome]:
    output = model.card.outputs[0]
    threshold = model.card.mask_threshold()
    grid = np.stack([mask_output(probs[i], item.header, model.card.input, frame=item.frame)
                     for i, item in enumerate(selected.slices)])
    labels, found = label_lesions(grid >= threshold, selected.spacing_mm())
    # One pass over the volume for every lesion's peak (not one boolean mask per lesion: an untrained
    # or noisy model can produce hundreds of specks).
    peaks = ndimage.maximum(grid, labels, index=[lesion.label for lesion in found]) if found else []
    lesions = tuple(
        LesionOutcome(number=lesion.label, voxels=lesion.voxels, volume_mm3=lesion.volume_mm3,
                      max_probability=float(peak), slices=tuple(range(*lesion.bbox[0])))
        for lesion, peak in zip(found, peaks, strict=True))
    # A 26-connected lesion covers every slice of its extent, so its bounding box gives its slices.
    touched = sorted({i for lesion in lesions for i in lesion.slices})
    per_slice = grid.reshape(len(grid), -1).max(axis=1)
    evidence = (_distinct([selected.slices[i].header for i in touched]) if touched
                else _evidence(selected.slices, per_slice, threshold))
    area = (labels > 0).reshape(len(labels), -1).sum(axis=1)
    finding = FindingOutcome(name=output.name, concept=output.concept, probability=float(grid.max()),
                             threshold=threshold, present=bool(lesions), evidence=evidence,
                             key_slice=_key_slice(selected, int(np.argmax(area if lesions else per_slice))))
    segmentation = _on_source_frames(selected, grid, labels, lesions, threshold)
    return (finding,), evidence, segmentation


def _on_source_frames(selected: SelectedSeries, grid: np.ndarray, labels: np.ndarray,
                      lesions: tuple[LesionOutcome, ...], threshold: float) -> SegmentationOutcome:
    """The SEG's frame order: one per source instance in slice order, or, for an enhanced
    multi-frame source, the source's own frame order (a SEG frame references a source frame)."""
    sources = selected.headers
    if len(sources) == len(selected.slices):
        return SegmentationOutcome(sources, grid, threshold, labels, lesions)
    order = np.argsort([item.frame for item in selected.slices], kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    moved = tuple(LesionOutcome(lesion.number, lesion.voxels, lesion.volume_mm3, lesion.max_probability,
                                tuple(sorted(int(rank[i]) for i in lesion.slices))) for lesion in lesions)
    return SegmentationOutcome(sources, grid[order], threshold, labels[order], moved)


def run_model(model: LoadedModel, job: DispatchMessage, selected: SelectedSeries) -> StudyOutcome:
    """The outcome of one model on one study version's selected series."""
    probs = model.probabilities(selected)
    segmentation = None
    if model.card.kind == "segmentation":
        findings, key_images, segmentation = _segmentation(model, selected, probs)
    else:
        findings, key_images = _classification(model, selected, probs)
    return StudyOutcome(study_uid=job.study_uid, version=job.version, completed_at=job.completed_at,
                        card=model.card, source_images=selected.headers, findings=findings,
                        key_images=key_images, segmentation=segmentation)
