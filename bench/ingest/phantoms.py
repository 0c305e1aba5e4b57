"""The instances the ingest benchmark sends: phantom head CT slices, 512x512, generated once.

Preferred source is the project's phantom generator (``node.synth.generate``, kind ``ct-head``,
64 slices a study); where that is not importable, a small pydicom generator writes CT Image Storage
instances of the same shape (512x512 int16, Explicit VR Little Endian, valid CT headers).
Either way the files land in a cache folder (``bench/.cache``, gitignored) keyed by source,
count and seed, and are reused by later runs.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid

Source = Literal["auto", "synth", "pydicom"]

ROWS = 512
COLUMNS = 512
SLICES_PER_STUDY = 64  # pydicom fallback: 2,000 instances = 31 full studies + one of 16
SLICE_MM = 2.5
PIXEL_MM = 0.45
MANIFEST = "manifest.json"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
UID_PREFIX = "2.25."
DICM_OFFSET = 128


@dataclass(frozen=True)
class PhantomSet:
    """The files to send, in study/series order, and where they came from."""

    files: tuple[Path, ...]
    total_bytes: int
    source: str  # "synth" or "pydicom"
    folder: Path

    @property
    def mean_bytes(self) -> float:
        return self.total_bytes / max(len(self.files), 1)


def _is_dicom_file(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(DICM_OFFSET)
        return handle.read(4) == b"DICM"


def _ct_images(folder: Path) -> list[Path]:
    """CT Image Storage files below ``folder`` (not SEG or tables), in path order (= study/series order)."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        if not _is_dicom_file(path):
            continue
        header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        if str(header.get("SOPClassUID", "")) == CT_IMAGE_STORAGE:
            found.append(path)
    return found


def _generate_with_synth(out: Path, count: int, seed: int) -> None:
    """``node.synth.generate``: enough head CT studies of ``SLICES_PER_STUDY`` slices for ``count``."""
    from node.synth import generate

    studies = max(1, math.ceil(count / SLICES_PER_STUDY))
    generate(out, studies, "ct-head", seed, ct_slices=SLICES_PER_STUDY, ct_size=ROWS)


def _uid(*parts: object) -> str:
    """A deterministic UID under 2.25 (derived from ``parts``)."""
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts]))


def _slice_pixels(
    rng: np.random.Generator, z: float, noise: npt.NDArray[np.float32]
) -> npt.NDArray[np.int16]:
    """One axial slice of a crude head (skull ring, brain, air), stored values = HU + 1024."""
    yy, xx = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    cy, cx = ROWS / 2, COLUMNS / 2
    scale = max(0.25, math.sqrt(max(0.0, 1.0 - (z / 95.0) ** 2)))
    r = np.sqrt(((yy - cy) / (230 * scale)) ** 2 + ((xx - cx) / (190 * scale)) ** 2)
    hu = np.full((ROWS, COLUMNS), -1000.0, dtype=np.float32)
    hu[r < 1.0] = 900.0  # bone
    hu[r < 0.93] = 35.0  # brain
    hu[(r < 0.2)] = 8.0  # ventricles
    hu += noise[rng.integers(0, noise.shape[0])]
    stored: npt.NDArray[np.int16] = np.clip(hu + 1024.0, -1024, 4095).astype(np.int16)
    return stored


