"""Calibration, operating thresholds and the gates of a model card (models/calibration.py, finetune).

Probabilities are Platt-scaled on validation and must get better calibrated for it; a threshold is
only ever chosen from a validation split with enough cases of both classes; a finding below its AUC
gate gets no call, and a model below its gate is written as not deployable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.optimize import minimize
from scipy.special import expit, logit

from config.registry_layout import CARD
from models.calibration import Calibration, expected_calibration_error, fit_platt
from models.card import read_card
from models.finetune import FinetuneConfig, TaskData, choose_thresholds, deployability
from models.metrics import summarise_classification, youden_threshold
from models.tasks import task_spec

SEED = 20240812


def _miscalibrated(n: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, true probability, score): truth drawn from p, the model reports p ** 3 (too timid)."""
    rng = np.random.default_rng(SEED)
    p = rng.random(n)
    truth = (rng.random(n) < p).astype(int)
    return truth, p, p**3


def test_platt_scaling_lowers_the_calibration_error_of_a_miscalibrated_score() -> None:
    truth, p, score = _miscalibrated()
    calibration = fit_platt(truth, score)
    assert calibration.method == "platt" and calibration.slope > 0
    before, after = calibration.ece_before, calibration.ece_after
    assert before == pytest.approx(expected_calibration_error(truth, score))
    assert after == pytest.approx(expected_calibration_error(truth, calibration.apply(score)))
    assert before is not None and after is not None
    assert before > 0.15  # p ** 3 is far off
    assert after < 0.04 < before / 4
    # about as good as the true probability itself, which is the best any recalibration can do
    assert after < expected_calibration_error(truth, p) + 0.02


def _platt_reference(truth: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """Platt's algorithm written out: minimise the cross-entropy against his smoothed targets."""
    z = logit(np.clip(score, 1e-7, 1 - 1e-7))
    pos, neg = truth.sum(), len(truth) - truth.sum()
    t = np.where(truth == 1, (pos + 1) / (pos + 2), 1 / (neg + 2))

    def loss(params: np.ndarray) -> float:
        q = np.clip(expit(params[0] * z + params[1]), 1e-15, 1 - 1e-15)
        return float(-(t * np.log(q) + (1 - t) * np.log(1 - q)).sum())

    fitted = minimize(loss, np.array([1.0, 0.0]), method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12})
    return float(fitted.x[0]), float(fitted.x[1])


def test_platt_is_platts_algorithm_with_smoothed_targets() -> None:
    truth, _, score = _miscalibrated(500)
    calibration = fit_platt(truth, score)
    slope, intercept = _platt_reference(truth, score)
    assert calibration.slope == pytest.approx(slope, abs=1e-4)
    assert calibration.intercept == pytest.approx(intercept, abs=1e-4)
    # calibration keeps the order: the highest slice stays the highest
    order = np.argsort(score, kind="stable")
    assert np.all(np.diff(calibration.apply(score)[order]) >= 0)


def test_a_separable_validation_split_gives_probabilities_not_a_step() -> None:
    """A model that ranks a small validation split perfectly is not thereby certain: the calibrated
    probabilities stay inside Platt's targets and the slope stays finite and moderate."""
    truth = np.array([0] * 12 + [1] * 8)
    score = np.concatenate([np.linspace(0.05, 0.4, 12), np.linspace(0.6, 0.95, 8)])
    calibration = fit_platt(truth, score)
    slope, _ = _platt_reference(truth, score)
    assert calibration.slope == pytest.approx(slope, abs=1e-3) and 0 < calibration.slope < 20
    probs = calibration.apply(score)
    # the cases either side of the gap are uncertain, not 0 and 1
    assert 0.15 < probs[11] < 0.5 < probs[12] < 0.85
    assert 0.001 < probs.min() and probs.max() < 0.995


def test_ece_is_the_weighted_gap_over_equal_width_bins() -> None:
    # bins of width 0.5: (0, 0.5] holds 0.2, 0.4 (mean 0.3, 1 of 2 positive); (0.5, 1] holds 0.9, 1.0 (mean 0.95, 2 of 2)
    assert expected_calibration_error([0, 1, 1, 1], [0.2, 0.4, 0.9, 1.0], bins=2) == pytest.approx(
        0.5 * abs(0.5 - 0.3) + 0.5 * abs(1.0 - 0.95))
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="probs must be"):
        expected_calibration_error([0, 1], [0.2, 1.3])
    with pytest.raises(ValueError, match="bins must be at least 1"):
        expected_calibration_error([0, 1], [0.2, 0.3], bins=0)


