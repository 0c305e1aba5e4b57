"""pretrain.index: real files (synth phantoms, pydicom's test files, deliberately broken copies).

A small synth archive (2 studies per kind, 8 slices, 128 px) is generated once per module; each
test indexes its own copy or folder, so runs do not see each other's files.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.synth import Manifest, generate
from pretrain.index import ArchiveIndex, build_index, non_image_name, open_index

SMALL = {"ct_slices": 8, "mr_slices": 8, "ct_size": 128, "mr_size": 128, "cxr_size": 256}


def sample_file(name: str) -> Path:
    """A file of pydicom's test files or of pydicom-data, never downloaded."""
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(str(found))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(tmp_path_factory.mktemp("synth") / "set", 2, "cxr,ct-head,mr-brain", 11, **SMALL)  # type: ignore[arg-type]


@pytest.fixture
def archive(synth: Manifest, tmp_path: Path) -> Path:
    """A private copy of the synth set (tests change files in it)."""
    return Path(shutil.copytree(synth.out_dir, tmp_path / "archive"))


def _frames(index: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(index) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM images ORDER BY path, frame").fetchall()


def test_synth_archive_indexes_every_frame_and_skips_seg(synth: Manifest, archive: Path, tmp_path: Path) -> None:
    index = tmp_path / "index.sqlite"
    summary = build_index([archive], index, workers=2, progress=False)

    segs = sum(1 for study in synth.studies if study.seg_path)
    assert segs > 0
    assert summary.images == synth.n_instances == summary.frames == summary.total_frames
    # labels.csv, slice_labels.csv and manifest.json are in the folder too: not DICOM.
    assert summary.skipped == {"non-image:SEG": segs, "not-dicom": 3}
    assert summary.files_seen == synth.n_instances + segs + 3 == summary.files_read
    assert summary.files_unchanged == 0 and summary.files_per_s > 0

    with open_index(index) as reader:
        counts = reader.counts()
        assert counts.modalities == {"CT": 16, "DX": 2, "MR": 16}
        assert counts.studies == 6 and counts.series == 6
        assert counts.skipped == {"non-image:SEG": segs, "not-dicom": 3}
        series = list(reader.iter_series())
    assert sorted(len(rows) for rows in series) == [1, 1, 8, 8, 8, 8]
    for rows in series:
        first = rows[0]
        assert len({(row.study_uid, row.series_uid) for row in rows}) == 1
        assert Path(first.path).is_absolute() and Path(first.path).is_file()
        assert first.transfer_syntax == "1.2.840.10008.1.2.1" and first.photometric == "MONOCHROME2"
        if first.modality == "DX":
            assert (first.rows, first.columns) == (256, 256) and first.slice_position is None
            assert first.spacing_row is not None and first.spacing_row == first.spacing_col
            assert first.body_part == "CHEST"
        else:
            assert (first.rows, first.columns) == (128, 128) and first.slice_thickness is not None
            positions = [row.slice_position for row in rows if row.slice_position is not None]
            assert len(positions) == len(rows) and positions == sorted(positions)
            assert len(set(positions)) == len(positions)
            # The slice position is z for axial slices: the instance's own ImagePositionPatient.
            ds = pydicom.dcmread(first.path, stop_before_pixels=True)
            assert first.slice_position == pytest.approx(float(ds.ImagePositionPatient[2]))
            assert first.instance_number == int(ds.InstanceNumber)


def test_node_store_layout_indexes_and_hidden_folders_are_ignored(archive: Path, tmp_path: Path) -> None:
    store = archive / "dicom"  # <study>/<series>/<sop>.dcm: the node's study store layout
    incoming = store / ".incoming"
    incoming.mkdir()
    shutil.copy(next(store.glob("*/*/*.dcm")), incoming / "tmp-upload.dcm")
    summary = build_index([store], tmp_path / "index.sqlite", workers=1, progress=True)
    assert summary.skipped == {}
    assert summary.files_seen == summary.images == 34


def _corrupt_archive(archive: Path, folder: Path) -> dict[str, str]:
    """Broken and non-image files next to one good image; returns file name -> expected reason."""
    folder.mkdir()
    good = next((archive / "dicom").glob("*/*/*.dcm"))
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    (folder / "random.dcm").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated-pixels.dcm").write_bytes(data[: len(data) // 2])
    ds = pydicom.dcmread(good)
    inside_header = int(ds["StudyInstanceUID"].file_tell or 0) + 10  # in the middle of the UID's value
    (folder / "truncated-header.dcm").write_bytes(data[:inside_header])
    del ds.PixelData
    ds.save_as(folder / "no-pixels.dcm")
    shutil.copy(good, folder / "good.dcm")
    expected = {
        "random.dcm": "not-dicom",
        "empty.dcm": "not-dicom",
        "notes.txt": "not-dicom",
        "truncated-pixels.dcm": "truncated",
        "truncated-header.dcm": "truncated",
        "no-pixels.dcm": "no-pixel-data",
    }
    for name, reason in {
        "test-SR.dcm": "non-image:SR",
        "reportsi.dcm": "non-image:SR",
        "rtplan.dcm": "non-image:RTPLAN",
        "rtdose.dcm": "non-image:RTDOSE",
        "waveform_ecg.dcm": "non-image:WAVEFORM",
        "liver.dcm": "non-image:SEG",
    }.items():
        shutil.copy(sample_file(name), folder / name)
        expected[name] = reason
    return expected


def test_corrupt_files_and_missing_pixel_data_are_skipped_and_counted(archive: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    expected = _corrupt_archive(archive, folder)
    index = tmp_path / "index.sqlite"
    summary = build_index([folder], index, workers=1, progress=False)

    reasons: dict[str, int] = {}
    for reason in expected.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    assert summary.skipped == dict(sorted(reasons.items()))
    assert summary.images == summary.frames == 1
    with sqlite3.connect(index) as conn:
        stored = dict(conn.execute("SELECT path, reason FROM files WHERE status = 'skipped'").fetchall())
        image_paths = [row[0] for row in conn.execute("SELECT path FROM images")]
    assert {Path(path).name: reason for path, reason in stored.items()} == expected
    assert [Path(path).name for path in image_paths] == ["good.dcm"]

    # Skipped files are remembered: a second run reads nothing.
    again = build_index([folder], index, workers=1, progress=False)
    assert again.files_read == 0 and again.files_unchanged == len(expected) + 1 and again.skipped == {}


def test_second_run_reads_only_new_and_changed_files(synth: Manifest, archive: Path, tmp_path: Path) -> None:
    index = tmp_path / "index.sqlite"
    first = build_index([archive], index, workers=1, progress=False)
    assert first.files_read == first.files_seen

    # Grow the archive by a new study, change one file, delete another.
    grown = generate(tmp_path / "more", 1, "cxr", 99, **SMALL)  # type: ignore[arg-type]
    new_study = Path(grown.studies[0].instances[0]).parts[1]
    shutil.copytree(grown.out_dir / "dicom" / new_study, archive / "dicom" / new_study)
    changed = archive / synth.studies[-1].instances[0]
    ds = pydicom.dcmread(changed)
    ds.InstanceNumber = 4242
    ds.save_as(changed)
    removed = archive / synth.studies[-1].instances[1]
    removed.unlink()

    second = build_index([archive], index, workers=1, progress=False)
    assert second.files_read == 2  # the new instance and the changed one
    assert second.files_unchanged == first.files_seen - 2
    assert second.files_removed == 1
    assert second.images == 2 and second.skipped == {}
    assert second.total_frames == first.total_frames  # +1 new, -1 removed
    rows = {Path(row["path"]).name: row for row in _frames(index)}
    assert rows[changed.name]["instance_number"] == 4242
    assert removed.name not in rows
    with sqlite3.connect(index) as conn:
        assert conn.execute("SELECT COUNT(*) FROM files WHERE path = ?", (str(removed),)).fetchone()[0] == 0

    third = build_index([archive], index, workers=1, progress=False)
    assert third.files_read == 0 and third.files_unchanged == third.files_seen


def test_multi_frame_objects_give_one_row_per_frame(tmp_path: Path) -> None:
    folder = tmp_path / "multi"
    folder.mkdir()
    for name in ("emri_small.dcm", "eCT_Supplemental.dcm", "emri_small_jpeg_2k_lossless.dcm", "CT_small.dcm"):
        shutil.copy(sample_file(name), folder / name)
    index = tmp_path / "index.sqlite"
    summary = build_index([folder], index, workers=1, progress=False)
    assert summary.images == 4 and summary.frames == 10 + 2 + 10 + 1

    rows = _frames(index)
    by_file: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        by_file.setdefault(Path(row["path"]).name, []).append(row)
    assert [row["frame"] for row in by_file["emri_small.dcm"]] == list(range(10))
    assert {row["number_of_frames"] for row in by_file["emri_small.dcm"]} == {10}
    assert by_file["emri_small_jpeg_2k_lossless.dcm"][0]["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    # Enhanced CT: positions and spacing come from the functional groups, per frame.
    enhanced = by_file["eCT_Supplemental.dcm"]
    ds = pydicom.dcmread(sample_file("eCT_Supplemental.dcm"), stop_before_pixels=True)
    orientation = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    normal = np.cross(orientation[:3], orientation[3:])
    for row, item in zip(enhanced, ds.PerFrameFunctionalGroupsSequence, strict=True):
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert row["slice_position"] == pytest.approx(float(np.dot(normal, position)))
    assert enhanced[0]["slice_position"] != enhanced[1]["slice_position"]
    assert enhanced[0]["spacing_row"] is not None and enhanced[0]["slice_thickness"] is not None
    assert enhanced[0]["modality"] == "CT"

    with ArchiveIndex(index) as reader:
        assert len(reader) == 23
        series = list(reader.iter_series())
    emri = next(rows for rows in series if any(row.path.endswith("emri_small.dcm") for row in rows))
    # No positions in emri_small: its frames come in instance, then frame order.
    assert [row.frame for row in emri if row.path.endswith("emri_small.dcm")] == list(range(10))
    assert sum(len(rows) for rows in series) == 23


def test_sop_class_names() -> None:
    assert non_image_name("1.2.840.10008.5.1.4.1.1.88.22") == "SR"
    assert non_image_name("1.2.840.10008.5.1.4.1.1.88.59") == "KO"
    assert non_image_name("1.2.840.10008.5.1.4.1.1.11.1") == "PR"
    assert non_image_name("1.2.840.10008.5.1.4.1.1.66.4") == "SEG"
    assert non_image_name("1.2.840.10008.5.1.4.1.1.104.1") == "PDF"
    assert non_image_name("1.2.840.10008.5.1.4.1.1.481.1") is None  # RT Image
    assert non_image_name("1.2.840.10008.5.1.4.1.1.2") is None  # CT Image
    assert non_image_name("1.2.840.10008.5.1.4.1.1.1.1") is None  # DX


def test_missing_archive_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_index([tmp_path / "nope"], tmp_path / "index.sqlite", progress=False)
    assert not os.path.exists(tmp_path / "index.sqlite")
