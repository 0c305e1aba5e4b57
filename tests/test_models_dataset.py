"""models.preprocess and models.dataset on a tiny phantom set: studies, labels, masks, splits, inputs.

One synth set (6 studies each of cxr, ct-head, mr-brain; 128 px, 8 slices) is generated once per
module and indexed into one index file that every collection reuses incrementally. Expected
values come from the generator's manifest and from reading the files with pydicom directly, not
from the code under test.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydantic
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from models.dataset import (
    SPLITS,
    StudyItem,
    StudyList,
    collect_studies,
    patient_split,
    read_seg_masks,
    subsample,
)
from models.preprocess import (
    InputSpec,
    PixelDataError,
    Window,
    image_input,
    letterbox_box,
    mask_input,
    mask_output,
)
from node.synth import Manifest, StudyRecord, generate
from pretrain.augment import DEFAULT_CT_WINDOWS, eval_view
from pretrain.decode import prepare_image, resize_square
from pretrain.shards import decode_hu, decode_unit

SLICES = 8
SIZE = 128


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return generate(
        tmp_path_factory.mktemp("synth") / "set",
        studies=6,
        kinds="cxr,ct-head,mr-brain",
        seed=0,
        ct_slices=SLICES,
        mr_slices=SLICES,
        ct_size=SIZE,
        mr_size=SIZE,
        cxr_size=SIZE,
    )


@pytest.fixture(scope="module")
def index_file(synth: Manifest) -> Path:
    return synth.out_dir.parent / "index.sqlite"


def _collect(
    synth: Manifest, index_file: Path, modality: str | tuple[str, ...], **kwargs: object
) -> StudyList:
    options: dict[str, object] = {"index_path": index_file, "workers": 1, **kwargs}
    return collect_studies(synth.out_dir, synth.labels_csv, modality=modality, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cxr(synth: Manifest, index_file: Path) -> StudyList:
    return _collect(synth, index_file, ("CR", "DX"))


@pytest.fixture(scope="module")
def ct(synth: Manifest, index_file: Path) -> StudyList:
    return _collect(synth, index_file, "CT", slice_labels=synth.slice_labels_csv)


@pytest.fixture(scope="module")
def mr(synth: Manifest, index_file: Path) -> StudyList:
    return _collect(synth, index_file, "MR")


@pytest.fixture(scope="module")
def everything(synth: Manifest, index_file: Path) -> StudyList:
    return _collect(synth, index_file, ("DX", "CT", "MR"))


def _records(synth: Manifest) -> dict[str, StudyRecord]:
    return {record.study_uid: record for record in synth.studies}


def _sop(relative: str) -> str:
    return Path(relative).stem


def _write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


# ---------------------------------------------------------------------------------------------
# collect_studies


def test_cxr_studies_carry_their_labels_seg_and_spacing(synth: Manifest, cxr: StudyList) -> None:
    records = _records(synth)
    expected = {r.study_uid for r in synth.of_kind("cxr")}
    assert [item.study_uid for item in cxr] == sorted(expected)
    assert cxr.summary.unlabelled == 0 and cxr.summary.other_modality == 12
    for item in cxr:
        record = records[item.study_uid]
        assert item.modality == "DX" and item.series_uid == record.series_uid
        assert [ref.sop_uid for ref in item.slices] == [_sop(record.instances[0])]
        assert item.slices[0].frame == 0 and item.slices[0].path.is_file()
        # Blank cells of other kinds' findings are no labels; the kind's own findings are all there.
        assert {k: v for k, v in item.labels.items() if k not in ("lesion_count", "lesion_volume_mm3")} == {
            name: float(value) for name, value in record.labels.items()
        }
        assert item.labels["lesion_count"] == len(record.lesions)
        assert item.seg_path == (synth.out_dir / record.seg_path if record.seg_path else None)
        header = pydicom.dcmread(item.slices[0].path, stop_before_pixels=True)
        assert item.pixel_spacing == tuple(float(v) for v in header.ImagerPixelSpacing)
        assert item.slice_spacing is None and item.slice_labels == {}


def test_ct_slices_are_ordered_and_carry_slice_labels(synth: Manifest, ct: StudyList) -> None:
    records = _records(synth)
    slices = {s.sop_uid: s for s in synth.slices}
    assert len(ct) == 6
    for item in ct:
        record = records[item.study_uid]
        # The generator writes slice k at z0 + k * spacing: instance order is slice order.
        assert [ref.sop_uid for ref in item.slices] == [_sop(p) for p in record.instances]
        positions = [ref.position for ref in item.slices]
        assert all(p is not None for p in positions)
        assert positions == sorted(positions)  # type: ignore[type-var]
        z = [slices[ref.sop_uid].z_mm for ref in item.slices]
        assert item.slice_spacing == pytest.approx(z[1] - z[0], abs=1e-3)
        assert set(item.slice_labels) == {ref.sop_uid for ref in item.slices}
        for sop, labels in item.slice_labels.items():
            assert labels == {name: float(value) for name, value in slices[sop].labels.items()}
        assert max(labels["any"] for labels in item.slice_labels.values()) == item.labels["any"]
    assert any(item.labels["any"] == 1.0 for item in ct) and any(item.labels["any"] == 0.0 for item in ct)


def test_patient_key_is_a_hash_shared_by_a_patients_studies(synth: Manifest, everything: StudyList) -> None:
    by_patient: dict[str, set[str]] = {}
    for record in synth.studies:
        by_patient.setdefault(record.patient_id, set()).add(record.study_uid)
    keys = {item.study_uid: item.patient_key for item in everything}
    assert len(everything) == 18
    for patient_id, studies in by_patient.items():
        assert {keys[uid] for uid in studies} == {hashlib.sha256(patient_id.encode()).hexdigest()[:16]}
    assert len(set(keys.values())) == len(by_patient)
    assert max(len(studies) for studies in by_patient.values()) > 1  # the test means something
    raw_ids = set(by_patient)
    assert not any(patient_id in repr(item) for item in everything for patient_id in raw_ids)


def test_studies_without_labels_are_left_out_and_counted(
    synth: Manifest, index_file: Path, tmp_path: Path
) -> None:
    header, rows = _read_csv(synth.labels_csv)
    ct_rows = [row for row in rows if row["modality"] == "CT"]
    labels = _write_csv(tmp_path / "labels.csv", header, ct_rows[:4])
    (tmp_path / "seg").symlink_to(synth.out_dir / "seg")
    items = collect_studies(synth.out_dir, labels, modality="CT", index_path=index_file, workers=1)
    assert [item.study_uid for item in items] == sorted(row["study_uid"] for row in ct_rows[:4])
    assert items.summary.unlabelled == 2 and items.summary.other_modality == 0


def test_label_rows_for_unknown_studies_are_an_error(
    synth: Manifest, index_file: Path, tmp_path: Path
) -> None:
    header, rows = _read_csv(synth.labels_csv)
    stranger = dict(rows[0], study_uid="1.2.3.999", seg_path="")
    labels = _write_csv(tmp_path / "labels.csv", header, [*rows, stranger])
    with pytest.raises(ValueError, match=r"1 label row\(s\) name studies that are not in .*1\.2\.3\.999"):
        collect_studies(synth.out_dir, labels, modality="CT", index_path=index_file, workers=1)


def test_slice_labels_for_unknown_images_are_an_error(
    synth: Manifest, index_file: Path, tmp_path: Path
) -> None:
    header, rows = _read_csv(synth.slice_labels_csv)
    bad = _write_csv(tmp_path / "slices.csv", header, [*rows, dict(rows[0], sop_uid="1.2.3.888")])
    with pytest.raises(ValueError, match=r"1 slice label row\(s\) name images .*1\.2\.3\.888"):
        _collect(synth, index_file, "CT", slice_labels=bad)


def test_labels_without_a_study_uid_column_are_an_error(
    synth: Manifest, index_file: Path, tmp_path: Path
) -> None:
    header, rows = _read_csv(synth.labels_csv)
    renamed = ["study" if name == "study_uid" else name for name in header]
    rows = [{("study" if k == "study_uid" else k): v for k, v in row.items()} for row in rows]
    labels = _write_csv(tmp_path / "labels.csv", renamed, rows)
    with pytest.raises(ValueError, match="no study UID column"):
        collect_studies(synth.out_dir, labels, modality="CT", index_path=index_file, workers=1)


def test_no_studies_of_the_modality_is_an_error(synth: Manifest, index_file: Path) -> None:
    with pytest.raises(ValueError, match=r"no studies with images of modality US .*CT, DX, MR"):
        _collect(synth, index_file, "US")


def test_missing_seg_file_is_an_error(synth: Manifest, index_file: Path, tmp_path: Path) -> None:
    header, rows = _read_csv(synth.labels_csv)
    labels = _write_csv(tmp_path / "labels.csv", header, rows)  # seg paths now relative to tmp_path
    with pytest.raises(ValueError, match="seg_path"):
        collect_studies(synth.out_dir, labels, modality="MR", index_path=index_file, workers=1)


def _copy_series(sources: list[Path], folder: Path, image_type: list[str], count: int) -> str:
    """``count`` copies of the first source as a new series with the given ImageType."""
    series_uid = generate_uid(entropy_srcs=[str(folder), *image_type])
    folder.mkdir(parents=True)
    for i in range(count):
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = image_type
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    return series_uid


def test_series_choice_skips_localizers_and_derived_images(
    synth: Manifest, index_file: Path, tmp_path: Path
) -> None:
    record = synth.of_kind("ct-head")[0]
    sources = [synth.out_dir / p for p in record.instances]
    data = tmp_path / "data"
    original = data / "original"
    original.mkdir(parents=True)
    for source in sources:
        shutil.copy(source, original / source.name)
    _copy_series(sources, data / "scout", ["ORIGINAL", "PRIMARY", "LOCALIZER"], SLICES + 3)
    _copy_series(sources, data / "mpr", ["DERIVED", "PRIMARY", "REFORMATTED"], SLICES + 2)
    _copy_series(sources, data / "capture", ["ORIGINAL", "SECONDARY"], SLICES + 1)
    short = _copy_series(sources, data / "short", ["ORIGINAL", "PRIMARY", "AXIAL"], 3)
    header, rows = _read_csv(synth.labels_csv)
    labels = _write_csv(
        tmp_path / "labels.csv", header, [r for r in rows if r["study_uid"] == record.study_uid]
    )
    # The shared index file also holds the synth set: only files under ``data`` may count.
    items = collect_studies(data, labels, modality="CT", index_path=index_file, workers=1)
    assert len(items) == 1 and items[0].series_uid == record.series_uid != short
    assert items.summary.unlabelled == 0 and items[0].slices[0].path.is_relative_to(data.resolve())
    assert [ref.sop_uid for ref in items[0].slices] == [_sop(p) for p in record.instances]
    assert items.summary.skipped_frames == 3 * SLICES + 6


# ---------------------------------------------------------------------------------------------
# read_seg_masks


def _seg_by_pydicom(path: Path) -> dict[str, np.ndarray]:
    """Segments united per source SOP UID, read frame by frame with pydicom alone."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    out: dict[str, np.ndarray] = {}
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        sop = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        out[sop] = out.get(sop, np.zeros(frame.shape, dtype=bool)) | (frame > 0)
    return out


