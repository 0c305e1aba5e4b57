"""Evaluation of a registered model on labelled studies: the paper's metrics, and robustness.

Classification: the card's calibration applied to the study scores, AUC per finding with DeLong
confidence intervals, sensitivity and specificity at the card's thresholds (none for a finding the
card does not assess), and the expected calibration error of the raw and the calibrated scores on
these data, next to the card's on validation. Segmentation: Dice per case and lesion-level
sensitivity / false positives per case (26-connected components of the stacked slices). Robustness: the same headline metric with
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

from models.calibration import expected_calibration_error
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


def _study_scores(card: ModelCard, data: TaskData, probs: torch.Tensor
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(truth, raw scores, calibrated scores) per finding that has both classes in ``data``."""
    raw = study_scores(task_spec(card.task), data, probs).numpy()
    truth = data.study_targets.numpy()
    both = [k for k in range(truth.shape[1]) if 0 < truth[:, k].sum() < len(truth)]
    outputs = card.outputs
    return ({outputs[k].name: truth[:, k] for k in both}, {outputs[k].name: raw[:, k] for k in both},
            {outputs[k].name: outputs[k].calibration.apply(raw[:, k]) for k in both})


def _classification(card: ModelCard, data: TaskData, probs: torch.Tensor) -> dict[str, Any]:
    labels, raw, scores = _study_scores(card, data, probs)
    findings = summarise_classification(labels, scores,
                                        {o.name: o.operating_threshold for o in card.outputs if o.name in labels})
    for output in card.outputs:
        name, calibration = output.name, output.calibration
        if name in findings:
            findings[name] |= {
                "assessed": output.assessed,
                "ece_before": expected_calibration_error(labels[name], raw[name], calibration.bins),
                "ece_after": expected_calibration_error(labels[name], scores[name], calibration.bins),
                "validation_ece_before": calibration.ece_before,
                "validation_ece_after": calibration.ece_after,
            }
    return {"findings": findings}


def _cases(data: TaskData) -> dict[int, list[int]]:
    cases: dict[int, list[int]] = {}
    for sample, study in enumerate(data.study_of):
        cases.setdefault(study, []).append(sample)
    return cases


def _segmentation(card: ModelCard, data: TaskData, probs: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    """Dice and lesion detection per case (slices stacked into a volume), summarised over cases."""
    threshold = card.mask_threshold()
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
        labels, _, scores = _study_scores(card, data, probs)
        plots["roc"] = {name: roc_curve(labels[name], scores[name])[:2] for name in labels}
        result["calibration"] = ("the card's, fitted on validation study scores; ECE over equal-width bins of "
                                 "the raw (before) and calibrated (after) scores")
    result = {"model": card.ref, "device_uid": card.device_uid, "task": card.task, "deployable": card.deployable,
              "deployability": card.deployability, "studies": len(items), "samples": len(data),
              "skipped": data.skipped, **result}
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
