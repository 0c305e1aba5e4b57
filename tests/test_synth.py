"""node.synth: deterministic phantom DICOM studies whose labels, masks and headers agree.

One small set (4 studies of each kind, 96-128 pixel images, 10-12 slices) is generated once per
module and checked from every side: bytes, layout, headers per IOD, geometry, HU calibration,
SEG round trip, dciodvfy and the CLI.
"""

from __future__ import annotations

import csv
import dataclasses
import filecmp
import json
import logging
import shutil
import subprocess
import sys
from datetime import datetime
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import typer
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from node.synth import FINDINGS, KINDS, Difficulty, Manifest, StudyRecord, generate, parse_kinds
from node.synth.head import Tissue, head_grid, sample_head, sample_tissues
from node.synth.roster import plan_studies

SEED = 7
STUDIES = 4
SMALL = {"ct_slices": 12, "mr_slices": 10, "ct_size": 128, "mr_size": 96, "cxr_size": 128}


def _generate(out: Path) -> Manifest:
    return generate(out, STUDIES, KINDS, SEED, Difficulty(), **SMALL)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return _generate(tmp_path_factory.mktemp("synth") / "set")


def _read(manifest: Manifest, relative: str) -> pydicom.Dataset:
    return pydicom.dcmread(manifest.out_dir / relative)


def _series(manifest: Manifest, kind: str) -> list[tuple[StudyRecord, list[pydicom.Dataset]]]:
    out = []
    for study in manifest.studies:
        if study.kind == kind:
            out.append((study, [_read(manifest, path) for path in study.instances]))
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


# --- determinism and layout -------------------------------------------------------------------


def test_two_runs_are_byte_identical(synth_set: Manifest, tmp_path: Path) -> None:
    again = _generate(tmp_path / "again")
    first, second = _all_files(synth_set.out_dir), _all_files(again.out_dir)
    assert first == second
    assert len(first) > 50
    _, mismatch, errors = filecmp.cmpfiles(
        synth_set.out_dir, again.out_dir, [str(p) for p in first], shallow=False
    )
    assert mismatch == [] and errors == []


def test_seed_changes_uids_and_workers_do_not_change_bytes(synth_set: Manifest, tmp_path: Path) -> None:
    other = plan_studies(SEED + 1, KINDS, STUDIES, 0.5)
    assert {p.study_uid for p in other}.isdisjoint({s.study_uid for s in synth_set.studies})
    parallel = generate(tmp_path / "parallel", 2, ["ct-head"], SEED, ct_slices=4, ct_size=64, workers=2)
    serial = generate(tmp_path / "serial", 2, ["ct-head"], SEED, ct_slices=4, ct_size=64, workers=1)
    files = _all_files(parallel.out_dir)
    assert files == _all_files(serial.out_dir)
    _, mismatch, errors = filecmp.cmpfiles(
        parallel.out_dir, serial.out_dir, [str(p) for p in files], shallow=False
    )
    assert mismatch == [] and errors == []


def test_layout_file_meta_and_uids(synth_set: Manifest) -> None:
    root = synth_set.out_dir
    images = sorted((root / "dicom").rglob("*.dcm"))
    assert len(images) == synth_set.n_instances == STUDIES * (1 + SMALL["ct_slices"] + SMALL["mr_slices"])
    for path in images:
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study, series, sop = path.relative_to(root / "dicom").parts
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm") == (study, series, sop)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    for path in (root / "seg").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert path.parent.name == ds.StudyInstanceUID and path.stem == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_patients_are_synthetic_and_shared(synth_set: Manifest) -> None:
    datasets = [_read(synth_set, study.instances[0]) for study in synth_set.studies]
    names = {str(ds.PatientName) for ds in datasets}
    assert all(name.startswith("PHANTOM^") for name in names)
    assert all(ds.PatientID.startswith("PH") and ds.Manufacturer == "pacsnode-synth" for ds in datasets)
    # Fewer patients than studies: some patients have several studies.
    assert len({ds.PatientID for ds in datasets}) < len(datasets)
    for ds in datasets:
        assert ds.PatientSex in ("F", "M") and len(ds.PatientBirthDate) == 8 and ds.PatientAge.endswith("Y")
        assert ds.StudyDate and ds.StudyTime and ds.AccessionNumber and ds.StudyID and ds.InstitutionName


# --- labels -------------------------------------------------------------------------------------


