"""Finetune, register, reload and evaluate each task on a small phantom set, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from models.command import evaluate as evaluate_cmd
from models.command import finetune as finetune_cmd
from models.command import models_app
from models.dataset import StudyItem, collect_studies, patient_split
from models.evaluate import evaluate, write_evaluation
from models.finetune import FinetuneConfig, build_data, finetune, initial_encoder, predict, save_model
from models.preprocess import InputSpec
from models.registry import load_model, register, resolve
from models.tasks import task_spec
from node.synth import generate
from pretrain.backbones import EncoderSpec
from pretrain.export import export_encoder
from pretrain.runtime import Runtime
from pretrain.train import train
from tests.pretrain_support import blob_shards, tiny_recipe

SLICES = {"ct-hemorrhage": "slice_labels.csv"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    generate(root, studies=10, kinds="cxr,ct-head,mr-brain", seed=0, ct_slices=8, mr_slices=8,
             ct_size=128, mr_size=128, cxr_size=128)
    return root


def _items(phantoms: Path, task: str) -> list[StudyItem]:
    spec = task_spec(task)
    slice_labels = phantoms / SLICES[task] if task in SLICES else None
    return collect_studies(phantoms, phantoms / "labels.csv", modality=spec.modalities, slice_labels=slice_labels,
                           workers=1)


@pytest.mark.parametrize("task,regime,head_stride", [
    ("cxr-abnormality", "supervised", 32), ("ct-hemorrhage", "hybrid", 8), ("mr-metastasis", "supervised", 32),
])
def test_task_finetunes_registers_reloads_and_evaluates(phantoms: Path, tmp_path: Path, task: str, regime: str,
                                                        head_stride: int) -> None:
    spec = task_spec(task)
    splits = patient_split(_items(phantoms, task), seed=0)
    inputs = InputSpec(size=64)
    config = FinetuneConfig(input=inputs, steps=6, batch_size=4, eval_every=3, regime=regime,  # type: ignore[arg-type]
                            head_stride=head_stride)  # type: ignore[arg-type]
    val = build_data(spec, splits["val"], inputs)
    result = finetune(spec, build_data(spec, splits["train"], inputs), val, config)
    assert result.steps_run == 6 and [step for step, _ in result.curve] == [3, 6]
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))

    card = save_model(tmp_path / "out", spec, result, config, name=task, version="1", training={"regime": regime},
                      encoder_source={"init": "scratch"})
    assert [o.name for o in card.outputs] == spec.outputs
    assert all(o.concept == f.concept for o, f in zip(card.outputs, spec.findings, strict=True))
    assert card.outputs == result.outputs
    # 2 validation studies: no finding has the cases for a threshold, so none is called.
    assert all(o.threshold is None and not o.assessed for o in card.outputs if spec.kind != "segmentation")
    assert card.device_uid.startswith("2.25.")
    saved = yaml.safe_load((tmp_path / "out" / "card.yaml").read_text())
    assert saved["outputs"][0]["concept"]["scheme"] in ("SCT", "99PACSNODE")
    assert saved["outputs"][0]["threshold"] == result.outputs[0].threshold
    assert saved["format"] == "pacsnode-model/2" and isinstance(saved["deployable"], bool) and saved["deployability"]

    folder = register(tmp_path / "registry", tmp_path / "out")
    network, loaded = load_model(resolve(tmp_path / "registry", f"{task}@1"))
    device = torch.device("cpu")
    assert torch.equal(predict(result.network, val, inputs, device), predict(network, val, inputs, device))
    assert loaded.device_uid == card.device_uid and folder.name == "1"
    assert loaded.head_stride == (4 if spec.kind == "segmentation" else head_stride)

    metrics, plots = evaluate(network, loaded, splits["test"], robustness=True)
    assert set(metrics["robustness"]) == {"rotation_deg", "scale", "intensity_scale", "gamma"}
    written = write_evaluation(tmp_path / "eval", metrics, plots)
    assert json.loads(written["json"].read_text())["model"] == f"{task}@1"
    assert written["robustness"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if spec.kind == "segmentation":
        assert 0 <= metrics["dice"] <= 1 and "lesion_sensitivity" in metrics
    else:
        assert written["roc"].is_file() and metrics["findings"]


def test_retraining_gets_a_new_device_uid_and_version(phantoms: Path, tmp_path: Path) -> None:
    spec = task_spec("cxr-abnormality")
    splits = patient_split(_items(phantoms, "cxr-abnormality"), seed=0)
    config = FinetuneConfig(input=InputSpec(size=32), steps=2, batch_size=2, eval_every=2)
    train_data = build_data(spec, splits["train"], InputSpec(size=32))
    val = build_data(spec, splits["val"], InputSpec(size=32))
    uids = set()
    for version in ("1", "2"):
        result = finetune(spec, train_data, val, config)
        card = save_model(tmp_path / version, spec, result, config, name="cxr-abnormality", version=version,
                          training={}, encoder_source={})
        register(tmp_path / "registry", tmp_path / version)
        uids.add(card.device_uid)
    assert len(uids) == 2
    assert resolve(tmp_path / "registry", "cxr-abnormality").name == "2"
    with pytest.raises(FileExistsError):
        register(tmp_path / "registry", tmp_path / "1")
    with pytest.raises(LookupError, match="no version '7'"):
        resolve(tmp_path / "registry", "cxr-abnormality@7")


def test_pretrained_encoder_with_another_input_spec_is_refused(tmp_path: Path) -> None:
    cpu = Runtime(device=torch.device("cpu"), rank=0, world=1, local_rank=0)
    from pretrain.config import PretrainConfig

    train(blob_shards(tmp_path / "shards", images=16), PretrainConfig.model_validate(tiny_recipe(run={"max_steps": 1})),
          tmp_path / "run", cpu, progress=False)
    export_encoder(tmp_path / "run", tmp_path / "encoder")
    cxr = task_spec("cxr-abnormality")
    one_channel = InputSpec(size=64)
    encoder, source = initial_encoder(str(tmp_path / "encoder"), FinetuneConfig(input=one_channel), cxr)
    assert encoder.spec == EncoderSpec(arch="resnet18", in_channels=1) and source["steps"] == 1
    with pytest.raises(ValueError, match="resnet18 with 1 input channel"):
        initial_encoder(str(tmp_path / "encoder"), FinetuneConfig(arch="resnet50", input=one_channel), cxr)


def test_an_encoder_pretrained_on_other_ct_windows_is_refused(tmp_path: Path) -> None:
    """Three channels both, but soft-tissue/lung/bone is not the brain/subdural/bone head CT reads."""
    cpu = Runtime(device=torch.device("cpu"), rank=0, world=1, local_rank=0)
    from pretrain.config import PretrainConfig

    recipe = tiny_recipe(run={"max_steps": 1}, model={"encoder": {"in_channels": 3}},
                         augment={"ct_windows": [[40, 400], [-600, 1500], [600, 2800]]})
    train(blob_shards(tmp_path / "shards", images=16), PretrainConfig.model_validate(recipe), tmp_path / "run", cpu,
          progress=False)
    export_encoder(tmp_path / "run", tmp_path / "encoder")
    head_ct = task_spec("ct-hemorrhage")
    with pytest.raises(ValueError, match="pretrained with CT channels"):
        initial_encoder(str(tmp_path / "encoder"), FinetuneConfig(), head_ct)
    cxr = task_spec("cxr-abnormality")  # radiographs replicate over the channels: any windows fit
    encoder, _ = initial_encoder(str(tmp_path / "encoder"), FinetuneConfig(), cxr)
    assert encoder.spec.in_channels == 3


def test_cli_finetune_models_and_evaluate(phantoms: Path, tmp_path: Path) -> None:
    from typer import Typer

    app = Typer()
    app.command("finetune")(finetune_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.add_typer(models_app, name="models")
    runner = CliRunner(env={"COLUMNS": "240"})  # the rich table wraps UIDs in a narrow terminal
    registry = str(tmp_path / "registry")
    done = runner.invoke(app, ["finetune", "--task", "cxr-abnormality", "--data", str(phantoms), "--labels",
                               str(phantoms / "labels.csv"), "--steps", "4", "--size", "32", "--models-dir", registry,
                               "--out", str(tmp_path / "model"), "--min-cases-for-threshold", "2",
                               "--finding-auc-gate", "0.8", "--dice-gate", "0.6"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "registered cxr-abnormality@1" in done.output  # registered even where not deployable
    recipe = yaml.safe_load((tmp_path / "model" / "card.yaml").read_text())["training"]["config"]
    assert (recipe["min_cases_for_threshold"], recipe["finding_auc_gate"], recipe["dice_gate"]) == (2, 0.8, 0.6)
    assert sorted(p.name for p in (tmp_path / "registry" / "cxr-abnormality" / "1").iterdir()) == [
        "card.yaml", "model.safetensors"]
    listed = runner.invoke(app, ["models", "list", "--models-dir", registry])
    assert "cxr-abnormality" in listed.output and "deployable" in listed.output
    shown = runner.invoke(app, ["models", "show", "cxr-abnormality@1", "--models-dir", registry])
    assert "device_uid: 2.25." in shown.output and "287272002" in shown.output
    evaluated = runner.invoke(app, ["evaluate", "--model", "cxr-abnormality", "--data", str(phantoms), "--labels",
                                    str(phantoms / "labels.csv"), "--out", str(tmp_path / "eval"),
                                    "--no-robustness", "--models-dir", registry], catch_exceptions=False)
    assert evaluated.exit_code == 0, evaluated.output
    assert (tmp_path / "eval" / "report.md").is_file()

    bad = tmp_path / "bad.csv"
    bad.write_text("study_uid,any\n1.2.3.999,1\n")
    refused = runner.invoke(app, ["finetune", "--task", "cxr-abnormality", "--data", str(phantoms), "--labels",
                                  str(bad), "--models-dir", registry])
    assert refused.exit_code == 2 and "1.2.3.999" in refused.output
    missing = runner.invoke(app, ["models", "show", "nothing", "--models-dir", registry])
    assert missing.exit_code == 2 and "no model 'nothing'" in missing.output
