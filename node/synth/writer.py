"""On-disk layout of a generated set (the folder ``generate`` fills)::

    dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    seg/<StudyInstanceUID>/<SEG SOPInstanceUID>.dcm
    labels.csv          one row per study
    slice_labels.csv    one row per head CT slice
    manifest.json       everything above, with lesion details

Every DICOM file is a Part 10 file (preamble, File Meta, Explicit VR Little Endian).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydicom.dataset import Dataset

from node.synth.manifest import LABEL_COLUMNS, SLICE_COLUMNS, Manifest


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Relative path of an image instance."""
    return Path("dicom") / study_uid / series_uid / f"{sop_uid}.dcm"


def seg_path(study_uid: str, sop_uid: str) -> Path:
    """Relative path of a SEG instance."""
    return Path("seg") / study_uid / f"{sop_uid}.dcm"


def write_dataset(out_dir: Path, relative: Path, ds: Dataset) -> None:
    """Write ``ds`` as a DICOM Part 10 file at ``out_dir / relative``."""
    target = out_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)


def _write_csv(path: Path, columns: tuple[str, ...], rows: Iterable[Mapping[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def write_tables(manifest: Manifest) -> None:
    """labels.csv, slice_labels.csv (header only without head CT) and manifest.json."""
    manifest.out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(manifest.labels_csv, LABEL_COLUMNS, (study.row() for study in manifest.studies))
    _write_csv(manifest.slice_labels_csv, SLICE_COLUMNS, (labels.row() for labels in manifest.slices))
    manifest.manifest_json.write_text(manifest.to_json(), encoding="utf-8")
