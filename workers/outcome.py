"""What running one model on one study version produced, before it becomes DICOM.

Inference (``workers.inference``) fills these; the result encoders (``workers.results``) turn them
into SR, SEG, KO and SC objects. Source images are pydicom datasets read header-only from the
study store, in the order the model saw them (slices sorted along the slice normal), so that the
encoders can copy patient/study attributes and reference exactly the images a finding concerns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from models.card import ModelCard
from models.tasks import CodedConcept


@dataclass(frozen=True)
class FindingOutcome:
    """One model output for the study: its (calibrated) probability and the call at the card's threshold.

    ``evidence`` are the images the finding concerns: the radiograph, the CT slices that drive
    the study score (highest slice probabilities), the MR slices a lesion touches. A finding the
    card does not assess has no call: ``present`` and ``threshold`` are ``None`` and
    ``not_assessed_reason`` says why; the result objects then show the probability alone.
    ``key_slice`` is the one image (and frame) the worklist page shows for it: the highest-scoring
    slice, or the slice where the segmented lesions are largest.
    """

    name: str
    concept: CodedConcept
    probability: float
    threshold: float | None
    present: bool | None
    evidence: tuple[Dataset, ...]
    not_assessed_reason: str = ""
    key_slice: tuple[str, int] | None = None  # (SOP Instance UID, 1-based frame) of the slice that drives it

    @property
    def call(self) -> str:
        """How the result objects' text states the call: "PRESENT", "absent" or "not assessed"."""
        if self.present is None:
            return "not assessed"
        return "PRESENT" if self.present else "absent"


@dataclass(frozen=True)
class LesionOutcome:
    """One connected component of the thresholded metastasis mask (1-based ``number`` = its label)."""

    number: int
    voxels: int
    volume_mm3: float
    max_probability: float
    slices: tuple[int, ...]  # indices into SegmentationOutcome.source_images


@dataclass(frozen=True)
class SegmentationOutcome:
    """The 3D prediction on the source grid: one frame per source image, in ``source_images`` order.

    ``probability`` is float32 (slices, rows, columns) in [0, 1]; ``labels`` is int32 of the same
    shape, 0 outside lesions and k inside lesion k (``lesions[k-1]``).
    """

    source_images: tuple[Dataset, ...]
    probability: np.ndarray
    threshold: float
    labels: np.ndarray
    lesions: tuple[LesionOutcome, ...]


@dataclass(frozen=True)
class StudyOutcome:
    """Everything the result objects of one (study version, model version) are built from.

    ``completed_at`` is when the node closed the study version (epoch seconds): the results' content
    date/time, so building them again (a redelivered task) yields byte-identical objects.
    ``key_images`` are the images a Key Object Selection flags for viewers without SR support.
    """

    study_uid: str
    version: int
    completed_at: float
    card: ModelCard
    source_images: tuple[Dataset, ...]
    findings: tuple[FindingOutcome, ...]
    key_images: tuple[Dataset, ...]
    segmentation: SegmentationOutcome | None = None