@pytest.mark.parametrize("kind", ["mr", "ct"])
def test_seg_masks_match_the_seg_frames(kind: str, request: pytest.FixtureRequest) -> None:
    items: StudyList = request.getfixturevalue(kind)
    positives = [item for item in items if item.labels["any"] == 1.0]
    assert positives
    for item in positives:
        assert item.seg_path is not None
        masks = read_seg_masks(item)
        assert list(masks) == [ref.sop_uid for ref in item.slices]
        expected = _seg_by_pydicom(item.seg_path)
        assert any(mask.any() for mask in masks.values())
        for sop, mask in masks.items():
            assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
            np.testing.assert_array_equal(mask, expected.get(sop, np.zeros((SIZE, SIZE), dtype=bool)))
        if kind == "ct":  # the per-slice labels say which slices bleed
            bleeding = {sop for sop, labels in item.slice_labels.items() if labels["any"] == 1.0}
            assert {sop for sop, mask in masks.items() if mask.any()} == bleeding


def test_negative_studies_get_empty_masks_positive_ones_need_a_seg(mr: StudyList) -> None:
    negative = next(item for item in mr if item.labels["any"] == 0.0)
    assert negative.seg_path is None
    masks = read_seg_masks(negative)
    assert list(masks) == [ref.sop_uid for ref in negative.slices]
    assert all(mask.shape == (SIZE, SIZE) and not mask.any() for mask in masks.values())
    positive = next(item for item in mr if item.labels["any"] == 1.0)
    with pytest.raises(ValueError, match="positive but has no SEG"):
        read_seg_masks(dataclasses.replace(positive, seg_path=None))


