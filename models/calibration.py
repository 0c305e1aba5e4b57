"""Calibrated probabilities: what a model's score means as a chance that the finding is there.

A network's sigmoid is not a probability: trained with class weights and early-stopped on AUC, it
is typically far too confident or too timid, and a max over slices inflates it further. Platt
scaling (Platt 1999, with his smoothed targets) fits ``p = sigmoid(slope * logit(score) + intercept)`` on the validation
split, at the level the model reports (the study score: the highest slice for head CT, the image
for radiographs), so the calibrated value is what a reader should take as the probability. Two
parameters cannot overfit a validation split of a few dozen studies the way a binned method
(isotonic regression) would; a split without both classes cannot fit them at all, and the
finding keeps its raw score (identity).

How well a probability is calibrated is the expected calibration error over equal-width bins
(Naeini et al. 2015; Guo et al. 2017): the case-weighted mean gap between the observed frequency
and the mean probability in each bin. Cards store it before and after calibration on validation;
evaluations report both on the test data.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression

from models.metrics import binary_inputs

__all__ = ["Calibration", "expected_calibration_error", "fit_platt", "platt_targets"]

BINS = 10
# Scores are clipped this far inside (0, 1) before the logit: a float32 sigmoid saturates at
# exactly 0 or 1, whose logit is infinite.
EPSILON = 1e-7
# scikit-learn always regularises; at this C the L2 term is negligible next to the log-loss of a
# validation split, so the fit is maximum likelihood on Platt's smoothed targets, as he defined it.
UNREGULARISED_C = 1e6


class Calibration(BaseModel):
    """How one output's raw score becomes a probability, and how well that worked on validation.

    ``method`` "platt": ``sigmoid(slope * logit(score) + intercept)``; "identity": the score as it
    is (segmentation, or a validation split without both classes). ``ece_before``/``ece_after``:
    the expected calibration error of the raw and the calibrated scores on the data it was fitted
    on (``None`` where not measured), over ``bins`` equal-width bins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["platt", "identity"] = "identity"
    slope: float = Field(1.0, ge=0)
    intercept: float = 0.0
    ece_before: float | None = Field(None, ge=0, le=1)
    ece_after: float | None = Field(None, ge=0, le=1)
    bins: int = Field(BINS, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> Calibration:
        if not (math.isfinite(self.slope) and math.isfinite(self.intercept)):
            raise ValueError(f"calibration slope and intercept must be finite, got {self.slope}, {self.intercept}")
        if self.method == "identity" and (self.slope, self.intercept) != (1.0, 0.0):
            raise ValueError("an identity calibration has slope 1 and intercept 0")
        return self

    def apply(self, p: npt.ArrayLike) -> np.ndarray:
        """Calibrated probabilities of raw scores ``p`` (any shape, values in [0, 1]), as float64.

        Non-decreasing in ``p`` (the slope is never negative), so the highest slice stays the
        highest and a study score may be calibrated before or after taking the maximum.
        """
        scores = np.asarray(p, dtype=np.float64)
        if self.method == "identity":
            return scores
        return np.asarray(expit(self.slope * logit(np.clip(scores, EPSILON, 1 - EPSILON)) + self.intercept))


def _probabilities(probs: npt.ArrayLike, name: str) -> np.ndarray:
    values = np.asarray(probs, dtype=np.float64)
    if values.ndim != 1 or not (np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()):
        raise ValueError(f"{name} must be a 1-D array of probabilities within [0, 1]")
    return values


def expected_calibration_error(truth: npt.ArrayLike, probs: npt.ArrayLike, bins: int = BINS) -> float:
    """ECE = sum over bins of (cases in bin / cases) * |positive fraction - mean probability|.

    Bins are ``bins`` equal-width intervals ``(k/bins, (k+1)/bins]``, the first closed at 0. It is
    defined with one class too (it then measures how close the probabilities stay to 0 or 1).
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    y, _ = binary_inputs(truth, probs)
    p = _probabilities(probs, "probs")
    which = np.clip(np.ceil(p * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, weights=y.astype(np.float64), minlength=bins)
                 - np.bincount(which, weights=p, minlength=bins))
    return float(gap.sum() / count.sum())


def platt_targets(y: np.ndarray) -> np.ndarray:
    """Platt's (1999) smoothed targets: ``(N+ + 1) / (N+ + 2)`` for positives, ``1 / (N- + 2)`` for
    negatives, the posterior means under a uniform prior. With hard 0/1 targets a validation split
    the model separates perfectly has no finite maximum: the slope runs off and the "probability"
    becomes a step from 0 to 1 (seen here: a threshold of 0.999999 at AUC 1.0). The smoothed
    targets keep the slope finite, and say how sure a few dozen cases can make anyone."""
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    return np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))


def fit_platt(truth: npt.ArrayLike, scores: npt.ArrayLike, bins: int = BINS) -> Calibration:
    """Platt scaling of ``scores`` against ``truth``, with its ECE before and after.

    A logistic regression on ``logit(score)`` against :func:`platt_targets`, effectively
    unregularised; the soft targets are fitted exactly by giving each case once as a positive
    (weight ``t``) and once as a negative (weight ``1 - t``). Without both classes
    there is nothing to fit, and the identity is returned. A fitted slope below zero (the score
    ranks the cases the wrong way round) carries no usable ordering: the calibrated probability is
    then the observed frequency whatever the score (slope 0).
    """
    y, _ = binary_inputs(truth, scores)
    p = _probabilities(scores, "scores")
    ece = expected_calibration_error(y, p, bins)
    if y.all() or not y.any():
        return Calibration(method="identity", ece_before=ece, ece_after=ece, bins=bins)
    z = logit(np.clip(p, EPSILON, 1 - EPSILON))[:, None]
    t = platt_targets(y)
    fit = LogisticRegression(C=UNREGULARISED_C, tol=1e-10, max_iter=10_000).fit(
        np.vstack([z, z]), np.concatenate([np.ones(len(y)), np.zeros(len(y))]), sample_weight=np.concatenate([t, 1 - t]))
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if slope < 0:
        slope, intercept = 0.0, float(logit(y.mean()))
    mapping = Calibration(method="platt", slope=slope, intercept=intercept, bins=bins)
    after = expected_calibration_error(y, mapping.apply(p), bins)
    return Calibration(method="platt", slope=slope, intercept=intercept, ece_before=ece, ece_after=after, bins=bins)
