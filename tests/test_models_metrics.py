"""Evaluation metrics (models/metrics.py) against scikit-learn, hand-computed values and published
examples, and the report writer (models/report.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from models.metrics import (
    auc_ci,
    bootstrap_ci,
    dice,
    lesion_detection,
    lesions,
    mean_ci,
    roc_auc,
    roc_curve,
    sensitivity_specificity,
    summarise_classification,
    summarise_segmentation,
    threshold_for_sensitivity,
    wilson_ci,
    youden_threshold,
)
from models.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hanley & McNeil (Radiology 1982), Table 1: 109 CT images rated on a 5-point scale
# (1 = definitely normal ... 5 = definitely abnormal). Published AUC 0.893, SE 0.032.
HM_NORMAL = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
HM_ABNORMAL = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
HM_LABELS = np.r_[np.zeros(HM_NORMAL.size, int), np.ones(HM_ABNORMAL.size, int)]
HM_SCORES = np.r_[HM_NORMAL, HM_ABNORMAL].astype(float)


def _random_case(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    scores = rng.normal(size=n) + 1.2 * labels
    if ties:
        scores = np.round(scores, 1)  # ~60 distinct values for 300 cases: many ties across classes
    return labels, scores


CASES = {
    "fixed": (np.array([0, 0, 1, 1, 0, 1, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.65, 0.3])),
    "fixed_ties": (np.array([0, 1, 0, 1, 1, 0]), np.array([0.5, 0.5, 0.2, 0.7, 0.2, 0.9])),
    "random": _random_case(1),
    "random_ties": _random_case(2, ties=True),
    "small_rare": _random_case(3, n=40),
}


# --------------------------------------------------------------------------------------------------
# ROC


@pytest.mark.parametrize("case", CASES)
def test_roc_auc_matches_sklearn(case: str) -> None:
    labels, scores = CASES[case]
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), rel=1e-12, abs=1e-12)
    # bool labels mean the same
    assert roc_auc(labels.astype(bool), scores) == pytest.approx(skm.roc_auc_score(labels, scores), rel=1e-12)


def test_roc_auc_ties_count_half() -> None:
    # positive 0.5 vs negative 0.5 is a tie (half), everything else is ordered: (1 + 0.5 + 2) / 4
    labels, scores = [0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]
    assert roc_auc(labels, scores) == 0.875
    assert roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5
    assert skm.roc_auc_score(labels, scores) == 0.875


@pytest.mark.parametrize("case", CASES)
def test_roc_curve_matches_sklearn(case: str) -> None:
    labels, scores = CASES[case]
    fpr, tpr, thr = roc_curve(labels, scores)
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(thr, ref_thr)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-15)
    assert thr[0] == np.inf and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    # the documented meaning of each point: predict positive when score >= threshold
    y = np.asarray(labels, bool)
    for k in (1, len(thr) // 2, len(thr) - 1):
        pred = np.asarray(scores) >= thr[k]
        assert tpr[k] == (pred & y).sum() / y.sum()
        assert fpr[k] == (pred & ~y).sum() / (~y).sum()
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores), rel=1e-12)


@pytest.mark.parametrize(
    "fn",
    [
        roc_auc,
        roc_curve,
        auc_ci,
        lambda y, s: sensitivity_specificity(y, s, 0.5),
        youden_threshold,
    ],
)
def test_one_class_raises(fn) -> None:
    with pytest.raises(ValueError, match="only one class"):
        fn([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="only one class"):
        fn([0, 0, 0], [0.2, 0.5, 0.9])


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "0/1 or bool"),
        ([0, 1, -1], [0.1, 0.2, 0.3], "0/1 or bool"),
        (["a", "b", "a"], [0.1, 0.2, 0.3], "0/1 or bool"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], "finite"),
        ([0, 1, 1], [0.1, 0.2], "length"),
        ([], [], "empty"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_invalid_inputs_raise(labels, scores, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        roc_auc(labels, scores)


# --------------------------------------------------------------------------------------------------
# Confidence intervals


def _delong_bruteforce(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """DeLong 1988 as written: the O(n_pos * n_neg) kernel matrix, no ranks."""
    pos = scores[labels == 1][:, None]
    neg = scores[labels == 0][None, :]
    psi = (pos > neg) + 0.5 * (pos == neg)
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size
    return float(psi.mean()), math.sqrt(var)


@pytest.mark.parametrize("case", ["fixed", "fixed_ties", "random", "random_ties", "small_rare"])
def test_delong_matches_definition(case: str) -> None:
    labels, scores = CASES[case]
    auc, low, high = auc_ci(labels, scores, level=0.95)
    ref_auc, ref_se = _delong_bruteforce(np.asarray(labels), np.asarray(scores, float))
    assert auc == pytest.approx(ref_auc, rel=1e-12)
    z = 1.959963984540054
    assert low == pytest.approx(max(0.0, ref_auc - z * ref_se), rel=1e-9)
    assert high == pytest.approx(min(1.0, ref_auc + z * ref_se), rel=1e-9)
    assert low < auc < high


def test_delong_hanley_mcneil_published_example() -> None:
    auc, low, high = auc_ci(HM_LABELS, HM_SCORES)
    assert round(auc, 3) == 0.893
    # Hanley & McNeil's SE (0.032) comes from their exponential approximation, not DeLong's
    # structural components, so only close agreement is expected (DeLong gives 0.0307 here).
    se = (high - low) / (2 * 1.959963984540054)
    assert se == pytest.approx(0.032, abs=0.002)


def test_delong_agrees_with_stratified_bootstrap() -> None:
    labels, scores = CASES["random_ties"]
    auc, low, high = auc_ci(labels, scores)
    b_auc, b_low, b_high = bootstrap_ci(roc_auc, labels, scores, n=2000, seed=7, stratify=labels)
    assert b_auc == pytest.approx(auc, rel=1e-12)
    assert b_low == pytest.approx(low, abs=0.02)
    assert b_high == pytest.approx(high, abs=0.02)
    assert (b_high - b_low) == pytest.approx(high - low, rel=0.2)


def test_auc_ci_level_and_clipping() -> None:
    labels, scores = CASES["random"]
    _, low95, high95 = auc_ci(labels, scores, 0.95)
    _, low99, high99 = auc_ci(labels, scores, 0.99)
    assert low99 < low95 and high99 > high95
    # perfect separation: variance 0, interval collapses and never leaves [0, 1]
    assert auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0, 1.0)
    _, _, high = auc_ci([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.85, 0.8, 0.9, 0.95])
    assert high == 1.0
    with pytest.raises(ValueError, match="at least two"):
        auc_ci([0, 0, 1], [0.1, 0.2, 0.9])
    with pytest.raises(ValueError, match="level"):
        auc_ci(labels, scores, 1.5)


def test_bootstrap_ci_mean_normal_theory_and_determinism() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(10.0, 2.0, size=400)
    est, low, high = bootstrap_ci(np.mean, x, n=2000, seed=1)
    assert est == pytest.approx(x.mean())
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert low == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert high == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)
    assert bootstrap_ci(np.mean, x, n=2000, seed=1) == (est, low, high)
    assert bootstrap_ci(np.mean, x, n=2000, seed=2) != (est, low, high)
    _, low90, high90 = bootstrap_ci(np.mean, x, n=2000, seed=1, level=0.90)
    assert low < low90 < high90 < high


def test_bootstrap_ci_pairs_rows_and_stratifies() -> None:
    labels = np.array([1] * 5 + [0] * 45)
    ids = np.arange(50)
    # rows stay paired: the label drawn with id i is always labels[i]
    _, low, high = bootstrap_ci(lambda y, i: float(np.all(labels[i] == y)), labels, ids, n=200)
    assert low == high == 1.0
    # stratified resamples keep 5 positives; unstratified ones vary
    assert bootstrap_ci(np.sum, labels, n=500, stratify=labels)[1:] == (5.0, 5.0)
    _, low, high = bootstrap_ci(np.sum, labels, n=500)
    assert low < 5.0 < high


def test_bootstrap_ci_drops_failed_resamples_and_refuses_mostly_failed() -> None:
    labels = np.array([1, 0] + [0] * 8)
    scores = np.linspace(0, 1, 10)
    # ~35% of unstratified resamples have no positive: dropped, not counted as 0.5 or crashed on
    est, low, high = bootstrap_ci(roc_auc, labels, scores, n=500)
    assert est == roc_auc(labels, scores) and 0.0 <= low <= high <= 1.0
    # a statistic that is NaN on ~70% of resamples (first drawn row >= 3) gives no interval
    with pytest.raises(ValueError, match="failed on"):
        bootstrap_ci(lambda x: float(x[0]) if x[0] < 3 else math.nan, np.arange(10), n=200)
    # ... while at ~30% it still does, from the surviving resamples only
    assert bootstrap_ci(lambda x: float(x[0]) if x[0] < 7 else math.nan, np.arange(10), n=200)[1:] == (
        0.0,
        6.0,
    )


def test_wilson_ci_hand_computed() -> None:
    # 8/10 at 95%: centre (0.8 + z^2/20) / (1 + z^2/10), half-width z/(1 + z^2/10) * sqrt(0.016 + z^2/400)
    low, high = wilson_ci(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-5)
    assert high == pytest.approx(0.94332, abs=1e-5)
    # 0/10: the upper bound is z^2/n / (1 + z^2/n) = 0.27753; the lower bound is exactly 0
    assert wilson_ci(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    assert wilson_ci(10, 10) == (pytest.approx(1 - 0.27753, abs=1e-5), 1.0)
    # symmetry in successes/failures, and narrower at lower confidence
    low3, high3 = wilson_ci(3, 17)
    low14, high14 = wilson_ci(14, 17)
    assert low3 == pytest.approx(1 - high14) and high3 == pytest.approx(1 - low14)
    low90, high90 = wilson_ci(8, 10, 0.90)
    assert low < low90 < high90 < high
    for bad in [(11, 10), (-1, 10), (0, 0)]:
        with pytest.raises(ValueError):
            wilson_ci(*bad)


def test_mean_ci_hand_computed() -> None:
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445: 3 +- 2.776445 * sqrt(2.5) / sqrt(5)
    mean, low, high = mean_ci([1, 2, 3, 4, 5])
    assert mean == 3.0
    assert low == pytest.approx(1.036757, abs=1e-6)
    assert high == pytest.approx(4.963243, abs=1e-6)
    mean, low, high = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError):
        mean_ci([])


# --------------------------------------------------------------------------------------------------
# Operating points


@pytest.mark.parametrize("case", CASES)
def test_sensitivity_specificity_match_confusion_matrix(case: str) -> None:
    labels, scores = CASES[case]
    for threshold in [*np.quantile(scores, [0.1, 0.5, 0.9]), float(np.asarray(scores)[0])]:
        tn, fp, fn, tp = skm.confusion_matrix(labels, np.asarray(scores) >= threshold, labels=[0, 1]).ravel()
        sens, spec = sensitivity_specificity(labels, scores, threshold)
        assert sens == tp / (tp + fn)
        assert spec == tn / (tn + fp)
        assert sens == skm.recall_score(labels, np.asarray(scores) >= threshold)


def test_threshold_is_inclusive() -> None:
    # a score equal to the threshold is called positive
    assert sensitivity_specificity([0, 1], [0.4, 0.6], 0.6) == (1.0, 1.0)
    assert sensitivity_specificity([0, 1], [0.4, 0.6], 0.6000001) == (0.0, 1.0)


def test_threshold_for_sensitivity_hand_example() -> None:
    labels = np.array([1] * 10 + [0] * 5)
    scores = np.r_[np.arange(1, 11) / 10, [0.05, 0.15, 0.45, 0.55, 0.95]]
    # 7 of 10 positives score >= 0.4
    assert threshold_for_sensitivity(labels, scores, 0.7) == 0.4
    assert threshold_for_sensitivity(labels, scores, 0.71) == 0.3
    assert threshold_for_sensitivity(labels, scores, 1.0) == 0.1
    assert threshold_for_sensitivity(labels, scores, 0.05) == 1.0
    # 0.28 * 25 is 7.000000000000001 in floating point, yet 7 of 25 positives reach 0.28 exactly
    many = np.arange(1, 26) / 25
    assert threshold_for_sensitivity(np.ones(25, int), many, 0.28) == many[-7]
    assert sensitivity_specificity(np.r_[np.ones(25, int), 0], np.r_[many, 0.0], many[-7])[0] == 0.28
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match="target"):
            threshold_for_sensitivity(labels, scores, bad)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_for_sensitivity_against_sklearn(case: str, target: float) -> None:
    labels, scores = CASES[case]
    t = threshold_for_sensitivity(labels, scores, target)
    _, tpr, thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    assert t == thr[tpr >= target].max()
    assert sensitivity_specificity(labels, scores, t)[0] >= target
    assert sensitivity_specificity(labels, scores, np.nextafter(t, np.inf))[0] < target


@pytest.mark.parametrize("case", CASES)
def test_youden_threshold_against_sklearn(case: str) -> None:
    labels, scores = CASES[case]
    fpr, tpr, thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # the +inf point is not an operating point
    j = tpr - fpr
    expected = thr[np.flatnonzero(j == j.max())].max()  # ties: the highest threshold
    assert youden_threshold(labels, scores) == expected
    sens, spec = sensitivity_specificity(labels, scores, expected)
    assert sens + spec - 1 == pytest.approx(j.max())


# --------------------------------------------------------------------------------------------------
# Segmentation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_equals_f1(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.random((8, 16, 16)) < 0.2
    pred = truth ^ (rng.random(truth.shape) < 0.1)
    assert dice(pred, truth) == pytest.approx(skm.f1_score(truth.ravel(), pred.ravel()), rel=1e-12)
    assert dice(pred.astype(np.uint8) * 3, truth.astype(np.float32)) == dice(pred, truth)  # non-zero = fg


def test_dice_empty_and_disjoint() -> None:
    empty = np.zeros((4, 4, 4), bool)
    one = empty.copy()
    one[1, 1, 1] = True
    assert dice(empty, empty) == 1.0
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0
    assert dice(one, one) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice(one, np.zeros((4, 4, 5), bool))


def test_lesions_26_connectivity_joins_corner_neighbours() -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touch only at a corner
    mask[4, 4, 4] = True  # separate: two voxels away from (2, 2, 2)
    found = lesions(mask)
    assert [les.voxels for les in found] == [2, 1]
    assert found[0].centroid == (1.5, 1.5, 1.5)
    assert found[0].bbox == ((1, 3), (1, 3), (1, 3))
    assert found[1].bbox == ((4, 5), (4, 5), (4, 5))
    assert lesions(np.zeros((3, 3, 3))) == []


def test_lesion_volume_uses_anisotropic_spacing() -> None:
    mask = np.zeros((6, 8, 8), bool)
    mask[1:3, 2:5, 3:7] = True  # 2 x 3 x 4 = 24 voxels
    (lesion,) = lesions(mask, spacing=(3.0, 0.5, 0.25))
    assert lesion.voxels == 24
    assert lesion.volume_mm3 == pytest.approx(24 * 3.0 * 0.5 * 0.25)
    assert lesion.centroid == pytest.approx((1.5, 3.0, 4.5))
    box = tuple(slice(*r) for r in lesion.bbox)
    assert mask[box].all() and mask[box].sum() == mask.sum()
    with pytest.raises(ValueError, match="spacing"):
        lesions(mask, spacing=(1.0, 1.0))


def _two_lesion_case() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((10, 20, 20), bool)
    truth[2:4, 2:5, 2:5] = True  # lesion A: 18 voxels
    truth[6:8, 12:15, 12:15] = True  # lesion B: 18 voxels
    pred = np.zeros_like(truth)
    pred[3:5, 3:6, 3:6] = True  # overlaps A by 1 x 2 x 2 = 4 voxels
    pred[7:9, 1:3, 15:18] = True  # touches nothing: a false positive
    return pred, truth


def test_lesion_detection_counts() -> None:
    pred, truth = _two_lesion_case()
    counts = lesion_detection(pred, truth, spacing=(2.0, 1.0, 1.0))
    assert counts.truth_lesions == 2 and counts.detected_lesions == 1 and counts.missed_lesions == 1
    assert counts.detected == (True, False)
    assert counts.sensitivity == 0.5
    assert counts.predicted_components == 2 and counts.false_positives == 1
    assert counts.false_positive == (False, True)
    assert counts.to_dict()["missed_volumes_mm3"] == [36.0]
    # a required overlap above the 4 shared voxels turns the hit into a miss and a false positive
    strict = lesion_detection(pred, truth, spacing=(2.0, 1.0, 1.0), min_overlap_voxels=5)
    assert strict.sensitivity == 0.0 and strict.false_positives == 2


def test_lesion_detection_one_component_over_two_lesions_and_empty_truth() -> None:
    truth = np.zeros((4, 12, 12), bool)
    truth[1, 1:3, 1:3] = True
    truth[1, 1:3, 8:10] = True
    pred = np.zeros_like(truth)
    pred[1, 2, 1:10] = True  # one bar across both lesions
    counts = lesion_detection(pred, truth)
    assert counts.sensitivity == 1.0 and counts.false_positives == 0 and counts.predicted_components == 1
    none = lesion_detection(pred, np.zeros_like(truth))
    assert none.sensitivity is None and none.false_positives == 1


def test_summarise_segmentation() -> None:
    pred, truth = _two_lesion_case()
    hit = lesion_detection(truth, truth)  # 2 of 2, no FP
    half = lesion_detection(pred, truth)  # 1 of 2, 1 FP
    clean = lesion_detection(np.zeros_like(truth), np.zeros_like(truth))  # no lesions at all
    summary = summarise_segmentation([1.0, 0.2, 1.0], [hit, half, clean])
    assert summary["cases"] == 3
    assert summary["dice"] == pytest.approx(2.2 / 3)
    assert summary["dice_median"] == 1.0
    assert summary["truth_lesions"] == 4 and summary["detected_lesions"] == 3
    assert summary["lesion_sensitivity"] == 0.75  # pooled over lesions, not the mean of 1.0 and 0.5
    low, high = summary["lesion_sensitivity_ci"]
    assert 0.5 <= low <= 0.75 <= high <= 1.0
    assert summary["false_positives"] == 1 and summary["fp_per_case"] == pytest.approx(1 / 3)
    # the t intervals of Dice [1, 0.2, 1] (-0.41 to 1.88) and FP [0, 1, 0] leave the possible range: clipped
    raw = mean_ci([1, 0.2, 1])
    assert raw[1] < 0 and raw[2] > 1 and summary["dice_ci"] == [0.0, 1.0]
    assert summary["fp_per_case_ci"][0] == 0.0
    single = summarise_segmentation([0.9], [half])
    assert single["dice"] == 0.9 and single["dice_ci"] is None and single["fp_per_case_ci"] is None
    with pytest.raises(ValueError):
        summarise_segmentation([1.0], [hit, half])


# --------------------------------------------------------------------------------------------------
# Summary and report


def test_summarise_classification() -> None:
    labels_a, scores_a = CASES["random"]
    labels_b, scores_b = CASES["random_ties"]
    summary = summarise_classification(
        {"effusion": labels_a, "nodule": labels_b, "absent": np.zeros(5, int)},
        {"effusion": scores_a, "nodule": scores_b, "absent": np.linspace(0, 1, 5)},
        {"effusion": 0.5, "nodule": 0.3, "absent": 0.5},
    )
    assert list(summary) == ["effusion", "nodule", "absent"]
    eff = summary["effusion"]
    assert eff["n"] == labels_a.size and eff["positives"] == labels_a.sum()
    assert eff["auc"] == pytest.approx(skm.roc_auc_score(labels_a, scores_a))
    assert eff["auc_ci"] == list(auc_ci(labels_a, scores_a)[1:])
    tn, fp, fn, tp = skm.confusion_matrix(labels_a, scores_a >= 0.5).ravel()
    assert (eff["tn"], eff["fp"], eff["fn"], eff["tp"]) == (tn, fp, fn, tp)
    assert eff["sensitivity"] == tp / (tp + fn) and eff["specificity"] == tn / (tn + fp)
    assert eff["sensitivity_ci"] == list(wilson_ci(int(tp), int(tp + fn)))
    assert summary["nodule"]["threshold"] == 0.3
    absent = summary["absent"]
    assert (
        absent["auc"] is None and absent["sensitivity"] is None and absent["specificity"] == 0.4
    )  # 0.5, 0.75, 1.0 >= 0.5
    json.dumps(summary, allow_nan=False)  # plain types only
    with pytest.raises(ValueError, match="threshold"):
        summarise_classification({"a": labels_a}, {"a": scores_a}, {})
    with pytest.raises(ValueError, match="different findings"):
        summarise_classification({"a": labels_a}, {"b": scores_a}, {"a": 0.5})


def test_write_report(tmp_path: Path) -> None:
    results = {
        "model": "cxr-densenet",
        "ci_level": 0.95,
        "classification": {
            "effusion": {"n": 200, "auc": 0.91234567, "auc_ci": [0.8712, 0.9481], "sensitivity": None},
            "nodule": {"n": 200, "auc": 0.7, "auc_ci": [0.61, 0.79], "sensitivity": 0.8},
        },
        "segmentation": {"dice": 0.8, "dice_ci": [0.75, 0.85], "fp_per_case": float("nan")},
        "seeds": np.array([0, 1, 2]),
    }
    labels, scores = CASES["random"]
    fpr, tpr, _ = roc_curve(labels, scores)
    robustness: dict[str, dict[str, list[tuple[float, float]]]] = {
        "rotation_deg": {"auc": [(-30, 0.80), (-15, 0.85), (0, 0.90), (15, 0.86), (30, 0.79)]},
        "gamma": {"auc": [(0.8, 0.88), (1.0, 0.90), (1.2, 0.87)], "sensitivity": [(1.0, 0.9)]},
    }
    out = tmp_path / "eval"
    paths = write_report(out, "CXR evaluation", results, roc={"effusion": (fpr, tpr)}, robustness=robustness)
    assert paths == {
        "json": out / "results.json",
        "markdown": out / "report.md",
        "roc": out / "roc.png",
        "robustness": out / "robustness.png",
    }

    text = paths["json"].read_text()
    data = json.loads(text)
    assert data["classification"]["effusion"]["auc"] == 0.912346  # 6 significant digits
    assert data["segmentation"]["fp_per_case"] is None  # NaN is not JSON
    assert data["seeds"] == [0, 1, 2]
    assert data["robustness_curves"]["rotation_deg"]["auc"][0] == [-30, 0.8]
    assert list(data) == sorted(data)
    assert text.index('"auc"') < text.index('"auc_ci"') < text.index('"n"')  # nested keys sorted too

    md = paths["markdown"].read_text()
    assert md.startswith("# CXR evaluation\n")
    assert "- **model**: cxr-densenet" in md
    assert "| effusion | 200 | 0.912 (0.871-0.948) | n/a |" in md
    assert "| nodule | 200 | 0.700 (0.610-0.790) | 0.800 |" in md
    assert "| dice | 0.800 (0.750-0.850) |" in md and "dice_ci" not in md
    assert "| fp_per_case | n/a |" in md
    assert "| -30 | 0.800 |" in md  # robustness table
    assert "| 0.8 | 0.880 | n/a |" in md  # gamma 0.8 has no sensitivity point
    assert "![ROC curves](roc.png)" in md and "![Robustness](robustness.png)" in md

    for key in ("roc", "robustness"):
        blob = paths[key].read_bytes()
        assert blob.startswith(PNG_SIGNATURE) and len(blob) > 5000


def test_write_report_without_plots(tmp_path: Path) -> None:
    paths = write_report(tmp_path, "Minimal", {"a": 1})
    assert set(paths) == {"json", "markdown"}
    assert not list(tmp_path.glob("*.png"))
    assert json.loads(paths["json"].read_text()) == {"a": 1}
    with pytest.raises(ValueError, match="robustness_curves"):
        write_report(tmp_path, "x", {"robustness_curves": 1}, robustness={"gamma": {"auc": [(1.0, 0.9)]}})
