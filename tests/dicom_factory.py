"""Small, valid DICOM instances for the lifecycle tests, and a helper that sends them for real.

Every instance is a complete Part 10 file (preamble, file meta, Explicit VR Little Endian) with
fresh 2.25 UIDs, so the node's SCP, header reader and store treat it like a modality's output.
Pixel data is tiny (16 x 16) because the node never reads pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from node.send import SendReport, scan, send_files

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step

_rng = np.random.default_rng(20240611)


def _base(sop_class: str, study_uid: str, series_uid: str, sop_uid: str | None, modality: str,
          series_number: int, instance_number: int) -> Dataset:
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.PatientName = "PHANTOM^LIFECYCLE"
    ds.PatientID = "LC0001"
    ds.StudyDate = "20240611"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    return ds


def image(study_uid: str, series_uid: str, *, sop_class: str, modality: str, body_part: str,
          instance_number: int = 1, series_number: int = 1, sop_uid: str | None = None,
          image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"), series_description: str = "",
          study_description: str = "", slice_thickness: float | None = 5.0, size: int = 16) -> Dataset:
    """One image instance with pixels (the kind of object that opens or re-opens a study)."""
    ds = _base(sop_class, study_uid, series_uid, sop_uid, modality, series_number, instance_number)
    ds.BodyPartExamined = body_part
    ds.ImageType = list(image_type)
    ds.SeriesDescription = series_description
    ds.StudyDescription = study_description
    if slice_thickness is not None:
        ds.SliceThickness = slice_thickness
        ds.ImagePositionPatient = [0.0, 0.0, float(instance_number) * slice_thickness]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = _rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def ct_head(count: int = 8, study_uid: str | None = None, series_uid: str | None = None,
            first: int = 1, body_part: str = "HEAD") -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    return [image(study_uid, series_uid, sop_class=CT_IMAGE, modality="CT", body_part=body_part,
                  instance_number=first + i, series_description="HEAD NCCT 5mm", study_description="CT HEAD")
            for i in range(count)]


def mr_brain(count: int = 8, study_uid: str | None = None, body_part: str = "BRAIN") -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [image(study_uid, series_uid, sop_class=MR_IMAGE, modality="MR", body_part=body_part,
                  instance_number=1 + i, series_description="T1 POST", study_description="MR BRAIN")
            for i in range(count)]


def cxr(study_uid: str | None = None, modality: str = "DX", body_part: str = "CHEST") -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    return [image(study_uid, generate_uid(), sop_class=DX_IMAGE, modality=modality, body_part=body_part,
                  image_type=("ORIGINAL", "PRIMARY"), series_description="PA", study_description="CHEST PA",
                  slice_thickness=None, size=32)]


def _contributing_equipment(ds: Dataset, manufacturer: str, processing_algorithm: bool = True) -> None:
    item = Dataset()
    item.Manufacturer = manufacturer
    item.InstitutionName = "Lifecycle Test Hospital"
    item.SoftwareVersions = "0.1.0"
    if processing_algorithm:
        code = Dataset()
        code.CodeValue = "Newcode1"
        code.CodingSchemeDesignator = "99IHE"
        code.CodeMeaning = "Processing Algorithm"
        item.PurposeOfReferenceCodeSequence = [code]
    ds.ContributingEquipmentSequence = [item]


def mark_as_result(ds: Dataset, manufacturer: str = "pacsnode", processing_algorithm: bool = True) -> Dataset:
    """Add the Contributing Equipment that the node's own results carry."""
    _contributing_equipment(ds, manufacturer, processing_algorithm)
    return ds


def sr_result(study_uid: str, manufacturer: str = "pacsnode") -> Dataset:
    """A Comprehensive 3D SR as the node's workers produce it (no pixels, no Rows)."""
    ds = _base(COMPREHENSIVE_3D_SR, study_uid, generate_uid(), None, "SR", 901, 1)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue = "126000"
    concept.CodingSchemeDesignator = "DCM"
    concept.CodeMeaning = "Imaging Measurement Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.SeriesDescription = "pacsnode findings"
    return mark_as_result(ds, manufacturer)


def seg_result(study_uid: str, manufacturer: str = "pacsnode") -> Dataset:
    """A binary Segmentation header as the workers produce it (it has Rows/Columns and pixels)."""
    ds = _base(SEGMENTATION, study_uid, generate_uid(), None, "SEG", 902, 1)
    ds.SegmentationType = "BINARY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.NumberOfFrames = 1
    ds.BitsAllocated = 1
    ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PixelData = bytes(32)
    ds.SeriesDescription = "pacsnode segmentation"
    return mark_as_result(ds, manufacturer)


def key_object(study_uid: str) -> Dataset:
    """A Key Object Selection from the PACS (a radiologist flagged images): not an image."""
    ds = _base(KEY_OBJECT_SELECTION, study_uid, generate_uid(), None, "KO", 990, 1)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue = "113000"
    concept.CodingSchemeDesignator = "DCM"
    concept.CodeMeaning = "Of Interest"
    ds.ConceptNameCodeSequence = [concept]
    return ds


def presentation_state(study_uid: str) -> Dataset:
    """A Grayscale Softcopy Presentation State from the PACS viewer: not an image."""
    ds = _base(GRAYSCALE_PR, study_uid, generate_uid(), None, "PR", 991, 1)
    ds.ContentLabel = "VIEWER"
    ds.PresentationCreationDate = "20240611"
    ds.PresentationCreationTime = "120500"
    return ds


def write(datasets: Iterable[Dataset], folder: Path) -> list[Path]:
    """Write each dataset as a Part 10 file; returns the paths in the given order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(datasets: Sequence[Dataset], folder: Path, port: int, ae_title: str = "PACSNODE") -> SendReport:
    """Write the datasets below ``folder`` and C-STORE them to 127.0.0.1:``port``; all must succeed."""
    paths = write(datasets, folder)
    report = SendReport()
    outgoing = scan(paths, report)
    result = send_files(outgoing, "127.0.0.1", port, ae_title)
    assert not report.skipped and not result.failed, (report.skipped, result.failed)
    assert result.sent == len(datasets), result
    return result