def test_a_seg_of_other_images_is_an_error(mr: StudyList) -> None:
    first, second = [item for item in mr if item.seg_path is not None][:2]
    assert second.seg_path is not None
    listed = min(ref.sop_uid for ref in second.slices)  # the message lists the first UIDs in sorted order
    with pytest.raises(
        ValueError,
        match=rf"SEG {second.seg_path.name} references {SLICES} image\(s\) that are not "
        rf"slices of series {first.series_uid}.*{listed}",
    ):
        read_seg_masks(dataclasses.replace(first, seg_path=second.seg_path))


# ---------------------------------------------------------------------------------------------
# patient_split, subsample


def test_patient_split_keeps_patients_apart_and_spreads_positives(everything: StudyList) -> None:
    splits = patient_split(everything, seed=0)
    assert list(splits) == list(SPLITS)
    patients = [{item.patient_key for item in splits[name]} for name in SPLITS]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert sorted(i.study_uid for name in SPLITS for i in splits[name]) == sorted(
        i.study_uid for i in everything
    )
    for name in SPLITS:
        assert any(item.labels["any"] == 1.0 for item in splits[name]), name
        assert any(item.labels["any"] == 0.0 for item in splits[name]), name
    assert len(patients[0]) > len(patients[1]) and len(patients[0]) > len(patients[2])


