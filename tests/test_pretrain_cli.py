"""``pacsnode pretrain``: index -> prepare -> train -> export on a phantom archive, on CPU."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from typer.testing import CliRunner

from node.synth import generate
from pretrain.command import app
from pretrain.export import load_encoder
from pretrain.shards import ShardSet
from tests.pretrain_support import write_recipe


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_phantom_archive_to_exported_encoder(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    generate(archive, studies=4, kinds="cxr,ct-head,mr-brain", seed=3, ct_slices=8, mr_slices=8,
             ct_size=128, mr_size=128, cxr_size=256)
    index = tmp_path / "index.sqlite"
    out = invoke("index", "--archive", str(archive / "dicom"), "--archive", str(archive / "seg"),
                 "--out", str(index), "--workers", "1")
    assert "68 image frame(s)" in out  # 4 CXR + 4 x 8 CT + 4 x 8 MR
    assert "non-image:SEG" in out

    shards = tmp_path / "shards"
    invoke("prepare", "--index", str(index), "--out", str(shards), "--size", "64", "--slice-stride", "2",
           "--shard-size", "16", "--labels", str(archive / "labels.csv"), "--workers", "1")
    prepared = ShardSet(shards)
    assert len(prepared) == 36 and prepared.manifest.modalities == {"DX": 4, "CT": 16, "MR": 16}
    assert {r.encoding for r in prepared.records(0)} <= {"hu", "unit"}

    recipe = write_recipe(tmp_path / "recipe.yaml", run={"epochs": 6, "batch_size": 8},
                          supervised={"labels": ["any"], "weight": 0.5})
    run = tmp_path / "run"
    assert "trained 24 step(s)" in invoke("train", "--shards", str(shards), "--config", str(recipe),
                                          "--out", str(run), "--device", "cpu")
    losses = [float(row["loss"]) for row in csv.DictReader((run / "log.csv").open())]
    assert len(losses) == 24
    early, late = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert late < 0.9 * early, (early, late)

    encoder_dir = tmp_path / "encoder"
    invoke("export", "--checkpoint", str(run), "--out", str(encoder_dir))
    encoder, card = load_encoder(encoder_dir)
    assert card.steps == 24 and card.training_data["images"] == 36 and card.normalisation.size == 64
    assert card.training_data["modalities"] == {"DX": 4, "CT": 16, "MR": 16}
    features = encoder.eval()(torch.zeros(2, 1, 48, 48))
    assert features.shape == (2, card.feature_dim)


def test_cli_errors_are_one_line_messages(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["index", "--archive", str(tmp_path / "nowhere"), "--out", str(tmp_path / "i")])
    assert missing.exit_code == 2 and "not a folder" in missing.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {batch_size: 1}\n")
    result = runner.invoke(app, ["train", "--shards", str(tmp_path), "--config", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "batch_size" in result.output
    no_shards = runner.invoke(app, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "r"),
                                    "--device", "cpu"])
    assert no_shards.exit_code == 2 and "shards.json" in no_shards.output