def test_labels_csv_and_prevalence(synth_set: Manifest) -> None:
    rows = _csv(synth_set.labels_csv)
    assert len(rows) == STUDIES * len(KINDS)
    manifest = json.loads(synth_set.manifest_json.read_text())
    assert manifest["seed"] == SEED and len(manifest["studies"]) == len(rows)
    for kind in KINDS:
        of_kind = [row for row in rows if row["kind"] == kind]
        assert sum(int(row["any"]) for row in of_kind) == STUDIES // 2  # prevalence 0.5, exactly
        for row in of_kind:
            findings = [int(row[name]) for name in FINDINGS[kind]]
            assert int(row["any"]) == int(any(findings))
            assert bool(row["seg_path"]) == bool(int(row["any"]))
            for other in set(KINDS) - {kind}:
                assert all(row[name] == "" for name in FINDINGS[other])  # not applicable: blank
        if kind == "mr-brain":
            for row in of_kind:
                count, volume = int(row["lesion_count"]), float(row["lesion_volume_mm3"])
                assert (count > 0) == (volume > 0) == bool(int(row["any"]))


def test_slice_labels_match_study_labels(synth_set: Manifest) -> None:
    rows = _csv(synth_set.slice_labels_csv)
    assert len(rows) == STUDIES * SMALL["ct_slices"]
    studies = {row["study_uid"]: row for row in _csv(synth_set.labels_csv)}
    for study_uid in {row["study_uid"] for row in rows}:
        mine = [row for row in rows if row["study_uid"] == study_uid]
        assert [int(row["instance_number"]) for row in mine] == list(range(1, len(mine) + 1))
        for name in ("any", *FINDINGS["ct-head"]):
            assert int(any(int(row[name]) for row in mine)) == int(studies[study_uid][name])


# --- headers per IOD ----------------------------------------------------------------------------

COMMON = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "Modality", "SeriesInstanceUID", "SeriesNumber",
    "Manufacturer", "InstanceNumber", "SOPClassUID", "SOPInstanceUID", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "PixelData",
)  # fmt: skip


def test_dx_header(synth_set: Manifest) -> None:
    for _, (ds,) in _series(synth_set, "cxr"):
        for keyword in (
            *COMMON, "ImagerPixelSpacing", "DetectorType", "PixelIntensityRelationship",
            "PixelIntensityRelationshipSign", "RescaleIntercept", "RescaleSlope", "RescaleType",
            "WindowCenter", "WindowWidth", "BurnedInAnnotation", "ImageLaterality", "PatientOrientation",
            "AnatomicRegionSequence", "AcquisitionContextSequence", "ViewCodeSequence",
        ):  # fmt: skip
            assert keyword in ds, keyword
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("DX", "CHEST", "PA")
        assert ds.PresentationIntentType == "FOR PRESENTATION" and ds.PresentationLUTShape == "IDENTITY"
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
        assert ds.RescaleType == "US" and ds.AnatomicRegionSequence[0].CodingSchemeDesignator == "SCT"
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and pixels.shape == (SMALL["cxr_size"],) * 2 and pixels.max() <= 4095
        # Lungs are dark, mediastinum and abdomen bright: a radiograph, not noise.
        assert pixels.std() > 300


def test_ct_header_geometry_and_order(synth_set: Manifest) -> None:
    for study, datasets in _series(synth_set, "ct-head"):
        assert len(datasets) == SMALL["ct_slices"]
        z = []
        for i, ds in enumerate(datasets, start=1):
            for keyword in (
                *COMMON, "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                "SliceLocation", "FrameOfReferenceUID", "KVP", "ConvolutionKernel", "RescaleIntercept",
                "RescaleSlope", "AcquisitionNumber", "PatientPosition",
            ):  # fmt: skip
                assert keyword in ds, keyword
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"] and ds.BodyPartExamined == "HEAD"
            assert (float(ds.RescaleIntercept), float(ds.RescaleSlope), ds.RescaleType) == (
                -1024.0,
                1.0,
                "HU",
            )
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert ds.InstanceNumber == i and (ds.Rows, ds.Columns) == (SMALL["ct_size"],) * 2
            assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))
            z.append(float(ds.ImagePositionPatient[2]))
        steps = np.diff(z)
        assert np.all(steps > 0), "instances are ordered by ascending position"
        assert np.allclose(steps, float(datasets[0].SliceThickness), atol=1e-3)
        assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
        assert len({tuple(ds.ImagePositionPatient[:2]) for ds in datasets}) == 1


def test_mr_header(synth_set: Manifest) -> None:
    for _, datasets in _series(synth_set, "mr-brain"):
        for ds in datasets:
            for keyword in (
                *COMMON, "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
                "EchoTime", "EchoTrainLength", "MagneticFieldStrength", "ImagedNucleus", "ContrastBolusAgent",
            ):  # fmt: skip
                assert keyword in ds, keyword
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
            assert ds.BodyPartExamined == "BRAIN"
        z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
        assert np.all(np.diff(z) > 0)


# --- pixel values -------------------------------------------------------------------------------


