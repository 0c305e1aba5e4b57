"""Evaluation metrics for the finetuned models: ROC analysis with confidence intervals, operating
points, and lesion-level segmentation scores.

The ROC curve and its area are scikit-learn's (``roc_curve``, ``roc_auc_score``), behind this
module's input checks; what scikit-learn lacks is here: DeLong's and Wilson's intervals, the
bootstrap, operating points and the lesion-level scores. The tests check every number against
scikit-learn or published values.

Conventions, chosen so that every function answers the same question the same way:

* Labels are binary: ``0``/``1`` or ``False``/``True``; anything else is a ``ValueError`` (a label
  of ``2`` or ``-1`` is an upstream bug or an "uncertain" label that the caller must resolve).
  Scores must be finite: a NaN score would silently sort to one end and bias the AUC.
* A case is predicted positive when ``score >= threshold``. The same rule is used by
  :func:`sensitivity_specificity`, :func:`threshold_for_sensitivity`, :func:`youden_threshold`
  and the thresholds of :func:`roc_curve`, so a threshold chosen on validation data means exactly
  the same thing when it is applied to test data.
* Ties in scores count half (Mann-Whitney midranks), as scikit-learn's trapezoidal AUC does.
* Undefined quantities raise ``ValueError`` naming the problem in the point metrics; the
  ``summarise_*`` functions, which feed reports, record them as ``None`` instead so one finding
  without positives in a test split cannot abort a whole evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage, stats
from sklearn import metrics as skm

__all__ = [
    "Lesion",
    "LesionCounts",
    "auc_ci",
    "binary_inputs",
    "bootstrap_ci",
    "dice",
    "lesion_detection",
    "lesions",
    "mean_ci",
    "roc_auc",
    "roc_curve",
    "sensitivity_specificity",
    "summarise_classification",
    "summarise_segmentation",
    "threshold_for_sensitivity",
    "wilson_ci",
    "youden_threshold",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------------------------------
# Input checking


def binary_inputs(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[BoolArray, FloatArray]:
    """Validate and convert (labels, scores) to (bool, float64) 1-D arrays of equal length."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number):
            raise ValueError(f"labels must be 0/1 or bool, got dtype {y.dtype}")
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            raise ValueError(f"labels must be 0/1 or bool, found {np.unique(y[bad])[:5].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite, found {int((~np.isfinite(s)).sum())} NaN/inf value(s)")
    return y.astype(bool), s


def _require_both_classes(y: BoolArray) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        present = "positive" if n_pos else "negative"
        raise ValueError(
            f"only one class present ({y.size} {present} labels): ROC metrics need both positives and negatives"
        )
    return n_pos, n_neg


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(stats.norm.ppf(0.5 + level / 2.0))


# --------------------------------------------------------------------------------------------------
# ROC analysis


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve: scikit-learn's ``roc_auc_score`` (trapezoidal, so tied scores
    count half). Raises ``ValueError`` if only one class is present: the AUC is then undefined, not
    0.5. About 2 ms a call, which only matters inside a bootstrap; intervals here use DeLong's
    closed form instead (:func:`auc_ci`).
    """
    y, s = binary_inputs(labels, scores)
    _require_both_classes(y)
    return float(skm.roc_auc_score(y, s))


def roc_curve(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ROC curve points (fpr, tpr, thresholds) at every distinct score, highest threshold first.

    scikit-learn's ``roc_curve(labels, scores, drop_intermediate=False)``: point ``i`` is the
    (false positive rate, true positive rate) of predicting ``score >= thresholds[i]``, and the
    first point (0, 0) has threshold ``+inf`` (nothing is called positive). Unlike scikit-learn,
    a single-class input raises ``ValueError`` instead of warning and returning NaN rates.
    Collinear points are kept, so the curve can be re-thresholded exactly.
    """
    y, s = binary_inputs(labels, scores)
    _require_both_classes(y)
    fpr, tpr, thresholds = skm.roc_curve(y, s, drop_intermediate=False)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)


