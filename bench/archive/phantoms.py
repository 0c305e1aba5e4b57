"""A phantom archive of any number of frames that stays small on disk: mostly multi-frame CT.

Real archives at this scale are dominated by CT and MR slices; enhanced (multi-frame) objects
keep them to a few files. Here ``share_single`` of the frames are single-frame radiographs
(one file each, so the walk and the per-file costs are in the figures too) and the rest are
enhanced CT volumes of ``frames_per_file`` frames at 32 x 32, with per-frame plane positions
(the part of an enhanced header that grows with its frames). One template per kind is written
with pydicom; every file is that template's bytes with its UIDs and patient ID replaced by
values of the same length, so a million frames are written at disk speed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import DigitalXRayImageStorageForPresentation, EnhancedCTImageStorage, ExplicitVRLittleEndian

SIZE = 32
MARKER = "archive.json"
UID_BASE = 10**38  # "2.25." + 39 digits: every generated UID has the same length
PLACEHOLDERS = {key: ("2.25." + str(UID_BASE + offset)).encode() for offset, key in
                enumerate(("study", "series", "sop"), start=1)}
PATIENT_PLACEHOLDER = b"BENCH00000000"


@dataclass(frozen=True)
class ArchiveSpec:
    frames: int
    frames_per_file: int = 1000
    share_single: float = 0.05

    @property
    def single_files(self) -> int:
        return round(self.frames * self.share_single)

    @property
    def volume_files(self) -> int:
        return (self.frames - self.single_files) // self.frames_per_file

    @property
    def total_frames(self) -> int:
        return self.single_files + self.volume_files * self.frames_per_file


def _pixels(frames: int) -> np.ndarray:
    """A head-like disc (brain 35 HU in a 1,000 HU skull), shrinking towards the volume's ends."""
    y, x = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    radius = np.hypot(x, y)
    stack = np.full((frames, SIZE, SIZE), -1000, dtype=np.int16)
    for index in range(frames):
        outer = 14 * np.sqrt(max(0.05, 1 - ((index - frames / 2) / (frames / 2)) ** 2))
        stack[index][radius < outer] = 1000
        stack[index][radius < outer - 2] = 35
    return stack


def _common(ds: Dataset, sop_class: str, modality: str) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = PLACEHOLDERS["sop"].decode()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, PLACEHOLDERS["sop"].decode()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = PLACEHOLDERS["study"].decode(), PLACEHOLDERS["series"].decode()
    ds.PatientID, ds.PatientName, ds.Modality = PATIENT_PLACEHOLDER.decode(), "BENCH", modality
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.InstanceNumber = 1


def _volume_template(frames: int) -> bytes:
    ds = Dataset()
    _common(ds, EnhancedCTImageStorage, "CT")
    ds.PixelRepresentation = 1
    ds.NumberOfFrames = frames
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    shared = Dataset()
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [7.0, 7.0], 1.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for index in range(frames):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [-112.0, -112.0, float(index)]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = _pixels(frames).tobytes()
    return _encoded(ds)


def _radiograph_template() -> bytes:
    ds = Dataset()
    _common(ds, DigitalXRayImageStorageForPresentation, "DX")
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelData = (np.clip(_pixels(1)[0] + 1000, 0, 4095)).astype(np.uint16).tobytes()
    return _encoded(ds)


def _encoded(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _instance(template: bytes, number: int) -> bytes:
    """The template with the UIDs and patient ID of instance ``number`` (same lengths as before)."""
    out = template
    for offset, key in enumerate(("study", "series", "sop")):
        out = out.replace(PLACEHOLDERS[key], ("2.25." + str(UID_BASE + 10 + 3 * number + offset)).encode())
    return out.replace(PATIENT_PLACEHOLDER, f"BENCH{number:08d}".encode())


def build(root: Path, spec: ArchiveSpec) -> Path:
    """The archive for ``spec`` under ``root`` (reused when complete: ``archive.json`` is written last)."""
    folder = root / f"frames-{spec.total_frames}"
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    volume, radiograph = _volume_template(spec.frames_per_file), _radiograph_template()
    number = 0
    for kind, template, count in (("ct", volume, spec.volume_files), ("dx", radiograph, spec.single_files)):
        for index in range(count):
            sub = folder / kind / f"{index // 1000:04d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{index:08d}.dcm").write_bytes(_instance(template, number))
            number += 1
    marker.write_text(json.dumps(asdict(spec)))
    return folder