def _tissues_of(manifest: Manifest, study_index: int) -> tuple[object, np.ndarray]:
    study = manifest.studies[study_index]
    anatomy = sample_head(SEED, int(study.patient_id[2:]), Difficulty().anatomy_variation)
    tissues = sample_tissues(anatomy, head_grid(SMALL["ct_size"], SMALL["ct_slices"]))
    return study, tissues.labels


def test_ct_hu_calibration(synth_set: Manifest) -> None:
    for index, study in enumerate(synth_set.studies):
        if study.kind != "ct-head":
            continue
        _, labels = _tissues_of(synth_set, index)
        datasets = [_read(synth_set, path) for path in study.instances]
        hu = np.stack(
            [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
        )
        assert datasets[0].pixel_array.dtype == np.int16
        lesion = np.zeros(hu.shape, dtype=bool)
        if study.seg_path:
            seg = hd.seg.segread(synth_set.out_dir / study.seg_path)
            uids = [ds.SOPInstanceUID for ds in datasets]
            lesion = (
                seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True) > 0
            )
            bleed = np.median(hu[lesion])
            assert 45 <= bleed <= 95, f"haemorrhage at {bleed} HU"
        healthy = ~lesion
        expected = {Tissue.AIR: (-1010, -990), Tissue.WHITE: (22, 34), Tissue.GREY: (32, 44),
                    Tissue.VENTRICLE: (-3, 12), Tissue.BONE: (1300, 1700)}  # fmt: skip
        for tissue, (low, high) in expected.items():
            where = (labels == tissue) & healthy
            if where.sum() < 20:
                continue
            median = float(np.median(hu[where]))
            assert low <= median <= high, f"{tissue.name}: {median} HU"


def test_mr_metastases_enhance(synth_set: Manifest) -> None:
    for study, datasets in _series(synth_set, "mr-brain"):
        if study.seg_path is None:
            continue
        volume = np.stack([ds.pixel_array for ds in datasets]).astype(float)
        seg = hd.seg.segread(synth_set.out_dir / study.seg_path)
        mask = (
            seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in datasets], combine_segments=True)
            > 0
        )
        assert volume[mask].max() > 1.3 * np.median(volume[volume > 300])


# --- SEG ------------------------------------------------------------------------------------------


def test_seg_round_trip_and_references(synth_set: Manifest) -> None:
    slice_rows = _csv(synth_set.slice_labels_csv)
    seen = set()
    for study in synth_set.studies:
        if study.seg_path is None:
            assert not study.positive
            assert not (synth_set.out_dir / "seg" / study.study_uid).exists()
            continue
        raw = (synth_set.out_dir / study.seg_path).read_bytes()
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(raw)))
        assert seg.SegmentationType == "BINARY" and seg.StudyInstanceUID == study.study_uid
        source_uids = [_read(synth_set, path).SOPInstanceUID for path in study.instances]
        referenced = [sop for _, _, sop in seg.get_source_image_uids()]
        assert sorted(referenced) == sorted(source_uids)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uid
        present = [name for name in FINDINGS[study.kind] if study.labels[name]]
        labels = [item.SegmentLabel for item in seg.SegmentSequence]
        assert len(labels) == len(present)
        for item in seg.SegmentSequence:
            assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
            assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator in ("SCT", "DCM")
        if study.kind == "mr-brain":
            assert labels == ["Metastasis"]
        # omit_empty_frames=False: one frame per source image and segment.
        assert int(seg.NumberOfFrames) == len(source_uids) * len(present)
        pixels = seg.get_pixels_by_source_instance(source_uids, skip_overlap_checks=True)
        for number, name in enumerate(present):
            assert pixels[..., number].any(), f"{name} is labelled but its mask is empty"
        if study.kind == "ct-head":
            mine = {row["sop_uid"]: row for row in slice_rows if row["study_uid"] == study.study_uid}
            for k, uid in enumerate(source_uids):
                for number, name in enumerate(present):
                    assert int(mine[uid][name]) == int(pixels[k, ..., number].any())
        if study.kind == "mr-brain":
            ds = _read(synth_set, study.instances[0])
            voxel = float(ds.PixelSpacing[0]) * float(ds.PixelSpacing[1]) * float(ds.SliceThickness)
            assert pixels.sum() * voxel == pytest.approx(study.lesion_volume_mm3, rel=1e-3)
            assert len(study.lesions) >= 1
        seen.add(study.kind)
    assert seen == set(KINDS)