def test_patient_split_is_deterministic_and_seeded(everything: StudyList) -> None:
    def uids(split: dict[str, list[StudyItem]]) -> dict[str, list[str]]:
        return {name: sorted(item.study_uid for item in items) for name, items in split.items()}

    reference = uids(patient_split(everything, seed=0))
    shuffled = list(everything)
    random.Random(1).shuffle(shuffled)
    assert uids(patient_split(shuffled, seed=0)) == reference
    assert any(uids(patient_split(everything, seed=seed)) != reference for seed in (1, 2, 3))
    with pytest.raises(ValueError, match="fractions"):
        patient_split(everything, fractions=(0.5, 0.3, 0.3))


def _item(study_uid: str, patient: str, positive: bool) -> StudyItem:
    return StudyItem(
        study_uid=study_uid,
        patient_key=patient,
        modality="CT",
        series_uid=study_uid + ".1",
        slices=[],
        labels={"any": float(positive)},
        slice_labels={},
        seg_path=None,
        pixel_spacing=None,
        slice_spacing=None,
    )


@pytest.mark.parametrize("seed", range(5))
def test_three_positive_patients_give_every_split_a_positive(seed: int) -> None:
    items = [_item(f"1.2.{i}", f"p{i}", positive=i < 3) for i in range(13)]
    items.append(_item("1.2.99", "p0", positive=False))  # a positive patient's negative study stays with them
    splits = patient_split(items, seed=seed)
    assert [sum(item.labels["any"] == 1.0 for item in splits[name]) for name in SPLITS] == [1, 1, 1]
    assert [len({item.patient_key for item in splits[name]}) for name in SPLITS] == [7, 3, 3]
    home = next(name for name in SPLITS if any(item.study_uid == "1.2.0" for item in splits[name]))
    assert any(item.study_uid == "1.2.99" for item in splits[home])