def _delong_se(y: BoolArray, s: FloatArray) -> tuple[float, float]:
    """(AUC, standard error) by DeLong's structural components, in the fast midrank form.

    DeLong, DeLong & Clarke-Pearson (Biometrics 1988); the O(n log n) midrank computation is
    Sun & Xu (IEEE Signal Processing Letters 2014). For each positive, V10 is the fraction of
    negatives it outranks (ties half); for each negative, V01 is the fraction of positives that
    outrank it. var(AUC) = var(V10)/n_pos + var(V01)/n_neg.
    """
    n_pos, n_neg = _require_both_classes(y)
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            f"DeLong's variance needs at least two positives and two negatives, got {n_pos} and {n_neg}"
        )
    pos, neg = s[y], s[~y]
    ranks_all = stats.rankdata(np.concatenate((pos, neg)))
    v10 = (ranks_all[:n_pos] - stats.rankdata(pos)) / n_neg
    v01 = 1.0 - (ranks_all[n_pos:] - stats.rankdata(neg)) / n_pos
    auc = float(v10.mean())
    var = float(np.var(v10, ddof=1)) / n_pos + float(np.var(v01, ddof=1)) / n_neg
    return auc, math.sqrt(max(var, 0.0))


def auc_ci(labels: npt.ArrayLike, scores: npt.ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """(AUC, low, high): the AUC with DeLong's asymptotic normal confidence interval.

    DeLong's method is deterministic and closed-form, so a report is reproducible without a seed
    and costs nothing to compute per finding; on moderate samples it agrees with a stratified
    bootstrap (see :func:`bootstrap_ci`). The interval is ``auc +- z * se`` clipped to [0, 1],
    as pROC's ``ci.auc(method="delong")``. Known limitation: with perfect separation the
    variance is 0 and the interval collapses to the point; treat it as unreliable near 0 or 1 on
    small samples. Needs at least two positives and two negatives.
    """
    y, s = binary_inputs(labels, scores)
    auc, se = _delong_se(y, s)
    half = _z(level) * se
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: npt.ArrayLike,
    n: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    stratify: npt.ArrayLike | None = None,
) -> tuple[float, float, float]:
    """(estimate, low, high): a percentile bootstrap interval of ``statistic(*arrays)``.

    All arrays are resampled with the same row indices (cases stay paired, e.g. labels with
    scores, or per-case counts). With ``stratify`` (one group label per row) each group is
    resampled within itself, keeping group sizes fixed, so e.g. every resample of an AUC keeps
    its number of positives. The generator is seeded, so the interval is reproducible.

    Resamples on which the statistic raises ``ValueError`` or returns a non-finite value (an
    unstratified AUC resample with one class) are dropped; if more than half are dropped the
    interval is meaningless and ``ValueError`` is raised. ``estimate`` is the statistic on the
    original data, not the bootstrap mean.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    alpha = 1.0 - level
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    data = [np.asarray(a) for a in arrays]
    size = data[0].shape[0] if data[0].ndim else 0
    if size == 0 or any(a.ndim == 0 or a.shape[0] != size for a in data):
        raise ValueError(
            f"arrays must be non-empty with equal first dimensions, got {[a.shape for a in data]}"
        )
    rng = np.random.default_rng(seed)
    if stratify is None:
        indices = rng.integers(0, size, size=(n, size))
    else:
        groups = np.asarray(stratify)
        if groups.shape != (size,):
            raise ValueError(f"stratify must have shape ({size},), got {groups.shape}")
        indices = np.empty((n, size), dtype=np.intp)
        start = 0
        for group in np.unique(groups):
            members = np.flatnonzero(groups == group)
            indices[:, start : start + members.size] = members[
                rng.integers(0, members.size, (n, members.size))
            ]
            start += members.size
    estimate = float(statistic(*data))
    values = []
    for row in indices:
        try:
            value = float(statistic(*(a[row] for a in data)))
        except ValueError:
            continue
        if math.isfinite(value):
            values.append(value)
    if len(values) * 2 < n:
        raise ValueError(f"the statistic failed on {n - len(values)} of {n} bootstrap resamples")
    low, high = np.quantile(np.asarray(values), [alpha / 2.0, 1.0 - alpha / 2.0])
    return estimate, float(low), float(high)


# --------------------------------------------------------------------------------------------------
# Operating points


def _confusion(y: BoolArray, s: FloatArray, threshold: float) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) for ``score >= threshold``, in scikit-learn's ``confusion_matrix`` order."""
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    return int(y.size - tp - fp - fn), fp, fn, tp


