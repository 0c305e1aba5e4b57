"""Label files of public data sets turned into the CSVs ``pacsnode finetune`` reads.

RSNA Intracranial Hemorrhage Detection (``stage_2_train.csv``): one row per (image, subtype),
``ID,Label`` with ``ID = <SOP Instance UID>_<subtype>`` (the set's DICOM files carry UIDs like
``ID_63eb1e259``) and subtypes ``any, epidural, intraparenchymal, intraventricular, subarachnoid,
subdural`` - exactly the outputs of ``ct-hemorrhage``. The importer reads the DICOM headers of the
data folder to learn each image's study, writes ``slice_labels.csv`` (``sop_uid`` + subtypes) for
the images present, and ``labels.csv`` (``study_uid`` + subtypes) with each study labelled by its
most positive slice, the same aggregation the model uses.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from models.tasks import task_spec

FORMATS = ("rsna-ich",)


@dataclass(frozen=True)
class ImportSummary:
    studies: int
    slices: int
    labelled_not_in_data: int  # rows of the CSV whose image is not in the data folder
    images_without_labels: int  # images of the data folder the CSV does not label
    labels_csv: Path
    slice_labels_csv: Path


def read_rsna_ich(path: Path) -> dict[str, dict[str, float]]:
    """``{sop_uid: {subtype: 0/1}}`` from an RSNA ICH label CSV; errors name the offending line."""
    subtypes = set(task_spec("ct-hemorrhage").outputs)
    out: dict[str, dict[str, float]] = {}
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"ID", "Label"} <= set(reader.fieldnames):
            raise ValueError(f"{Path(path).name}: expected the RSNA ICH columns ID,Label; got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            sop_uid, _, subtype = (row["ID"] or "").strip().rpartition("_")
            if not sop_uid or subtype not in subtypes:
                raise ValueError(f"{Path(path).name} line {line}: ID {row['ID']!r} is not <image id>_<subtype> "
                                 f"with a subtype among {', '.join(sorted(subtypes))}")
            try:
                label = float(row["Label"])
            except (TypeError, ValueError):
                raise ValueError(f"{Path(path).name} line {line}: Label {row['Label']!r} is not 0 or 1") from None
            if label not in (0.0, 1.0):
                raise ValueError(f"{Path(path).name} line {line}: Label {row['Label']!r} is not 0 or 1")
            out.setdefault(sop_uid, {})[subtype] = label
    return out


def _studies_of(data: Path) -> dict[str, str]:
    """SOP Instance UID -> Study Instance UID of every DICOM file below ``data`` (headers only)."""
    found: dict[str, str] = {}
    for path in sorted(p for p in Path(data).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "StudyInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, AttributeError):
            continue
        if "SOPInstanceUID" in ds and "StudyInstanceUID" in ds:
            found[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)
    return found


def import_rsna_ich(labels: Path, data: Path, out: Path) -> ImportSummary:
    """Write ``out/labels.csv`` and ``out/slice_labels.csv`` for the images of ``data`` that ``labels`` covers."""
    columns = task_spec("ct-hemorrhage").outputs
    per_slice = read_rsna_ich(labels)
    study_of = _studies_of(data)
    present = {sop: values for sop, values in per_slice.items() if sop in study_of}
    incomplete = [sop for sop, values in present.items() if set(values) != set(columns)]
    if incomplete:
        raise ValueError(f"{len(incomplete)} image(s) lack some subtype rows, e.g. {incomplete[0]}: every image "
                         f"needs one row per subtype ({', '.join(columns)})")
    studies: dict[str, dict[str, float]] = {}
    for sop, values in present.items():
        study = studies.setdefault(study_of[sop], dict.fromkeys(columns, 0.0))
        for name in columns:
            study[name] = max(study[name], values[name])
    out.mkdir(parents=True, exist_ok=True)
    slice_csv, study_csv = out / "slice_labels.csv", out / "labels.csv"
    with slice_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sop_uid", *columns])
        writer.writerows([sop, *(int(present[sop][c]) for c in columns)] for sop in sorted(present))
    with study_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_uid", *columns])
        writer.writerows([uid, *(int(studies[uid][c]) for c in columns)] for uid in sorted(studies))
    return ImportSummary(studies=len(studies), slices=len(present), labelled_not_in_data=len(per_slice) - len(present),
                         images_without_labels=len(set(study_of) - set(present)), labels_csv=study_csv,
                         slice_labels_csv=slice_csv)