def test_subsample_is_nested_stratified_and_deterministic(everything: StudyList) -> None:
    positives = sum(item.labels["any"] == 1.0 for item in everything)
    subsets = [
        {item.study_uid for item in subsample(everything, fraction=f, seed=3)} for f in (0.2, 0.5, 0.8, 1.0)
    ]
    assert [len(s) for s in subsets] == [round(f * 18) for f in (0.2, 0.5, 0.8, 1.0)]
    for smaller, larger in itertools.pairwise(subsets):
        assert smaller < larger
    for size in range(1, len(everything) + 1):
        chosen = subsample(everything, count=size, seed=3)
        assert abs(sum(item.labels["any"] == 1.0 for item in chosen) - positives * size / 18) <= 1
    shuffled = list(everything)
    random.Random(5).shuffle(shuffled)
    assert {item.study_uid for item in subsample(shuffled, fraction=0.5, seed=3)} == subsets[1]
    assert {item.study_uid for item in subsample(everything, count=9, seed=3)} == subsets[1]
    assert any(
        {item.study_uid for item in subsample(everything, fraction=0.5, seed=s)} != subsets[1] for s in (4, 5)
    )
    order = [item.study_uid for item in everything]
    kept = [item.study_uid for item in subsample(everything, fraction=0.5, seed=3)]
    assert kept == [uid for uid in order if uid in kept]
    with pytest.raises(ValueError, match="exactly one"):
        subsample(everything, fraction=0.5, count=3)


# ---------------------------------------------------------------------------------------------
# preprocess


def _pretrain_path(source: Path | Dataset, frame: int, size: int, channels: int) -> torch.Tensor:
    stored, encoding = prepare_image(source, frame, size)
    decoded = decode_hu(stored) if encoding == "hu" else decode_unit(stored)
    return eval_view(torch.from_numpy(decoded), encoding, size, channels)


@pytest.mark.parametrize(
    ("kind", "channels", "size"), [("ct", 1, 96), ("ct", 3, 160), ("cxr", 3, 96), ("mr", 1, 64)]
)
def test_image_input_is_the_pretrain_path(
    kind: str, channels: int, size: int, request: pytest.FixtureRequest
) -> None:
    item: StudyItem = request.getfixturevalue(kind)[0]
    ref = item.slices[len(item.slices) // 2]
    spec = InputSpec(size=size, channels=channels)
    image = image_input(ref.path, ref.frame, spec)
    assert image.dtype == torch.float32 and tuple(image.shape) == (channels, size, size)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    torch.testing.assert_close(image, _pretrain_path(ref.path, ref.frame, size, channels), rtol=0, atol=0)
    torch.testing.assert_close(image_input(pydicom.dcmread(ref.path), ref.frame, spec), image, rtol=0, atol=0)
    if kind != "ct" and channels > 1:
        torch.testing.assert_close(image[1], image[0], rtol=0, atol=0)


def test_ct_input_is_the_windowed_hounsfield_image(ct: StudyList) -> None:
    """At the native size nothing is resampled: each channel is a window of the file's HU values."""
    ref = ct[0].slices[SLICES // 2]
    ds = pydicom.dcmread(ref.path)
    hu = np.clip(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), -1024, None)
    image = image_input(ref.path, 0, InputSpec(size=SIZE, channels=3))
    for channel, (centre, width) in enumerate(DEFAULT_CT_WINDOWS[:3]):
        expected = np.clip((hu - (centre - width / 2)) / width, 0, 1)
        np.testing.assert_allclose(image[channel].numpy(), expected, atol=1e-5)
    custom = image_input(ref.path, 0, InputSpec(size=SIZE, windows=(Window(name="custom", centre=0.0, width=100.0),)))
    np.testing.assert_allclose(custom[0].numpy(), np.clip((hu + 50) / 100, 0, 1), atol=1e-5)


def test_input_spec_is_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="one window per channel"):
        InputSpec(channels=2, windows=(Window.named("brain"),))
    with pytest.raises(pydantic.ValidationError, match="greater than 0"):
        InputSpec(windows=({"name": "flat", "centre": 40.0, "width": 0.0},))  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="default CT windows"):
        InputSpec(channels=len(DEFAULT_CT_WINDOWS) + 1)
    with pytest.raises(pydantic.ValidationError):
        InputSpec(size=128, window=(Window.named("brain"),))  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        InputSpec().size = 3  # type: ignore[misc]
    assert InputSpec.model_validate_json(InputSpec(channels=2).model_dump_json()) == InputSpec(channels=2)


def test_bad_pixels_raise_pixel_data_error(ct: StudyList) -> None:
    ds = pydicom.dcmread(ct[0].slices[0].path)
    ds.PixelData = np.zeros((SIZE, SIZE), dtype=np.int16).tobytes()
    with pytest.raises(PixelDataError) as caught:
        image_input(ds, 0, InputSpec(size=64))
    assert caught.value.reason == "blank"


