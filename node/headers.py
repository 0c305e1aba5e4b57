"""What the node reads of a received dataset: its header only, never its pixels.

The bytes stay exactly as received; this parse only feeds validation, the index, routing and
loop detection.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
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
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # incl. our own summary images
SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float, Pixel Data

MAX_KEPT_VALUE = 256  # bytes: longer values are converted every time, not kept (ConvertedValues)
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


class ConvertedValues:
    """pydicom's conversions of element values, kept by their raw bytes: one CT series repeats
    all but a few of the header values a receiver reads (UIDs of study and series, modality,
    descriptions, sizes), and converting each through pydicom cost about 10 us, half of reading a
    slice's header. Only short values are kept; the whole lot is forgotten at ``limit`` entries
    (the SOP Instance UIDs, new with every instance, fill it)."""

    def __init__(self, limit: int = 4096) -> None:
        self._values: dict[tuple[int, str | None, bytes, tuple[str, ...]], Any] = {}
        self._limit = limit

    def convert(self, element: RawDataElement, encoding: tuple[str, ...], ds: Dataset) -> Any:
        raw = element.value
        key = None if raw is None or len(raw) > MAX_KEPT_VALUE else (int(element.tag), element.VR, bytes(raw), encoding)
        if key in self._values:
            return self._values[key]
        value = convert_raw_data_element(element, encoding=list(encoding), ds=ds).value
        if key is not None:
            if len(self._values) >= self._limit:
                self._values.clear()
            self._values[key] = value
        return value


class Attributes:
    """The values of a data set's elements as pydicom converts them, each converted on first use
    with the character set looked up once. pydicom's own ``ds.get(keyword)`` looks the character
    set up again for every element (about 15 us each, a third of reading a CT slice's header)."""

    def __init__(self, ds: Dataset, values: ConvertedValues) -> None:
        self._ds = ds
        self._values = values
        charset = ds.get(SPECIFIC_CHARACTER_SET)
        self._encoding = tuple(convert_encodings(charset.value)) if charset is not None and charset.value \
            else (default_encoding,)

    def get(self, keyword: str, default: Any = None) -> Any:
        tag = tag_for_keyword(keyword)
        element = self._ds.get_item(tag) if tag is not None else None
        if element is None:
            return default
        if isinstance(element, DataElement):
            return element.value
        if dictionary_VR(tag) == "SQ":  # items are data sets: pydicom's own path
            return self._ds.get(keyword, default)
        return self._values.convert(element, self._encoding, self._ds)

    def __contains__(self, keyword: str) -> bool:
        tag = tag_for_keyword(keyword)
        return tag is not None and tag in self._ds


def _text(attrs: Attributes, keyword: str) -> str:
    value = attrs.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _integer(value: Any) -> int:
    """An integer attribute (IS, US, UL, SS, SL: all within 32 bits) for the index. Larger values
    (a 20-digit IS, a UV) are invalid for these attributes and would not fit SQLite's INTEGER:
    binding one raised OverflowError in the group commit (and once killed the thread that did it)."""
    number = int(value)
    if not -(2**31) <= number < 2**32:
        raise ValueError("integer attribute out of range")
    return number


def _number(attrs: Attributes, keyword: str) -> float | None:
    value = attrs.get(keyword)
    if value is None or value == "":
        return None
    return float(value)


def _is_result(attrs: Attributes, uid_root: str, manufacturer: str) -> bool:
    """Recognise results of pacsnode (or of any processing algorithm) by UID root or equipment."""
    if uid_root != "2.25" and str(attrs.get("SOPInstanceUID", "")).startswith(uid_root + "."):
        return True
    for item in attrs.get("ContributingEquipmentSequence", []):
        if str(item.get("Manufacturer", "")) == manufacturer:
            return True
        for purpose in item.get("PurposeOfReferenceCodeSequence", []):
            if purpose.get("CodeValue") == PROCESSING_ALGORITHM_CODE:
                return True
    return False


def classify(attrs: Attributes, uid_root: str, manufacturer: str) -> InstanceKind:
    if _is_result(attrs, uid_root, manufacturer):
        return InstanceKind.RESULT
    sop_class = str(attrs.get("SOPClassUID", ""))
    if sop_class == SECONDARY_CAPTURE or sop_class.startswith(NON_IMAGE_SOP_CLASS_PREFIXES) or "Rows" not in attrs:
        return InstanceKind.NON_IMAGE
    return InstanceKind.IMAGE


def read_header(encoded: bytes, uid_root: str, manufacturer: str,
                values: ConvertedValues | None = None) -> InstanceHeader:
    """Parse the header of a DICOM file held in memory (preamble + file meta + dataset): a STOW-RS part.

    Raises ``UnreadableDataset`` when it does not parse, ``InvalidUID`` (naming the attribute)
    when a placing UID is missing or malformed.
    """
    with _parsing():
        ds = pydicom.dcmread(BytesIO(encoded), stop_before_pixels=True)
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    return _header_of(ds, transfer_syntax, uid_root, manufacturer, values or ConvertedValues())


def read_received_header(prefix: bytes, data_set: bytes, transfer_syntax: str, uid_root: str,
                         manufacturer: str, values: ConvertedValues | None = None) -> InstanceHeader:
    """Parse the header of a C-STORE's ``data_set``, in the presentation context's transfer syntax,
    without parsing again the file meta (``prefix``) the node built for it.

    Half the cost of ``read_header`` on a CT slice. A private transfer syntax goes through
    ``read_header`` over the whole file, where pydicom decides as it always does.
    """
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        return read_header(prefix + data_set, uid_root, manufacturer, values)
    with _parsing():
        source = BytesIO(zlib.decompress(data_set, -zlib.MAX_WBITS) if syntax.is_deflated else data_set)
        ds = read_dataset(source, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=_at_pixel_data)
    return _header_of(ds, transfer_syntax, uid_root, manufacturer, values or ConvertedValues())


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    """Where pydicom's ``stop_before_pixels`` stops: (Float/Double Float) Pixel Data."""
    return tag in PIXEL_DATA_TAGS


@contextmanager
def _parsing() -> Iterator[None]:
    """Whatever reading hostile bytes raises becomes ``UnreadableDataset``: not only
    InvalidDicomError/ValueError & co., but zlib.error for a corrupt deflate stream,
    NotImplementedError for an unknown VR, RecursionError for deep nesting, struct.error for a
    short read (pydicom converts values lazily, so this covers reading them too)."""
    try:
        yield
    except Exception as exc:  # hostile bytes: any parser error means "does not parse"
        raise UnreadableDataset(f"dataset does not parse: {type(exc).__name__}") from exc


def _header_of(ds: Dataset, transfer_syntax: str, uid_root: str, manufacturer: str,
               values: ConvertedValues) -> InstanceHeader:
    with _parsing():
        attrs = Attributes(ds, values)
        study_uid = attrs.get("StudyInstanceUID")
        series_uid = attrs.get("SeriesInstanceUID")
        sop_uid = attrs.get("SOPInstanceUID")
        kind = classify(attrs, uid_root, manufacturer)
        series_number = attrs.get("SeriesNumber")
        rows, columns = attrs.get("Rows"), attrs.get("Columns")
        attributes: dict[str, Any] = {
            "sop_class_uid": _text(attrs, "SOPClassUID"),
            "transfer_syntax_uid": transfer_syntax,
            "modality": _text(attrs, "Modality"),
            "body_part": _text(attrs, "BodyPartExamined"),
            "image_type": _text(attrs, "ImageType"),
            "series_description": _text(attrs, "SeriesDescription"),
            "study_description": _text(attrs, "StudyDescription"),
            "series_number": _integer(series_number) if series_number not in (None, "") else None,
            "rows": _integer(rows) if "Rows" in attrs else None,
            "columns": _integer(columns) if "Columns" in attrs else None,
            "slice_thickness": _number(attrs, "SliceThickness"),
            "study_date": _text(attrs, "StudyDate"),
        }
    key = InstanceKey(
        study_uid=str(study_uid) if study_uid is not None else "",
        series_uid=str(series_uid) if series_uid is not None else "",
        sop_uid=str(sop_uid) if sop_uid is not None else "",
    )
    return InstanceHeader(key=key, kind=kind, **attributes)