@pytest.mark.parametrize("overlap", [False, True])
def test_seg_keeps_disjoint_and_overlapping_segments(tmp_path: Path, overlap: bool) -> None:
    from node.synth.seg import build_seg

    made = generate(tmp_path / "src", 1, "ct-head", 2, ct_slices=4, ct_size=48)
    sources = [_read(made, path) for path in made.studies[0].instances]
    first = np.zeros((4, 48, 48), dtype=bool)
    second = np.zeros_like(first)
    first[1:3, 10:20, 10:20] = True
    second[2:4, 15 if overlap else 25 : 30, 15:30] = True
    masks = [("epidural", first), ("subdural", second)]
    seg = build_seg(sources, masks, "2.25.1", "2.25.2", "2.25.3", datetime(2024, 1, 8, 9, 30))
    buffer = BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    back = hd.seg.Segmentation.from_dataset(pydicom.dcmread(BytesIO(buffer.getvalue())))
    assert back.SegmentsOverlap == ("YES" if overlap else "NO")
    pixels = back.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources], skip_overlap_checks=True
    )
    assert np.array_equal(pixels[..., 0] > 0, first) and np.array_equal(pixels[..., 1] > 0, second)


# --- dciodvfy -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors(synth_set: Manifest) -> None:
    files = [synth_set.out_dir / synth_set.of_kind(kind)[0].instances[0] for kind in KINDS]
    files += sorted((synth_set.out_dir / "seg").rglob("*.dcm"))
    assert len(files) >= len(KINDS) * 2
    for path in files:
        result = subprocess.run(
            ["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60
        )
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert errors == [] and result.returncode == 0, f"{path.name}:\n{output}"


# --- API, CLI, hygiene --------------------------------------------------------------------------


def test_kinds_and_difficulty_validation() -> None:
    assert parse_kinds("ct-head, cxr,ct-head") == ("ct-head", "cxr")
    with pytest.raises(ValueError, match="allowed kinds: cxr, ct-head, mr-brain"):
        parse_kinds("cxr,xray")
    with pytest.raises(ValueError):
        Difficulty(prevalence=1.5)
    with pytest.raises(ValueError):
        Difficulty(lesion_size_mm=(10.0, 5.0))
    assert Difficulty.preset("hard").lesion_contrast < Difficulty.preset("easy").lesion_contrast


def test_prevalence_extremes(tmp_path: Path) -> None:
    none = generate(tmp_path / "none", 2, "ct-head", 1, Difficulty(prevalence=0.0), ct_slices=3, ct_size=64)
    assert not any(s.positive for s in none.studies) and not (tmp_path / "none" / "seg").exists()
    hard = dataclasses.replace(Difficulty.preset("hard"), prevalence=1.0)
    every = generate(tmp_path / "all", 2, "mr-brain,cxr", 1, hard, mr_slices=3, mr_size=64, cxr_size=64)
    assert all(s.positive and s.seg_path for s in every.studies)


def test_logs_hold_no_patient_identity(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        generate(
            tmp_path / "logged", 1, KINDS, 3, ct_slices=2, mr_slices=2, ct_size=48, mr_size=48, cxr_size=48
        )
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "PHANTOM" not in text and "PH0" not in text


def _flat(text: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(text.replace("│", " ").split())


def _synth_app() -> typer.Typer:
    """The verb as the root CLI wraps a plain function: a Typer app with that one command."""
    from node.synth.command import synth

    app = typer.Typer(add_completion=False)
    app.command(name="synth")(synth)
    return app


def test_cli_rejects_unknown_kind(tmp_path: Path) -> None:
    result = CliRunner().invoke(_synth_app(), ["--out", str(tmp_path / "x"), "--kinds", "cxr,xray"])
    assert result.exit_code == 2
    assert "allowed kinds: cxr, ct-head, mr-brain" in _flat(result.output)
    assert not (tmp_path / "x").exists()


def test_cli_writes_a_set(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["--out", str(out), "--studies", "2", "--kinds", "ct-head", "--ct-slices", "3", "--ct-size", "64",
            "--workers", "1", "--seed", "5", "--prevalence", "1", "--difficulty", "easy"]  # fmt: skip
    result = CliRunner().invoke(_synth_app(), args)
    assert result.exit_code == 0, result.output
    rows = _csv(out / "labels.csv")
    assert len(rows) == 2 and all(row["any"] == "1" for row in rows)
    assert "PHANTOM" not in result.output and "PH0" not in result.output


@pytest.mark.skipif(
    not (Path(sys.executable).parent / "pacsnode").exists(), reason="pacsnode script not installed"
)
def test_console_script_verb(tmp_path: Path) -> None:
    script = str(Path(sys.executable).parent / "pacsnode")
    shown = subprocess.run(
        [script, "synth", "--help"], check=False, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0 and "--kinds" in shown.stdout and "mr-brain" in shown.stdout
    args = [script, "synth", "--out", str(tmp_path / "y"), "--kinds", "pet"]
    bad = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "allowed kinds" in _flat(bad.stdout + bad.stderr)


def test_no_torch_or_monai_import() -> None:
    code = (
        "import sys, node.synth, node.synth.command, node.synth.generate; "
        "bad = [m for m in ('torch', 'monai') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
