"""RSNA ICH labels (one row per image and subtype) become the study and slice CSVs finetuning reads."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.command import models_app
from models.dataset import collect_studies
from models.label_import import import_rsna_ich
from models.tasks import task_spec
from node.synth import generate

SUBTYPES = task_spec("ct-hemorrhage").outputs


def _rows(path: Path, key: str) -> dict[str, dict[str, int]]:
    with path.open(newline="") as handle:
        return {row[key]: {c: int(row[c]) for c in SUBTYPES} for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct")
    generate(out, 4, ["ct-head"], 5, ct_slices=4, ct_size=32)
    return out


def test_rsna_rows_round_trip_to_the_phantoms_own_labels(phantoms: Path, tmp_path: Path) -> None:
    truth_slices = _rows(phantoms / "slice_labels.csv", "sop_uid")
    rsna = tmp_path / "stage_2_train.csv"
    with rsna.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "Label"])
        for sop, labels in truth_slices.items():
            writer.writerows([f"{sop}_{name}", labels[name]] for name in SUBTYPES)
        writer.writerows([f"ID_deadbeef_{name}", 0] for name in SUBTYPES)  # an image not in this folder
    result = CliRunner().invoke(models_app, ["import-labels", "--csv", str(rsna), "--data", str(phantoms / "dicom"),
                                             "--out", str(tmp_path / "labels")])
    assert result.exit_code == 0, result.output
    assert "1 label rows' images not in" in " ".join(result.output.split())
    assert _rows(tmp_path / "labels" / "slice_labels.csv", "sop_uid") == truth_slices
    truth_studies = {uid: labels for uid, labels in _rows(phantoms / "labels.csv", "study_uid").items()}
    assert _rows(tmp_path / "labels" / "labels.csv", "study_uid") == truth_studies
    items = collect_studies(phantoms / "dicom", tmp_path / "labels" / "labels.csv", modality=("CT",),
                            slice_labels=tmp_path / "labels" / "slice_labels.csv")
    assert len(items) == 4


@pytest.mark.parametrize(("row", "message"), [
    ("ID_abc_bleed,1", "line 2: ID 'ID_abc_bleed' is not <image id>_<subtype>"),
    ("ID_abc_any,maybe", "line 2: Label 'maybe' is not 0 or 1"),
])
def test_malformed_rows_are_errors_that_name_the_line(phantoms: Path, tmp_path: Path, row: str, message: str) -> None:
    rsna = tmp_path / "bad.csv"
    rsna.write_text(f"ID,Label\n{row}\n")
    with pytest.raises(ValueError, match=message):
        import_rsna_ich(rsna, phantoms / "dicom", tmp_path / "out")