def _generate_with_pydicom(out: Path, count: int, seed: int) -> None:
    """Write ``count`` CT Image Storage instances, ``SLICES_PER_STUDY`` per study, one series each."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 4.0, size=(8, ROWS, COLUMNS)).astype(np.float32)
    base = dt.date(2024, 1, 8)
    studies = math.ceil(count / SLICES_PER_STUDY)
    written = 0
    for study in range(studies):
        study_uid = _uid("bench-ingest", seed, "study", study)
        series_uid = _uid("bench-ingest", seed, "series", study)
        frame_uid = _uid("bench-ingest", seed, "frame", study)
        slices = min(SLICES_PER_STUDY, count - written)
        folder = out / f"study{study:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(slices):
            sop_uid = _uid("bench-ingest", seed, "sop", study, index)
            z = (index - SLICES_PER_STUDY / 2) * SLICE_MM
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
            meta.MediaStorageSOPInstanceUID = UID(sop_uid)
            meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID = CT_IMAGE_STORAGE
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = (base + dt.timedelta(days=study)).strftime("%Y%m%d")
            ds.SeriesDate = ds.StudyDate
            ds.StudyTime = "083000"
            ds.AccessionNumber = f"BENCH{study:05d}"
            ds.Modality = "CT"
            ds.Manufacturer = "bench"
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = "CT HEAD W/O CONTRAST"
            ds.SeriesDescription = "Axial 2.5mm"
            ds.PatientName = f"PHANTOM^{study:04d}"
            ds.PatientID = f"PH{study:04d}"
            ds.PatientBirthDate = "19700101"
            ds.PatientSex = "O"
            ds.BodyPartExamined = "HEAD"
            ds.SliceThickness = f"{SLICE_MM}"
            ds.KVP = "120"
            ds.PatientPosition = "HFS"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = f"{study + 1}"
            ds.SeriesNumber = 1
            ds.InstanceNumber = index + 1
            ds.AcquisitionNumber = 1
            corner = (-COLUMNS * PIXEL_MM / 2, -ROWS * PIXEL_MM / 2)
            ds.ImagePositionPatient = [f"{corner[0]:.2f}", f"{corner[1]:.2f}", f"{z:.2f}"]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = f"{z:.2f}"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ROWS
            ds.Columns = COLUMNS
            ds.PixelSpacing = [f"{PIXEL_MM}", f"{PIXEL_MM}"]
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.WindowCenter = "40"
            ds.WindowWidth = "80"
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.PixelData = _slice_pixels(rng, z, noise).tobytes()
            ds["PixelData"].VR = "OW"
            ds.save_as(folder / f"{index + 1:04d}.dcm", enforce_file_format=True)
            written += 1


def synth_available() -> bool:
    """Whether the project's phantom generator (``node.synth.generate``) can be imported."""
    try:
        from node.synth import generate  # noqa: F401
    except ImportError:
        return False
    return True


def _manifest_ok(folder: Path, count: int) -> list[Path] | None:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    files = [folder / name for name in data.get("files", [])]
    if len(files) != count or not all(f.is_file() for f in files):
        return None
    return files


def prepare_phantoms(cache: Path, count: int, seed: int, source: Source = "auto") -> PhantomSet:
    """Phantom files for ``count`` instances, generated on first use and cached below ``cache``."""
    chosen = source
    if source == "auto":
        chosen = "synth" if synth_available() else "pydicom"
    folder = cache / f"ct-{chosen}-n{count}-seed{seed}"
    files = _manifest_ok(folder, count)
    if files is None:
        if folder.exists():
            shutil.rmtree(folder)
        print(f"generating {count} phantom CT instances with {chosen} into {folder} ...", flush=True)
        if chosen == "synth":
            _generate_with_synth(folder, count, seed)
        else:
            _generate_with_pydicom(folder, count, seed)
        files = _ct_images(folder)[:count]
        if len(files) < count:
            raise RuntimeError(f"only {len(files)} phantom instances were generated, {count} needed")
        (folder / MANIFEST).write_text(json.dumps({"source": chosen, "seed": seed,
                                                    "files": [str(f.relative_to(folder)) for f in files]}))
    return PhantomSet(files=tuple(files), total_bytes=sum(f.stat().st_size for f in files), source=chosen,
                      folder=folder)


def split_groups(files: tuple[Path, ...], groups: int) -> list[list[Path]]:
    """Split into ``groups`` contiguous runs (whole studies stay on one association where they can)."""
    size = math.ceil(len(files) / groups)
    return [list(files[i:i + size]) for i in range(0, len(files), size)]