@pytest.mark.parametrize(
    ("rows", "columns", "aspect", "size"),
    [(128, 128, 1.0, 256), (200, 120, 0.625, 96), (90, 300, 1.7, 128), (64, 64, 0.5, 64)],
)
def test_letterbox_box_is_where_resize_square_puts_the_image(
    rows: int, columns: int, aspect: float, size: int
) -> None:
    top, left, height, width = letterbox_box(rows, columns, aspect, size)
    placed = resize_square(np.ones((rows, columns), dtype=np.float32), size, fill=0.0, aspect=aspect) > 0.5
    expected = np.zeros((size, size), dtype=bool)
    expected[top : top + height, left : left + width] = True
    np.testing.assert_array_equal(placed, expected)


def _grid_source(rows: int, columns: int, spacing: tuple[float, float]) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    return ds


def _blobs(rows: int, columns: int) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :columns]
    mask = np.zeros((rows, columns), dtype=bool)
    for cy, cx, ry, rx in ((0.3, 0.3, 0.15, 0.2), (0.65, 0.6, 0.2, 0.12), (0.8, 0.25, 0.1, 0.15)):
        mask |= ((yy - cy * rows) / (ry * rows)) ** 2 + ((xx - cx * columns) / (rx * columns)) ** 2 <= 1
    return mask


@pytest.mark.parametrize(
    ("rows", "columns", "spacing", "size"),
    [
        (128, 128, (0.8, 0.8), 256),
        (128, 128, (0.8, 0.8), 96),
        (200, 120, (0.5, 0.8), 128),
        (120, 200, (0.9, 0.6), 96),
        (160, 160, (1.0, 0.5), 128),
    ],
)
def test_mask_round_trip(rows: int, columns: int, spacing: tuple[float, float], size: int) -> None:
    source = _grid_source(rows, columns, spacing)
    spec = InputSpec(size=size)
    mask = _blobs(rows, columns)
    letterboxed = mask_input(mask, source, spec)
    assert letterboxed.dtype == torch.uint8 and tuple(letterboxed.shape) == (size, size)
    assert set(torch.unique(letterboxed).tolist()) == {0, 1}
    top, left, height, width = letterbox_box(rows, columns, spacing[0] / spacing[1], size)
    assert height == round(size * min(1.0, rows * spacing[0] / (columns * spacing[1])))
    assert not letterboxed[:top].any() and not letterboxed[top + height :].any()
    assert not letterboxed[:, :left].any() and not letterboxed[:, left + width :].any()
    back = mask_output(letterboxed.float(), source, spec)
    assert back.dtype == np.float32 and back.shape == (rows, columns)
    assert _dice(back >= 0.5, mask) > 0.95


def test_mask_input_lies_over_the_image(ct: StudyList) -> None:
    """The head outline of a CT slice, given anisotropic pixels: mask and image letterbox alike."""
    ds = pydicom.dcmread(ct[0].slices[SLICES // 2].path)
    ds.PixelSpacing = ["0.5", "1.0"]  # rows half as tall: the image is squashed vertically
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    spec = InputSpec(size=96, windows=(Window(name="outline", centre=-500.0, width=1.0),))  # a step at -500 HU
    image = image_input(ds, 0, spec)[0] > 0.5
    mask = mask_input(hu > -500, ds, spec).bool()
    assert int(mask[:20].sum()) == 0 and int(mask.sum()) > 500  # padded above: rows were squashed
    assert _dice(image.numpy(), mask.numpy()) > 0.97


def test_mask_shapes_are_checked(ct: StudyList) -> None:
    path = ct[0].slices[0].path
    with pytest.raises(ValueError, match="does not match"):
        mask_input(np.zeros((SIZE, SIZE + 1), dtype=bool), path, InputSpec(size=64))
    with pytest.raises(ValueError, match="prob must be"):
        mask_output(torch.zeros(32, 32), path, InputSpec(size=64))


@pytest.fixture(autouse=True)
def _no_patient_ids_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    assert "PH0" not in caplog.text
