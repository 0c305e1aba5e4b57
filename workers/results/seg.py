"""The lesion mask as a DICOM Segmentation: one segment per lesion, so the SR can measure each.

BINARY by default: it is what viewers show most reliably. FRACTIONAL keeps the model's probability
inside each lesion (0 outside it), for viewers that blend. Empty frames are kept
(``omit_empty_frames=False``): with them omitted some viewers misplace the mask (highdicom #214,
#338), and a frame per source slice and segment costs little at a model's resolution.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from workers.outcome import SegmentationOutcome, StudyOutcome
from workers.results.clock import pin_clock, result_moment
from workers.results.concepts import ABNORMAL_STRUCTURE, coded
from workers.results.context import MAX_LO, ResultContext
from workers.results.equipment import (
    SEG_SERIES_NUMBER,
    identity,
    stamp_software_versions,
)
from workers.results.uids import RunUids


def lesion_label(outcome: StudyOutcome, number: int) -> str:
    """"Metastasis 1", "Metastasis 2", ...: the segment label and the SR's tracking identifier."""
    return f"{outcome.card.outputs[0].concept.meaning} {number}"[:MAX_LO]


def lesion_tracking_uid(uids: RunUids, number: int) -> str:
    """One tracking UID per lesion, shared by its SEG segment and its SR measurement group."""
    return uids.uid(f"lesion-{number}")


def _pixel_array(segmentation: SegmentationOutcome, fractional: bool) -> np.ndarray:
    """BINARY: the label map itself (label k = segment k). FRACTIONAL: per lesion, its probabilities."""
    if not fractional:
        dtype = np.uint8 if len(segmentation.lesions) < 256 else np.uint16
        return segmentation.labels.astype(dtype)
    numbers = np.arange(1, len(segmentation.lesions) + 1, dtype=segmentation.labels.dtype)
    inside = segmentation.labels[..., None] == numbers
    return np.where(inside, segmentation.probability[..., None], 0.0).astype(np.float32)


def build_seg(
    outcome: StudyOutcome, context: ResultContext, uids: RunUids, *, fractional: bool = False
) -> hd.seg.Segmentation | None:
    """The SEG of ``outcome.segmentation``, or ``None`` when there is no lesion to show."""
    segmentation = outcome.segmentation
    if segmentation is None or not segmentation.lesions:
        return None
    card = outcome.card
    when = result_moment(outcome.completed_at)
    concept = coded(card.outputs[0].concept)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=lesion.number,
            segment_label=lesion_label(outcome, lesion.number),
            segmented_property_category=ABNORMAL_STRUCTURE,
            segmented_property_type=concept,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=card.name, family=codes.cid7162.ArtificialIntelligence, version=card.version
            ),
            tracking_id=lesion_label(outcome, lesion.number),
            tracking_uid=lesion_tracking_uid(uids, lesion.number),
        )
        for lesion in segmentation.lesions
    ]
    segmentation_type = (
        hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY
    )
    seg = hd.seg.Segmentation(
        source_images=list(segmentation.source_images),
        pixel_array=_pixel_array(segmentation, fractional),
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        device_serial_number=card.device_uid,  # a model has no serial number; its Device UID is unique
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY if fractional else None,
        content_description=f"{card.name} v{card.version} lesions"[:MAX_LO],
        content_label="AIRESULT",
        omit_empty_frames=False,
        **identity(context, card, uids, "seg", SEG_SERIES_NUMBER, when, [concept.scheme_designator]),
    )
    stamp_software_versions(seg, context, card)
    first = segmentation.source_images[0]
    if "FrameOfReferenceUID" not in first and "PatientOrientation" in first:
        # A projection radiograph has no patient frame: General Image then wants its orientation.
        seg.PatientOrientation = first.PatientOrientation
    pin_clock(seg, when, uids.uid("seg-dimension-organization"))
    return seg