def test_without_both_classes_calibration_is_the_identity() -> None:
    calibration = fit_platt([0, 0, 0, 0], [0.1, 0.3, 0.2, 0.6])
    assert calibration.method == "identity" and calibration.ece_before == calibration.ece_after
    np.testing.assert_array_equal(calibration.apply(np.array([0.1, 0.9])), [0.1, 0.9])
    assert Calibration().apply([0.0, 1.0]).tolist() == [0.0, 1.0]


def test_a_score_that_ranks_backwards_calibrates_to_the_observed_frequency() -> None:
    truth, _, score = _miscalibrated(400)
    calibration = fit_platt(truth, 1 - score)
    assert calibration.slope == 0
    np.testing.assert_allclose(calibration.apply(np.array([0.01, 0.5, 0.99])), truth.mean())


# ---------------------------------------------------------------------------------- thresholds


def _validation(truth: np.ndarray) -> TaskData:
    """A validation split of radiographs (one image per study) with the given study truth."""
    n = len(truth)
    targets = torch.tensor(truth, dtype=torch.float32)
    return TaskData(images=torch.zeros(n, 1, 1, dtype=torch.int32), encodings=["unit"] * n, targets=targets,
                    study_of=list(range(n)), studies=[], study_targets=targets)


def _cxr_validation() -> tuple[TaskData, torch.Tensor]:
    """60 studies: "any" well separated (30/30), "nodule" with 4 positives, "consolidation" at chance,
    "effusion" without positives, "cardiomegaly" separated (12/48)."""
    rng = np.random.default_rng(SEED)
    n = 60
    any_ = np.r_[np.ones(30), np.zeros(30)]
    nodule = np.r_[np.ones(4), np.zeros(56)]
    chance = rng.permutation(np.r_[np.ones(25), np.zeros(35)])
    cardio = np.r_[np.ones(12), np.zeros(48)]
    truth = np.stack([any_, nodule, chance, np.zeros(n), cardio], axis=1)
    signal = np.clip(0.35 * truth + 0.4 * rng.random((n, 5)) + 0.1, 0, 1)
    signal[:, 2] = rng.random(n)  # consolidation: a score that knows nothing
    return _validation(truth), torch.tensor(signal ** 3, dtype=torch.float32)


def test_thresholds_come_only_from_enough_cases_and_findings_below_the_gate_get_no_call() -> None:
    spec = task_spec("cxr-abnormality")
    val, probs = _cxr_validation()
    outputs = {o.name: o for o in choose_thresholds(spec, val, probs, FinetuneConfig())}
    assert list(outputs) == spec.outputs

    good = outputs["any"]
    assert good.assessed and good.not_assessed_reason == "" and (good.positives, good.negatives) == (30, 30)
    assert good.calibration.method == "platt"
    assert good.calibration.ece_after is not None and good.calibration.ece_before is not None
    assert good.calibration.ece_after < good.calibration.ece_before
    scores = probs[:, 0].numpy().astype(np.float64)
    assert good.threshold == youden_threshold(val.study_targets[:, 0].numpy(), good.calibration.apply(scores))
    assert good.operating_threshold == good.threshold
    assert good.validation_auc is not None and good.validation_auc >= 0.70
    assert "at least 10 positive and 10 negative" in good.threshold_rule

    few = outputs["nodule"]
    assert few.threshold is None and few.operating_threshold is None and not few.assessed
    assert few.not_assessed_reason == "validation has 4 positives, at least 10 of each needed for a threshold"

    none = outputs["effusion"]
    assert none.threshold is None and not none.assessed and none.calibration.method == "identity"
    assert none.validation_auc is None and none.not_assessed_reason.startswith("validation has 0 positives,")

    chance = outputs["consolidation"]
    assert chance.threshold is not None and not chance.assessed and chance.operating_threshold is None
    assert chance.validation_auc is not None and chance.validation_auc < 0.70
    assert chance.not_assessed_reason == f"validation AUC {chance.validation_auc:.2f} < gate 0.70"

    assert outputs["cardiomegaly"].assessed and outputs["cardiomegaly"].positives == 12

    stricter = {o.name: o for o in choose_thresholds(spec, val, probs, FinetuneConfig(min_cases_for_threshold=13))}
    assert stricter["any"].assessed and stricter["cardiomegaly"].threshold is None
    assert stricter["cardiomegaly"].not_assessed_reason == (
        "validation has 12 positives, at least 13 of each needed for a threshold")
    ungated = {o.name: o for o in choose_thresholds(spec, val, probs, FinetuneConfig(finding_auc_gate=0))}
    assert ungated["consolidation"].assessed and not ungated["nodule"].assessed


