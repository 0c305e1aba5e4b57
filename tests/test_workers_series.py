"""Which images a model runs on: modality, primary images, duplicate reconstructions, slice order,
enhanced multi-frame objects, and the reasons given when nothing fits."""

from __future__ import annotations

import copy
from pathlib import Path

import dicom_factory as f
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from models.card import AppliesTo
from node.messages import SeriesRef
from workers.series import NotApplicable, select_series

MR = AppliesTo(modalities=("MR",), body_parts=("HEAD", "BRAIN"), min_slices=8)


def _refs(store: Path, *series: list[Dataset]) -> list[SeriesRef]:
    refs = []
    for datasets in series:
        folder = store / str(datasets[0].StudyInstanceUID) / str(datasets[0].SeriesInstanceUID)
        paths = f.write(datasets, folder)
        refs.append(SeriesRef(series_uid=str(datasets[0].SeriesInstanceUID), modality=str(datasets[0].Modality),
                              instances=[str(p.relative_to(store)) for p in paths]))
    return refs


def _series(study_uid: str, count: int, thickness: float, number: int, image_type: tuple[str, ...] = (
        "ORIGINAL", "PRIMARY", "AXIAL")) -> list[Dataset]:
    series_uid = generate_uid()
    return [f.image(study_uid, series_uid, sop_class=f.MR_IMAGE, modality="MR", body_part="BRAIN",
                    instance_number=i + 1, series_number=number, slice_thickness=thickness, image_type=image_type)
            for i in range(count)]


def test_localizers_and_derived_images_are_skipped_and_the_fullest_thinnest_series_wins(tmp_path: Path) -> None:
    study = generate_uid()
    thick, thin = _series(study, 10, 5.0, 2), _series(study, 10, 1.0, 3)
    localizer = _series(study, 30, 1.0, 1, ("ORIGINAL", "PRIMARY", "LOCALIZER"))
    mpr = _series(study, 40, 1.0, 4, ("DERIVED", "SECONDARY", "MPR"))
    chosen = select_series(tmp_path, _refs(tmp_path, thick, thin, localizer, mpr), MR)
    assert chosen.series_uid == thin[0].SeriesInstanceUID
    assert chosen.skipped == {"localizer or derived image": 70}
    longer = _series(study, 12, 5.0, 5)
    assert select_series(tmp_path, _refs(tmp_path, thin, longer), MR).series_uid == longer[0].SeriesInstanceUID


def test_slices_are_ordered_along_the_normal_not_by_file_or_instance_number(tmp_path: Path) -> None:
    series = _series(generate_uid(), 9, 3.0, 1)
    for ds, z in zip(series, [9, 2, 7, 1, 8, 3, 6, 4, 5], strict=True):
        ds.ImagePositionPatient = [0.0, 0.0, float(z) * 3.0]
    chosen = select_series(tmp_path, _refs(tmp_path, series), MR)
    assert [s.position for s in chosen.slices] == [z * 3.0 for z in range(1, 10)]
    assert chosen.spacing_mm() == (3.0, 1.0, 1.0)


def test_an_enhanced_multi_frame_object_gives_one_slice_per_frame_in_position_order(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm", download=False))
    frames = int(ds.NumberOfFrames)
    order = list(reversed(range(frames)))  # frame 0 lies highest: position order is reversed frame order
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for frame in range(frames):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(order[frame]) * 2.0]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.BodyPartExamined = "BRAIN"
    chosen = select_series(tmp_path, _refs(tmp_path, [ds]), MR)
    assert len(chosen.slices) == frames and len(chosen.headers) == 1
    assert [s.frame for s in chosen.slices] == list(reversed(range(frames)))


@pytest.mark.parametrize(("applies", "reason"), [
    (AppliesTo(modalities=("CT",), min_slices=8), "no image this model applies to (CT): modality MR x9"),
    (AppliesTo(modalities=("MR",), body_parts=("CHEST",)), "body part BRAIN x9"),
    (AppliesTo(modalities=("MR",), min_slices=20), "series has 9 usable slices, the model needs at least 20"),
])
def test_what_does_not_fit_ends_with_the_reason(tmp_path: Path, applies: AppliesTo, reason: str) -> None:
    series = _series(generate_uid(), 9, 3.0, 1)
    with pytest.raises(NotApplicable, match=reason.replace("(", r"\(").replace(")", r"\)")):
        select_series(tmp_path, _refs(tmp_path, copy.deepcopy(series)), applies)


def test_unreadable_files_are_counted_not_fatal(tmp_path: Path) -> None:
    series = _series(generate_uid(), 9, 3.0, 1)
    refs = _refs(tmp_path, series)
    (tmp_path / refs[0].instances[0]).write_bytes(b"not dicom at all")
    chosen = select_series(tmp_path, refs, AppliesTo(modalities=("MR",), min_slices=8))
    assert len(chosen.slices) == 8 and sum(chosen.skipped.values()) == 1