def sensitivity_specificity(
    labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float
) -> tuple[float, float]:
    """(sensitivity, specificity) when predicting positive for ``score >= threshold``.

    Sensitivity = TP / (TP + FN), specificity = TN / (TN + FP), from the same counts as
    scikit-learn's ``confusion_matrix(labels, scores >= threshold)``. Raises ``ValueError`` if
    either class is absent, since one of the two is then undefined.
    """
    y, s = binary_inputs(labels, scores)
    _require_both_classes(y)
    tn, fp, fn, tp = _confusion(y, s, float(threshold))
    return tp / (tp + fn), tn / (tn + fp)


def threshold_for_sensitivity(labels: npt.ArrayLike, scores: npt.ArrayLike, target: float = 0.9) -> float:
    """The largest threshold whose sensitivity (``score >= threshold``) reaches ``target``.

    Meant for choosing a model card's operating point on validation data: the highest threshold
    keeps specificity as high as possible while still catching the required fraction of
    positives. It is always one of the positive cases' scores: the k-th highest, where k is the
    smallest count with k / n_pos >= target (compared exactly as the sensitivity is computed, so
    0.28 of 25 positives is 7, not 8 from ceil(0.28 * 25) = ceil(7.000000000000001)). Any higher threshold
    falls below the target on these data. Only positives determine it; negatives are ignored.
    """
    y, s = binary_inputs(labels, scores)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    pos = np.sort(s[y])[::-1]
    if pos.size == 0:
        raise ValueError("no positive labels: a sensitivity target cannot be met")
    achieved = np.arange(1, pos.size + 1) / pos.size
    k = int(np.argmax(achieved >= target))  # achieved[-1] == 1.0 >= target, so some k matches
    return float(pos[k])


