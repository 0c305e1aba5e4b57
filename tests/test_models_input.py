"""A task's declared input (CT windows by name as channels, neighbouring slices as 2.5D context,
resolution) is what training, evaluation and inference build, checked against pixel arithmetic
done here from the DICOM files themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from models.card import read_card
from models.dataset import collect_studies
from models.finetune import FinetuneConfig, batch_inputs, build_data
from models.preprocess import InputSpec, Window, neighbour_picks, stack_neighbours
from models.registry import resolve
from models.tasks import HEAD_CT_WINDOWS, task_spec
from models.untrained import install_untrained_models
from node.synth import generate
from workers.inference import _batches
from workers.series import SelectedSeries, SliceInput

SIZE = 64  # the phantoms' own size: the letterbox and the resampling are then the identity


@pytest.fixture(scope="module")
def head_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    generate(root, studies=2, kinds="ct-head", seed=3, ct_slices=6, ct_size=SIZE)
    return root


def _series(root: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """The first study's slices, in slice order (ImagePositionPatient z)."""
    files = sorted((root / "dicom").rglob("*.dcm"))
    first_study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    read = [(p, pydicom.dcmread(p)) for p in files]
    chosen = [(p, ds) for p, ds in read if ds.StudyInstanceUID == first_study]
    return sorted(chosen, key=lambda item: float(item[1].ImagePositionPatient[2]))


def _expected(series: list[tuple[Path, pydicom.Dataset]], spec: InputSpec) -> torch.Tensor:
    """(N, in_channels, S, S) by hand: HU from the modality LUT, each named window, neighbours clamped."""
    per_slice = []
    for _, ds in series:
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        per_slice.append(np.stack([np.clip((hu - (w.centre - w.width / 2)) / w.width, 0, 1) for w in spec.ct_windows()]))
    picks = [[min(max(i + o, 0), len(series) - 1) for o in range(-spec.neighbours, spec.neighbours + 1)]
             for i in range(len(series))]
    return torch.tensor(np.stack([np.concatenate([per_slice[j] for j in p]) for p in picks]), dtype=torch.float32)


def test_the_head_ct_task_declares_brain_subdural_and_bone_windows() -> None:
    spec = task_spec("ct-hemorrhage").input
    assert [w.name for w in spec.ct_windows()] == list(HEAD_CT_WINDOWS) == ["brain", "subdural", "bone"]
    assert [(w.centre, w.width) for w in spec.ct_windows()] == [(40.0, 80.0), (75.0, 215.0), (600.0, 2800.0)]
    assert spec.describe(ct=True)[0] == "this slice: brain window 40/80 HU"
    assert task_spec("cxr-abnormality").input.in_channels == spec.in_channels  # one shared encoder convention


def test_inference_applies_the_cards_declared_input(head_ct: Path, tmp_path: Path) -> None:
    """A registered model's card says 2.5D brain/subdural/bone; the worker's input is exactly that."""
    install_untrained_models(tmp_path / "models", tasks=("ct-hemorrhage",), size=SIZE)
    card = read_card(resolve(tmp_path / "models", "ct-hemorrhage"))
    spec = InputSpec.ct(SIZE, ["brain", "subdural", "bone"], neighbours=1)
    card = card.model_copy(update={"input": spec})
    series = _series(head_ct)
    selected = SelectedSeries(str(series[0][1].SeriesInstanceUID),
                              tuple(SliceInput(p, 0, ds, float(ds.ImagePositionPatient[2])) for p, ds in series), {})
    built = torch.cat(list(_batches(selected, card)))
    assert built.shape == (len(series), 9, SIZE, SIZE)
    assert torch.allclose(built, _expected(series, spec), atol=1e-4), "inference built another input than the card's"


def test_training_builds_the_same_input_as_inference(head_ct: Path, tmp_path: Path) -> None:
    task = task_spec("ct-hemorrhage")
    spec = InputSpec.ct(SIZE, ["subdural", "brain"], neighbours=2)
    items = collect_studies(head_ct, head_ct / "labels.csv", modality=task.modalities, workers=1)
    data = build_data(task, items, spec)
    series = _series(head_ct)
    first = [i for i, study in enumerate(data.study_of) if data.studies[study].study_uid == series[0][1].StudyInstanceUID]
    built = batch_inputs(data, first, spec)
    assert torch.allclose(built, _expected(series, spec), atol=1e-4), "training built another input than the card's"
    assert FinetuneConfig(input=spec).encoder_spec(task).in_channels == 10


def test_neighbours_stay_within_their_study() -> None:
    groups = [0, 0, 0, 1, 1]
    assert neighbour_picks(groups, 2, 1) == [1, 2, 2]
    assert neighbour_picks(groups, 3, 2) == [3, 3, 3, 4, 4]
    slices = torch.arange(5.0).reshape(5, 1, 1, 1)
    assert stack_neighbours(slices, 1, groups).flatten(1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 4],
                                                                       [3, 4, 4]]


def test_an_input_spec_names_its_problem() -> None:
    with pytest.raises(ValueError, match="unknown CT window 'brian'"):
        InputSpec.ct(64, ["brian"])
    with pytest.raises(ValueError, match="one window per channel"):
        InputSpec(channels=2, windows=(Window.named("brain"),))
    with pytest.raises(ValueError, match="greater than 0"):
        Window(name="odd", centre=40, width=0)
    spec = InputSpec.ct(64, ["brain", "bone"], neighbours=1)
    assert InputSpec.model_validate_json(spec.model_dump_json()) == spec
    assert spec.describe(ct=False)[0].startswith("slice -1: robust percentiles")
