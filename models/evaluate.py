"""Evaluation of a registered model on labelled studies: the paper's metrics, and robustness.

Classification: AUC per finding with DeLong confidence intervals, sensitivity and specificity at the
card's thresholds. Segmentation: Dice per case and lesion-level sensitivity / false positives per
case (26-connected components of the stacked slices). Robustness: the same headline metric with
the inputs rotated, zoomed, intensity-scaled and gamma-adjusted, to check the paper's claim that
pretraining makes models less sensitive to such changes. Everything goes through the same
preprocessing (``finetune.build_data`` / ``network_input``) as training and inference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.card import ModelCard
from models.dataset import StudyItem
from models.finetune import TaskData, build_data, predict, study_scores
from models.metrics import dice, lesion_detection, roc_curve, summarise_classification, summarise_segmentation
from models.tasks import task_spec
from pretrain.augment import perturb

Perturbation = tuple[str, float, Callable[[torch.Tensor], torch.Tensor]]


def perturbations() -> list[Perturbation]:
    """(kind, magnitude, transform) triples; magnitude 0/1 is the unperturbed input."""
    out: list[Perturbation] = []
    for angle in (-30.0, -15.0, 0.0, 15.0, 30.0):
        out.append(("rotation_deg", angle, partial(perturb, rotation_deg=angle)))
    for scale in (0.8, 0.9, 1.0, 1.1, 1.2):
        out.append(("scale", scale, partial(perturb, scale=scale)))
    for factor in (0.7, 0.85, 1.0, 1.15, 1.3):
        out.append(("intensity_scale", factor, partial(perturb, intensity_scale=factor)))
    for gamma in (0.6, 0.8, 1.0, 1.25, 1.6):
        out.append(("gamma", gamma, partial(perturb, gamma=gamma)))
    return out


def _classification(card: ModelCard, data: TaskData, probs: torch.Tensor) -> dict[str, Any]:
    spec = task_spec(card.task)
    scores = study_scores(spec, data, probs).numpy()
    truth = data.study_targets.numpy()
    names = [o.name for o in card.outputs]
    labels = {n: truth[:, k] for k, n in enumerate(names) if 0 < truth[:, k].sum() < len(truth)}
    findings = summarise_classification(labels, {n: scores[:, k] for k, n in enumerate(names) if n in labels},
                                        {o.name: o.threshold for o in card.outputs if o.name in labels})
    return {"findings": findings}


def _cases(data: TaskData) -> dict[int, list[int]]:
    cases: dict[int, list[int]] = {}
    for sample, study in enumerate(data.study_of):
        cases.setdefault(study, []).append(sample)
    return cases


def _segmentation(card: ModelCard, data: TaskData, probs: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    """Dice and lesion detection per case (slices stacked into a volume), summarised over cases."""
    threshold = card.outputs[0].threshold
    dices, detections = [], []
    for samples in _cases(data).values():
        pred = (probs[samples] >= threshold).numpy()
        true = truth[samples].numpy() >= 0.5
        dices.append(dice(pred, true))
        detections.append(lesion_detection(pred, true))
    return summarise_segmentation(dices, detections)


def headline(card: ModelCard, result: dict[str, Any]) -> float:
    """The one number robustness curves follow: mean AUC over findings, or mean Dice."""
    if card.kind == "segmentation":
        return float(result["dice"])
    aucs = [v["auc"] for v in result["findings"].values() if v.get("auc") is not None]
    return float(np.mean(aucs)) if aucs else float("nan")


def evaluate(network: nn.Module, card: ModelCard, items: Sequence[StudyItem], *, robustness: bool = True,
             device: torch.device | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics (JSON-ready) plus plot data (ROC points, robustness curves)."""
    device = device or torch.device("cpu")
    network = network.to(device).eval()
    spec = task_spec(card.task)
    data = build_data(spec, items, card.input)
    probs = predict(network, data, card.input, device)
    plots: dict[str, Any] = {}
    if card.kind == "segmentation":
        result = _segmentation(card, data, probs, data.targets.float())
    else:
        result = _classification(card, data, probs)
        scores = study_scores(spec, data, probs).numpy()
        truth = data.study_targets.numpy()
        plots["roc"] = {o.name: roc_curve(truth[:, k], scores[:, k])[:2] for k, o in enumerate(card.outputs)
                        if 0 < truth[:, k].sum() < len(truth)}
    result = {"model": f"{card.name}@{card.version}", "device_uid": card.device_uid, "task": card.task,
              "studies": len(items), "samples": len(data), "skipped": data.skipped, **result}
    if robustness:
        curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
        metric = "dice" if card.kind == "segmentation" else "auc"
        for kind, magnitude, transform in perturbations():
            moved = predict(network, data, card.input, device, transform=transform)
            if card.kind == "segmentation":
                geometric = kind in ("rotation_deg", "scale")
                masks = (transform(data.targets.float()[:, None])[:, 0] if geometric else data.targets.float())
                value = headline(card, _segmentation(card, data, moved, masks))
            else:
                value = headline(card, _classification(card, data, moved))
            curves.setdefault(kind, {}).setdefault(metric, []).append((magnitude, value))
        result["robustness"] = {kind: {metric: [[m, v] for m, v in series[metric]]} for kind, series in curves.items()}
        baseline = headline(card, result)
        result["robustness_drop"] = {
            kind: max(baseline - v for _, v in series[metric]) for kind, series in curves.items()
        }
        plots["robustness"] = curves
    return result, plots


def write_evaluation(out: Path, result: dict[str, Any], plots: dict[str, Any]) -> dict[str, Path]:
    from models.report import write_report

    return write_report(out, f"Evaluation of {result['model']}", result, roc=plots.get("roc"),
                        robustness=plots.get("robustness"))