def test_a_slice_model_is_calibrated_and_thresholded_on_its_study_scores() -> None:
    spec = task_spec("ct-hemorrhage")
    rng = np.random.default_rng(SEED)
    studies = 40
    truth = np.zeros((studies, len(spec.outputs)))
    truth[:20, 0] = 1
    slices = 3
    study_of = [s for s in range(studies) for _ in range(slices)]
    probs = torch.tensor(rng.random((studies * slices, len(spec.outputs))) * 0.5, dtype=torch.float32)
    probs[: 20 * slices, 0] += 0.5  # the positive studies' slices score higher
    targets = torch.tensor(truth, dtype=torch.float32)
    val = TaskData(images=torch.zeros(len(study_of), 1, 1, dtype=torch.int32), encodings=["hu"] * len(study_of),
                   targets=targets[study_of], study_of=study_of, studies=[None] * studies,  # type: ignore[list-item]
                   study_targets=targets)
    (any_, *rest) = choose_thresholds(spec, val, probs, FinetuneConfig())
    study_max = probs[:, 0].reshape(studies, slices).max(1).values.numpy().astype(np.float64)
    assert any_.assessed and any_.calibration == fit_platt(truth[:, 0], study_max)
    assert all(not o.assessed and o.threshold is None for o in rest)


def test_a_segmentation_output_keeps_raw_voxels_and_the_fixed_threshold() -> None:
    spec = task_spec("mr-metastasis")
    val = _validation(np.array([[1.0], [0.0], [1.0]]))
    (output,) = choose_thresholds(spec, val, torch.zeros(3, 4, 4), FinetuneConfig())
    assert output.calibration == Calibration() and output.threshold == 0.5 and output.assessed
    assert (output.positives, output.negatives) == (2, 1)


def test_evaluation_makes_no_call_without_a_threshold() -> None:
    truth = np.r_[np.ones(5), np.zeros(5)]
    scores = np.linspace(0.9, 0.1, 10)
    summary = summarise_classification({"a": truth, "b": truth}, {"a": scores, "b": scores}, {"a": 0.5, "b": None})
    assert summary["a"]["sensitivity"] == 1.0 and summary["a"]["tp"] == 5
    assert summary["b"]["auc"] == 1.0
    assert all(summary["b"][k] is None for k in ("threshold", "sensitivity", "specificity", "tp", "fn"))


# ---------------------------------------------------------------------------------------- gates


@pytest.mark.parametrize(("task", "metric", "config", "expected"), [
    ("ct-hemorrhage", 0.53, FinetuneConfig(), (False, "validation mean study AUC 0.53 < gate 0.70")),
    ("ct-hemorrhage", 0.91, FinetuneConfig(), (True, "validation mean study AUC 0.91 >= gate 0.70")),
    ("mr-metastasis", 0.41, FinetuneConfig(), (False, "validation mean Dice 0.41 < gate 0.50")),
    ("mr-metastasis", 0.41, FinetuneConfig(dice_gate=0.4), (True, "validation mean Dice 0.41 >= gate 0.40")),
    ("cxr-abnormality", float("-inf"), FinetuneConfig(),
     (False, "validation mean study AUC undefined (no validation finding with both classes), gate 0.70")),
    ("cxr-abnormality", 0.2, FinetuneConfig(finding_auc_gate=0), (True, "validation mean study AUC 0.20, not gated (gate 0)")),
])
def test_the_model_gate_says_why(task: str, metric: float, config: FinetuneConfig,
                                 expected: tuple[bool, str]) -> None:
    assert deployability(task_spec(task), metric, config) == expected


def test_a_card_of_the_old_format_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / CARD).write_text(yaml.safe_dump({"format": "pacsnode-model/1", "name": "x"}))
    with pytest.raises(ValueError, match="card format 'pacsnode-model/1', this version reads only 'pacsnode-model/2'"):
        read_card(folder)
