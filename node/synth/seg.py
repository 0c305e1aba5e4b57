"""Ground-truth lesion masks as DICOM Segmentation objects (highdicom, BINARY).

One segment per finding present, in a fixed order, each with SNOMED/DCM codes from pydicom's
DICOM code dictionary. Empty frames are kept (``omit_empty_frames=False``) so the SEG has one
frame per source slice and segment, and viewers place it without guessing. highdicom stamps the
clock and a random Dimension Organization UID into every object; both are overwritten from the
study plan so the files stay byte-identical between runs (the creation and content date/time,
the contribution date/time of highdicom's own Contributing Equipment item, and the Dimension
Organization UID).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from node.synth.determinism import derive_uid
from node.synth.grid import BoolArray
from node.synth.headers import MANUFACTURER, SOFTWARE_VERSION


@dataclass(frozen=True)
class SegmentKind:
    """How one finding is described in a SEG."""

    label: str
    category: Code
    property_type: Code


_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure
SEGMENT_KINDS: Mapping[str, SegmentKind] = MappingProxyType(
    {
        "nodule": SegmentKind("Nodule", _ABNORMAL, codes.SCT.Nodule),
        "consolidation": SegmentKind("Consolidation", _ABNORMAL, codes.DCM.AbnormalOpacity),
        "effusion": SegmentKind("Pleural effusion", _ABNORMAL, codes.SCT.PleuralEffusion),
        "cardiomegaly": SegmentKind("Cardiomegaly (enlarged heart)", _ABNORMAL, codes.SCT.Cardiomegaly),
        "epidural": SegmentKind("Epidural hemorrhage", _ABNORMAL, codes.SCT.Hemorrhage),
        "subdural": SegmentKind("Subdural hemorrhage", _ABNORMAL, codes.SCT.Hemorrhage),
        "subarachnoid": SegmentKind("Subarachnoid hemorrhage", _ABNORMAL, codes.SCT.Hemorrhage),
        "intraparenchymal": SegmentKind("Intraparenchymal hemorrhage", _ABNORMAL, codes.SCT.Hemorrhage),
        "intraventricular": SegmentKind("Intraventricular hemorrhage", _ABNORMAL, codes.SCT.Hemorrhage),
        "metastasis": SegmentKind("Metastasis", _ABNORMAL, codes.cid7159.NeoplasmSecondary),
    }
)


def _algorithm() -> hd.AlgorithmIdentificationSequence:
    """The "algorithm" behind the masks: the phantom's geometric construction (a fresh sequence each time)."""
    return hd.AlgorithmIdentificationSequence(
        name="pacsnode-synth phantom ground truth",
        family=codes.cid7162.MorphologicalOperations,
        version=SOFTWARE_VERSION,
    )


def _pin(node: Dataset, dimension_uid: str, when: datetime) -> None:
    """Replace what highdicom took from the clock or ``uuid4`` (at any depth) with fixed values."""
    for element in node:
        if element.keyword == "DimensionOrganizationUID":
            element.value = dimension_uid
        elif element.keyword == "ContributionDateTime":
            element.value = when.strftime("%Y%m%d%H%M%S")
        elif element.VR == "SQ":
            for item in element.value:
                _pin(item, dimension_uid, when)


def _pixel_array(masks: Sequence[tuple[str, BoolArray]]) -> np.ndarray:
    """Segments as highdicom takes them fastest: a 3D label map unless segments overlap.

    highdicom validates a label map with one max(); a stacked 4D array costs several full passes
    per segment. Overlapping segments (two haemorrhage subtypes sharing voxels) must be stacked.
    """
    labelmap = np.zeros(masks[0][1].shape, dtype=np.uint8)
    total = 0
    for number, (_, mask) in enumerate(masks, start=1):
        labelmap[mask] = number
        total += int(np.count_nonzero(mask))
    if total == int(np.count_nonzero(labelmap)):
        return labelmap
    return np.stack([mask for _, mask in masks], axis=-1).astype(np.uint8)


def build_seg(
    source_images: Sequence[Dataset],
    masks: Sequence[tuple[str, BoolArray]],
    series_uid: str,
    sop_uid: str,
    dimension_uid: str,
    when: datetime,
    series_number: int = 100,
) -> hd.seg.Segmentation:
    """A BINARY SEG of ``masks`` (finding, array of shape (frames, rows, cols)) over ``source_images``.

    ``source_images`` are the image datasets in frame order (one per slice; one for a radiograph).
    """
    if not masks:
        raise ValueError("a SEG needs at least one segment")
    descriptions = []
    for number, (finding, _) in enumerate(masks, start=1):
        kind = SEGMENT_KINDS[finding]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=kind.label,
                segmented_property_category=kind.category,
                segmented_property_type=kind.property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=_algorithm(),
                tracking_id=finding,
                tracking_uid=derive_uid(sop_uid, "tracking", finding),
            )
        )
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=_pixel_array(masks),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="Phantom ground truth",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="SYNTHSEG0001",
        content_description="Phantom ground truth",
        content_label="GROUNDTRUTH",
        content_creator_name="PACSNODE^SYNTH",
        series_description="Ground truth lesions",
        omit_empty_frames=False,
        content_date=when.date(),
        content_time=when.time(),
    )
    seg.InstanceCreationDate = DA(when.date())
    seg.InstanceCreationTime = TM(when.time())
    seg.SeriesDate = DA(when.date())
    seg.SeriesTime = TM(when.time())
    _pin(seg, dimension_uid, when)
    if "FrameOfReferenceUID" not in source_images[0] and "PatientOrientation" in source_images[0]:
        # A projection radiograph has no patient frame: General Image then wants its orientation.
        seg.PatientOrientation = source_images[0].PatientOrientation
    return seg