def youden_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 over the ROC points.

    A neutral default operating point when no sensitivity target is given. Among ties the
    highest threshold (fewest positive calls) wins. The ``+inf`` point of :func:`roc_curve` is
    excluded, so the result is always an observed score.
    """
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j = tpr[1:] - fpr[1:]
    return float(thresholds[1:][int(np.argmax(j))])


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """(low, high): Wilson's score interval for a binomial proportion ``successes / n``.

    Used for sensitivity and specificity because, unlike the normal (Wald) interval, it stays
    inside [0, 1] and keeps close to nominal coverage at proportions near 0 or 1 and at the small
    counts of rare findings (Wilson 1927; Brown, Cai & DasGupta 2001).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z = _z(level)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mean_ci(values: npt.ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t confidence interval of a mean.

    For aggregates over a few seeds or over cases (mean Dice, false positives per case), where
    the t quantile on n - 1 degrees of freedom, not the normal one, gives honest width on small n.
    With a single value the interval is undefined and returned as NaN bounds (reported as null).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.isfinite(v).all():
        raise ValueError("mean_ci values must be finite")
    mean = float(v.mean())
    _z(level)  # validates level
    if v.size < 2:
        return mean, math.nan, math.nan
    se = float(v.std(ddof=1)) / math.sqrt(v.size)
    half = float(stats.t.ppf(0.5 + level / 2.0, df=v.size - 1)) * se
    return mean, mean - half, mean + half


# --------------------------------------------------------------------------------------------------
# Segmentation


def _as_mask(mask: npt.ArrayLike, name: str) -> BoolArray:
    m = np.asarray(mask)
    if m.ndim == 0:
        raise ValueError(f"{name} must be an array, got a scalar")
    return m.astype(bool)


def dice(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Dice coefficient 2|P & T| / (|P| + |T|) of two masks (non-zero voxels are foreground).

    Equal to the F1 score of the voxel classification. When both masks are empty the prediction
    is exactly right (a metastasis-free case correctly left blank) and the Dice is defined as 1.0,
    rather than 0/0; a case with an empty truth and any predicted voxel scores 0.
    """
    p, t = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & t)) / total


@dataclass(frozen=True)
class Lesion:
    """One connected component of a mask.

    ``centroid`` is in voxel index coordinates (array axis order, e.g. z, y, x); ``bbox`` holds a
    half-open ``(start, stop)`` index range per axis, so ``mask[tuple(slice(*r) for r in bbox)]``
    crops it.
    """

    label: int
    voxels: int
    volume_mm3: float
    centroid: tuple[float, ...]
    bbox: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "voxels": self.voxels,
            "volume_mm3": self.volume_mm3,
            "centroid": list(self.centroid),
            "bbox": [list(r) for r in self.bbox],
        }


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(x) for x in spacing)
    if len(sp) != ndim:
        raise ValueError(f"spacing has {len(sp)} values for a {ndim}-D mask")
    if not all(math.isfinite(x) and x > 0 for x in sp):
        raise ValueError(f"spacing must be positive, got {sp}")
    return sp


def _label(mask: BoolArray) -> tuple[npt.NDArray[np.int32], int]:
    """Connected components with full connectivity (26 neighbours in 3-D, 8 in 2-D).

    Full connectivity because a small metastasis that is oblique to the voxel grid often touches
    itself only across an edge or a corner; face connectivity would split it into several
    "lesions" and inflate both lesion counts and false positives.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, count = ndimage.label(mask, structure=structure)
    return np.asarray(labelled, dtype=np.int32), int(count)


def _components(labelled: npt.NDArray[np.int32], count: int, spacing: tuple[float, ...]) -> list[Lesion]:
    if count == 0:
        return []
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    centroids = ndimage.center_of_mass(labelled > 0, labelled, range(1, count + 1))
    boxes = ndimage.find_objects(labelled, max_label=count)
    out = []
    for i in range(1, count + 1):
        box = boxes[i - 1]
        assert box is not None  # every label 1..count occurs
        out.append(
            Lesion(
                label=i,
                voxels=int(sizes[i]),
                volume_mm3=int(sizes[i]) * voxel_mm3,
                centroid=tuple(float(c) for c in centroids[i - 1]),
                bbox=tuple((int(sl.start), int(sl.stop)) for sl in box),
            )
        )
    return out


def lesions(mask: npt.ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> list[Lesion]:
    """The connected components of ``mask`` (26-connectivity in 3-D), in label order.

    ``spacing`` is the voxel size in mm along each array axis (one value per dimension), used
    only for ``volume_mm3``; connectivity is on the voxel grid whatever the spacing.
    """
    return label_lesions(mask, spacing)[1]


def label_lesions(mask: npt.ArrayLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)
                  ) -> tuple[npt.NDArray[np.int32], list[Lesion]]:
    """:func:`lesions` plus the label image (0 outside, k inside ``lesions[k-1]``), which a SEG needs."""
    m = _as_mask(mask, "mask")
    sp = _spacing(spacing, m.ndim)
    labelled, count = _label(m)
    return labelled, _components(labelled, count, sp)


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-level detection result of one case.

    ``detected[i]`` says whether ``truth[i]`` was hit; ``false_positive[j]`` whether
    ``predicted[j]`` hit no truth lesion. ``sensitivity`` is ``None`` for a case without truth
    lesions (undefined, and it must not count as 0 or 1 when averaging).
    """

    truth: tuple[Lesion, ...]
    detected: tuple[bool, ...]
    predicted: tuple[Lesion, ...]
    false_positive: tuple[bool, ...]

    @property
    def truth_lesions(self) -> int:
        return len(self.truth)

    @property
    def detected_lesions(self) -> int:
        return sum(self.detected)

    @property
    def missed_lesions(self) -> int:
        return self.truth_lesions - self.detected_lesions

    @property
    def predicted_components(self) -> int:
        return len(self.predicted)

    @property
    def false_positives(self) -> int:
        return sum(self.false_positive)

    @property
    def sensitivity(self) -> float | None:
        return self.detected_lesions / self.truth_lesions if self.truth else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "truth_lesions": self.truth_lesions,
            "detected_lesions": self.detected_lesions,
            "missed_lesions": self.missed_lesions,
            "predicted_components": self.predicted_components,
            "false_positives": self.false_positives,
            "sensitivity": self.sensitivity,
            "missed_volumes_mm3": [les.volume_mm3 for les, hit in zip(self.truth, self.detected) if not hit],
        }


def lesion_detection(
    pred: npt.ArrayLike,
    truth: npt.ArrayLike,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    min_overlap_voxels: int = 1,
) -> LesionCounts:
    """Match predicted components to truth lesions by voxel overlap.

    A truth lesion is detected when some single predicted component shares at least
    ``min_overlap_voxels`` voxels with it; a predicted component is a false positive when it
    shares that many with no truth lesion. One large component covering two lesions detects both
    (the clinically relevant question is whether each metastasis was marked), and two components
    on one lesion are neither an extra detection nor a false positive.
    """
    p, t = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    if min_overlap_voxels < 1:
        raise ValueError(f"min_overlap_voxels must be at least 1, got {min_overlap_voxels}")
    sp = _spacing(spacing, p.ndim)
    lt, nt = _label(t)
    lp, np_ = _label(p)
    both = (lt > 0) & (lp > 0)
    pair = lt[both].astype(np.int64) * (np_ + 1) + lp[both]
    keys, overlaps = np.unique(pair, return_counts=True)
    matched = keys[overlaps >= min_overlap_voxels]
    hit_truth = set((matched // (np_ + 1)).tolist())
    hit_pred = set((matched % (np_ + 1)).tolist())
    return LesionCounts(
        truth=tuple(_components(lt, nt, sp)),
        detected=tuple(i in hit_truth for i in range(1, nt + 1)),
        predicted=tuple(_components(lp, np_, sp)),
        false_positive=tuple(j not in hit_pred for j in range(1, np_ + 1)),
    )


# --------------------------------------------------------------------------------------------------
# Summaries for reports


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _clip(x: float, low: float, high: float) -> float:
    """``x`` limited to [low, high]; NaN (an undefined bound) stays NaN."""
    return x if math.isnan(x) else min(max(x, low), high)


def _interval(low: float, high: float) -> list[float] | None:
    return [low, high] if math.isfinite(low) and math.isfinite(high) else None


def summarise_classification(
    labels: Mapping[str, npt.ArrayLike],
    scores: Mapping[str, npt.ArrayLike],
    thresholds: Mapping[str, float | None],
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Per finding: counts, AUC with DeLong CI, and sensitivity/specificity with Wilson CIs.

    Returns ``{finding: {n, positives, negatives, auc, auc_ci, threshold, sensitivity,
    sensitivity_ci, specificity, specificity_ci, tp, fp, tn, fn}}`` in the order of ``labels``,
    JSON-ready (plain floats and ints; ``[low, high]`` lists). A quantity that the data cannot
    define (AUC without positives, sensitivity without positives, DeLong CI with fewer than two
    of a class) is ``None`` rather than an exception, so one rare finding absent from a test
    split does not abort the whole evaluation; invalid inputs (bad labels, NaN scores, mismatched
    findings) still raise. A threshold of ``None`` (a finding the model makes no call on) leaves
    the call counts and rates ``None``.
    """
    if set(labels) != set(scores):
        raise ValueError(f"labels and scores name different findings: {sorted(set(labels) ^ set(scores))}")
    missing = [name for name in labels if name not in thresholds]
    if missing:
        raise ValueError(f"no threshold for finding(s): {missing}")
    out: dict[str, dict[str, Any]] = {}
    for name in labels:
        y, s = binary_inputs(labels[name], scores[name])
        n_pos = int(y.sum())
        n_neg = int(y.size - n_pos)
        auc: float | None = None
        ci: list[float] | None = None
        if n_pos and n_neg:
            auc = roc_auc(y, s)
            if n_pos >= 2 and n_neg >= 2:
                _, low, high = auc_ci(y, s, level)
                ci = [low, high]
        out[name] = {"n": int(y.size), "positives": n_pos, "negatives": n_neg, "auc": auc, "auc_ci": ci,
                     **_calls(y, s, thresholds[name], level)}
    return out


def _calls(y: BoolArray, s: FloatArray, threshold: float | None, level: float) -> dict[str, Any]:
    """The operating point's counts and rates with Wilson CIs; all ``None`` without a threshold."""
    keys = ("threshold", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "tp", "fp", "tn", "fn")
    if threshold is None:
        return dict.fromkeys(keys)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    tn, fp, fn, tp = _confusion(y, s, float(threshold))
    return {
        "threshold": float(threshold),
        "sensitivity": tp / n_pos if n_pos else None,
        "sensitivity_ci": list(wilson_ci(tp, n_pos, level)) if n_pos else None,
        "specificity": tn / n_neg if n_neg else None,
        "specificity_ci": list(wilson_ci(tn, n_neg, level)) if n_neg else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def summarise_segmentation(
    dice_scores: Sequence[float],
    detections: Sequence[LesionCounts],
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-case Dice and lesion detection aggregated over a test set, JSON-ready.

    ``dice`` is the mean over cases with a t interval (:func:`mean_ci`), clipped to [0, 1] (and the
    false-positive interval to >= 0): on few cases the symmetric t interval can leave the range
    a bounded metric can take. Lesion sensitivity is
    pooled over all truth lesions (detected / total), with a bootstrap interval that resamples
    whole cases: lesions of one patient are correlated, so a Wilson interval over lesions would
    be too narrow. False positives per case is a mean with a t interval.
    """
    if len(dice_scores) != len(detections):
        raise ValueError(f"{len(dice_scores)} Dice scores but {len(detections)} detection results")
    if not detections:
        raise ValueError("no cases to summarise")
    d = np.asarray(dice_scores, dtype=np.float64)
    dice_mean, dice_low, dice_high = mean_ci(d, level)
    dice_low, dice_high = _clip(dice_low, 0.0, 1.0), _clip(dice_high, 0.0, 1.0)
    truth_n = np.array([c.truth_lesions for c in detections], dtype=np.float64)
    hit_n = np.array([c.detected_lesions for c in detections], dtype=np.float64)
    fp_n = np.array([c.false_positives for c in detections], dtype=np.float64)
    fp_mean, fp_low, fp_high = mean_ci(fp_n, level)
    fp_low = _clip(fp_low, 0.0, math.inf)

    def pooled(hit: FloatArray, total: FloatArray) -> float:
        if total.sum() == 0:
            raise ValueError("no truth lesions in resample")
        return float(hit.sum() / total.sum())

    sens: float | None = None
    sens_ci: list[float] | None = None
    if truth_n.sum() > 0:
        sens, low, high = bootstrap_ci(pooled, hit_n, truth_n, seed=seed, level=level)
        sens_ci = [low, high]
    return {
        "cases": len(detections),
        "dice": dice_mean,
        "dice_ci": _interval(dice_low, dice_high),
        "dice_median": float(np.median(d)),
        "truth_lesions": int(truth_n.sum()),
        "detected_lesions": int(hit_n.sum()),
        "lesion_sensitivity": sens,
        "lesion_sensitivity_ci": sens_ci,
        "false_positives": int(fp_n.sum()),
        "fp_per_case": _finite_or_none(fp_mean),
        "fp_per_case_ci": _interval(fp_low, fp_high),
    }
