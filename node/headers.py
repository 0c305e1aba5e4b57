"""What the node reads of a received dataset: its header only, never its pixels.

The bytes stay exactly as received; this parse only feeds validation, the index, routing and
loop detection.
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from node.store import InstanceKey

# Storage SOP classes that carry no image for the models, even when they have Rows/Columns
# (SEG) or pixels of their own: reports, segmentations, key objects, presentation states,
# encapsulated documents, RT structure sets, waveforms.
NON_IMAGE_SOP_CLASS_PREFIXES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.88.",  # SR family, Key Object Selection (88.59)
    "1.2.840.10008.5.1.4.1.1.66",  # Raw data, spatial registration, fiducials, segmentation (66.4)
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA / STL
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.7.",  # multi-frame secondary captures
)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float, Pixel Data  # incl. our own summary images

PROCESSING_ALGORITHM_CODE = "Newcode1"  # IHE AIR purpose of reference "Processing Algorithm"


class InstanceKind(enum.Enum):
    IMAGE = "image"  # may open or re-open a study and trigger processing
    NON_IMAGE = "non_image"  # stored and indexed, never triggers processing
    RESULT = "result"  # produced by pacsnode (or another AI): never triggers processing


class UnreadableDataset(ValueError):
    """The received bytes do not parse as a DICOM dataset."""


@dataclass(frozen=True)
class InstanceHeader:
    """The header attributes the node keeps; no patient identifiers."""

    key: InstanceKey
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part: str
    image_type: str
    series_description: str
    study_description: str
    series_number: int | None
    rows: int | None
    columns: int | None
    slice_thickness: float | None
    study_date: str
    kind: InstanceKind


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _integer(value: Any) -> int:
    """An integer attribute (IS, US, UL, SS, SL: all within 32 bits) for the index. Larger values
    (a 20-digit IS, a UV) are invalid for these attributes and would not fit SQLite's INTEGER:
    binding one raised OverflowError in the ingest writer's thread and killed it."""
    number = int(value)
    if not -(2**31) <= number < 2**32:
        raise ValueError("integer attribute out of range")
    return number


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return float(value)


def _is_result(ds: Dataset, uid_root: str, manufacturer: str) -> bool:
    """Recognise results of pacsnode (or of any processing algorithm) by UID root or equipment."""
    if uid_root != "2.25" and str(ds.get("SOPInstanceUID", "")).startswith(uid_root + "."):
        return True
    for item in ds.get("ContributingEquipmentSequence", []):
        if str(item.get("Manufacturer", "")) == manufacturer:
            return True
        for purpose in item.get("PurposeOfReferenceCodeSequence", []):
            if purpose.get("CodeValue") == PROCESSING_ALGORITHM_CODE:
                return True
    return False


def classify(ds: Dataset, uid_root: str, manufacturer: str) -> InstanceKind:
    if _is_result(ds, uid_root, manufacturer):
        return InstanceKind.RESULT
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == SECONDARY_CAPTURE or sop_class.startswith(NON_IMAGE_SOP_CLASS_PREFIXES) or "Rows" not in ds:
        return InstanceKind.NON_IMAGE
    return InstanceKind.IMAGE


def read_header(encoded: bytes, uid_root: str, manufacturer: str) -> InstanceHeader:
    """Parse the header of a DICOM file held in memory (preamble + file meta + dataset): a STOW-RS part.

    Raises ``UnreadableDataset`` when it does not parse, ``InvalidUID`` (naming the attribute)
    when a placing UID is missing or malformed.
    """
    try:
        ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True)
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    except Exception as exc:  # hostile bytes: see _header_of
        raise UnreadableDataset(f"dataset does not parse: {type(exc).__name__}") from exc
    return _header_of(ds, transfer_syntax, uid_root, manufacturer)


def read_received_header(encoded: bytes, dataset_offset: int, transfer_syntax: str, uid_root: str,
                         manufacturer: str) -> InstanceHeader:
    """Parse the header of a C-STORE's data set, which starts at ``dataset_offset`` of ``encoded``
    (behind the file meta the node built itself), in the presentation context's transfer syntax.

    Half the cost of ``read_header`` on a CT slice: the file meta is not parsed again. A private
    transfer syntax goes through ``read_header``, where pydicom decides as it always does.
    """
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        return read_header(encoded, uid_root, manufacturer)
    try:
        if syntax.is_deflated:
            source = BytesIO(zlib.decompress(encoded[dataset_offset:], -zlib.MAX_WBITS))
        else:
            source = BytesIO(encoded)  # shares the bytes, no copy
            source.seek(dataset_offset)
        ds = read_dataset(source, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=_at_pixel_data)
    except Exception as exc:  # hostile bytes: see _header_of
        raise UnreadableDataset(f"dataset does not parse: {type(exc).__name__}") from exc
    return _header_of(ds, transfer_syntax, uid_root, manufacturer)


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    """Where pydicom's ``stop_before_pixels`` stops: (Float/Double Float) Pixel Data."""
    return tag in PIXEL_DATA_TAGS


def _header_of(ds: Dataset, transfer_syntax: str, uid_root: str, manufacturer: str) -> InstanceHeader:
    try:
        study_uid = ds.get("StudyInstanceUID")
        series_uid = ds.get("SeriesInstanceUID")
        sop_uid = ds.get("SOPInstanceUID")
        kind = classify(ds, uid_root, manufacturer)
        attributes: dict[str, Any] = {
            "sop_class_uid": _text(ds, "SOPClassUID"),
            "transfer_syntax_uid": transfer_syntax,
            "modality": _text(ds, "Modality"),
            "body_part": _text(ds, "BodyPartExamined"),
            "image_type": _text(ds, "ImageType"),
            "series_description": _text(ds, "SeriesDescription"),
            "study_description": _text(ds, "StudyDescription"),
            "series_number": _integer(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
            "rows": _integer(ds.Rows) if "Rows" in ds else None,
            "columns": _integer(ds.Columns) if "Columns" in ds else None,
            "slice_thickness": _number(ds, "SliceThickness"),
            "study_date": _text(ds, "StudyDate"),
        }
    except Exception as exc:  # hostile bytes: any parser error means "does not parse"
        # Not only InvalidDicomError/ValueError & co.: a corrupt deflate stream raises zlib.error,
        # an unknown VR NotImplementedError, deep nesting RecursionError, a short read struct.error.
        raise UnreadableDataset(f"dataset does not parse: {type(exc).__name__}") from exc
    key = InstanceKey(
        study_uid=str(study_uid) if study_uid is not None else "",
        series_uid=str(series_uid) if series_uid is not None else "",
        sop_uid=str(sop_uid) if sop_uid is not None else "",
    )
    return InstanceHeader(key=key, kind=kind, **attributes)
