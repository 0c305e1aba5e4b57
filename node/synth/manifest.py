"""What a run produced, as typed records: the manifest, labels.csv and slice_labels.csv rows.

Everything here is relative to the output folder and free of absolute paths and clock values,
so the JSON and CSV files are as deterministic as the DICOM files they describe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from node.synth.lesions import LesionRecord
from node.synth.spec import CT_FINDINGS, CXR_FINDINGS, FINDINGS, MR_FINDINGS, Kind

# labels.csv: identity and split-neutral columns (what a caller splits on: patient, date), then
# one 0/1 column per finding of every kind (blank where the finding does not apply to the kind).
LABEL_COLUMNS: tuple[str, ...] = (
    "study_uid",
    "patient_id",
    "kind",
    "modality",
    "series_uid",
    "study_date",
    "patient_sex",
    "patient_age",
    "n_instances",
    "seg_path",
    "any",
    *CXR_FINDINGS,
    *CT_FINDINGS,
    *MR_FINDINGS,
    "lesion_count",
    "lesion_volume_mm3",
)
SLICE_COLUMNS: tuple[str, ...] = (
    "study_uid",
    "series_uid",
    "sop_uid",
    "instance_number",
    "z_mm",
    "any",
    *CT_FINDINGS,
)
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SliceLabels:
    """Per-slice haemorrhage labels of one CT slice."""

    study_uid: str
    series_uid: str
    sop_uid: str
    instance_number: int
    z_mm: float
    labels: dict[str, int]

    def row(self) -> dict[str, str]:
        row = {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_uid": self.sop_uid,
            "instance_number": str(self.instance_number),
            "z_mm": f"{self.z_mm:.3f}",
        }
        row.update({name: str(self.labels[name]) for name in ("any", *CT_FINDINGS)})
        return row


@dataclass(frozen=True)
class StudyRecord:
    """One generated study: identity, files, labels and the lesions behind them."""

    study_uid: str
    patient_id: str
    kind: Kind
    modality: str
    series_uid: str
    study_date: str
    patient_sex: str
    patient_age: str
    instances: tuple[str, ...]  # relative paths, in instance order
    seg_path: str | None
    seg_uid: str | None
    labels: dict[str, int]  # "any" and each finding of the kind
    lesions: tuple[LesionRecord, ...]
    lesion_volume_mm3: float | None
    extra: dict[str, float] = field(default_factory=dict)  # e.g. the cardiothoracic ratio

    @property
    def positive(self) -> bool:
        return bool(self.labels["any"])

    def _identity(self) -> dict[str, str]:
        """The columns that name the study; shared by the CSV row and the manifest entry."""
        return {
            "study_uid": self.study_uid,
            "patient_id": self.patient_id,
            "kind": self.kind,
            "modality": self.modality,
            "series_uid": self.series_uid,
            "study_date": self.study_date,
            "patient_sex": self.patient_sex,
            "patient_age": self.patient_age,
        }

    def row(self) -> dict[str, str]:
        row = {
            **self._identity(),
            "n_instances": str(len(self.instances)),
            "seg_path": self.seg_path or "",
            "lesion_count": str(len(self.lesions)),
            "lesion_volume_mm3": "" if self.lesion_volume_mm3 is None else f"{self.lesion_volume_mm3:.2f}",
        }
        for name in ("any", *CXR_FINDINGS, *CT_FINDINGS, *MR_FINDINGS):
            row[name] = str(self.labels[name]) if name in self.labels else ""
        return row

    def as_dict(self) -> dict[str, object]:
        return {
            **self._identity(),
            "n_instances": len(self.instances),
            "instances": list(self.instances),
            "seg_path": self.seg_path,
            "seg_uid": self.seg_uid,
            "labels": dict(self.labels),
            "lesions": [lesion.as_dict() for lesion in self.lesions],
            "lesion_volume_mm3": None if self.lesion_volume_mm3 is None else round(self.lesion_volume_mm3, 2),
            "extra": {key: round(value, 4) for key, value in self.extra.items()},
        }


@dataclass(frozen=True)
class Manifest:
    """The result of ``generate``: where things are and what they contain."""

    out_dir: Path
    seed: int
    kinds: tuple[Kind, ...]
    studies_per_kind: int
    difficulty: dict[str, object]
    geometry: dict[str, int]
    studies: tuple[StudyRecord, ...]
    slices: tuple[SliceLabels, ...]

    @property
    def labels_csv(self) -> Path:
        return self.out_dir / "labels.csv"

    @property
    def slice_labels_csv(self) -> Path:
        return self.out_dir / "slice_labels.csv"

    @property
    def manifest_json(self) -> Path:
        return self.out_dir / "manifest.json"

    @property
    def n_instances(self) -> int:
        return sum(len(study.instances) for study in self.studies)

    def of_kind(self, kind: Kind) -> list[StudyRecord]:
        return [study for study in self.studies if study.kind == kind]

    def to_json(self) -> str:
        body = {
            "generator": "pacsnode-synth",
            "manifest_version": MANIFEST_VERSION,
            "seed": self.seed,
            "kinds": list(self.kinds),
            "studies_per_kind": self.studies_per_kind,
            "difficulty": self.difficulty,
            "geometry": self.geometry,
            "findings": {kind: list(FINDINGS[kind]) for kind in self.kinds},
            "layout": {
                "dicom": "dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm",
                "seg": "seg/<StudyInstanceUID>/<SEG SOPInstanceUID>.dcm",
                "labels": "labels.csv",
                "slice_labels": "slice_labels.csv",
            },
            "n_instances": self.n_instances,
            "studies": [study.as_dict() for study in self.studies],
        }
        return json.dumps(body, indent=2, sort_keys=True) + "\n"
