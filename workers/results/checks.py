"""Input checks: a malformed outcome fails with the argument it concerns, before any DICOM is built.

highdicom would reject some of these deep inside a constructor with a message about its own
parameters; others (a probability of 1.3, a mask one slice short) it would encode silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from workers.outcome import SegmentationOutcome, StudyOutcome
from workers.results.context import MAX_LO


def _unit_interval(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be within [0, 1], got {value!r}")


def _in_study(images: Sequence[Dataset], study_uid: str, name: str) -> None:
    for i, image in enumerate(images):
        if "SOPInstanceUID" not in image or "SOPClassUID" not in image:
            raise ValueError(f"{name}[{i}] has no SOPInstanceUID/SOPClassUID: not a DICOM instance header")
        if str(image.get("StudyInstanceUID", "")) != study_uid:
            raise ValueError(f"{name}[{i}] belongs to another study than outcome.study_uid")


def check_outcome(outcome: StudyOutcome) -> None:
    """Raise ``ValueError`` naming the first field of ``outcome`` that cannot be encoded."""
    if outcome.version < 1:
        raise ValueError(f"outcome.version must be >= 1, got {outcome.version}")
    if not math.isfinite(outcome.completed_at) or outcome.completed_at < 0:
        raise ValueError(f"outcome.completed_at must be epoch seconds >= 0, got {outcome.completed_at!r}")
    for field in ("name", "version"):
        # Both go into LO attributes (model name, software versions) and the series description.
        value = getattr(outcome.card, field)
        if not value or len(value) > MAX_LO or "\\" in value:
            raise ValueError(f"outcome.card.{field} must be 1 to {MAX_LO} characters without a backslash")
    if not outcome.source_images:
        raise ValueError("outcome.source_images is empty: results need the images they describe")
    _in_study(outcome.source_images, outcome.study_uid, "outcome.source_images")
    if not outcome.findings:
        raise ValueError("outcome.findings is empty: the SR needs at least one finding")
    for i, finding in enumerate(outcome.findings):
        _unit_interval(finding.probability, f"outcome.findings[{i}].probability")
        if finding.present is None:
            if finding.threshold is not None or not finding.not_assessed_reason:
                raise ValueError(f"outcome.findings[{i}] has no call: its threshold must be None and its "
                                 "not_assessed_reason must say why")
        else:
            if finding.threshold is None:
                raise ValueError(f"outcome.findings[{i}].threshold is None but the finding has a call")
            _unit_interval(finding.threshold, f"outcome.findings[{i}].threshold")
        _in_study(finding.evidence, outcome.study_uid, f"outcome.findings[{i}].evidence")
    _in_study(outcome.key_images, outcome.study_uid, "outcome.key_images")
    if outcome.segmentation is not None:
        if len(outcome.card.outputs) != 1:
            raise ValueError(
                f"outcome.segmentation is given but the card has {len(outcome.card.outputs)} outputs: "
                "a SEG describes the lesions of exactly one finding"
            )
        check_segmentation(outcome.segmentation, outcome.study_uid)


def check_segmentation(segmentation: SegmentationOutcome, study_uid: str) -> None:
    """The arrays must lie on the source grid and the lesions must be the labels 1..n, in order."""
    name = "outcome.segmentation"
    images = segmentation.source_images
    if not images:
        raise ValueError(f"{name}.source_images is empty")
    _in_study(images, study_uid, f"{name}.source_images")
    if any("Rows" not in image or "Columns" not in image for image in images):
        raise ValueError(f"{name}.source_images must all have Rows and Columns")
    sizes = {(int(image.Rows), int(image.Columns)) for image in images}
    if len(sizes) != 1:
        raise ValueError(f"{name}.source_images must all have the same Rows and Columns, got {sorted(sizes)}")
    expected = (len(images), *sizes.pop())
    for field in ("probability", "labels"):
        array = getattr(segmentation, field)
        if not isinstance(array, np.ndarray) or array.shape != expected:
            shape = getattr(array, "shape", None)
            raise ValueError(
                f"{name}.{field} must have shape (slices, rows, columns) = {expected} of the source images, "
                f"got {shape}"
            )
    if not np.issubdtype(segmentation.labels.dtype, np.integer):
        raise ValueError(f"{name}.labels must be integers, got {segmentation.labels.dtype}")
    if not np.issubdtype(segmentation.probability.dtype, np.floating) or not (
        np.all(np.isfinite(segmentation.probability))
        and float(segmentation.probability.min()) >= 0.0
        and float(segmentation.probability.max()) <= 1.0
    ):
        raise ValueError(f"{name}.probability must be floating point within [0, 1]")
    _unit_interval(segmentation.threshold, f"{name}.threshold")
    count = len(segmentation.lesions)
    numbers = [lesion.number for lesion in segmentation.lesions]
    if numbers != list(range(1, count + 1)):
        raise ValueError(f"{name}.lesions must be numbered 1..{count} in order, got {numbers}")
    low, high = int(segmentation.labels.min()), int(segmentation.labels.max())
    if low < 0 or high != count:
        raise ValueError(f"{name}.labels must lie within 0..{count} (one label per lesion), got {low}..{high}")
    for i, lesion in enumerate(segmentation.lesions):
        _unit_interval(lesion.max_probability, f"{name}.lesions[{i}].max_probability")
        if not (math.isfinite(lesion.volume_mm3) and lesion.volume_mm3 >= 0):
            raise ValueError(f"{name}.lesions[{i}].volume_mm3 must be >= 0, got {lesion.volume_mm3!r}")
        if any(not 0 <= s < len(images) for s in lesion.slices):
            raise ValueError(f"{name}.lesions[{i}].slices must index {name}.source_images")
