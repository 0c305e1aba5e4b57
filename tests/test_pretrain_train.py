"""SwAV training on CPU: the loss falls, a resumed run continues exactly, torchrun with two gloo ranks."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import PretrainConfig, load_config
from pretrain.export import export_encoder, load_encoder
from pretrain.runtime import Runtime
from pretrain.train import train
from tests.pretrain_support import blob_shards, tiny_recipe, write_recipe

CPU = Runtime(device=torch.device("cpu"), rank=0, world=1, local_rank=0)


def recipe(**overrides: object) -> PretrainConfig:
    return PretrainConfig.model_validate(tiny_recipe(**overrides))


def test_resumed_run_gives_the_same_next_losses(tmp_path: Path) -> None:
    shards = blob_shards(tmp_path / "shards")
    # two loader workers, a queue from epoch 0, the prototypes frozen across the stop, LARS:
    # every piece of state that a resume must restore is in play
    config = recipe(run={"loader_workers": 2, "max_steps": 9}, optim={"name": "lars", "lr": 0.5},
                    swav={"queue_length": 16, "queue_start_epoch": 0, "freeze_prototypes_steps": 4})
    straight = train(shards, config, tmp_path / "straight", CPU, progress=False)
    assert straight.steps == 9

    first = train(shards, config.model_copy(update={"run": config.run.model_copy(update={"max_steps": 3})}),
                  tmp_path / "resumed", CPU, progress=False)
    assert first.steps == 3
    rest = train(shards, config, tmp_path / "resumed", CPU, progress=False)
    assert rest.steps == 9 and len(rest.losses) == 6
    torch.testing.assert_close(torch.tensor(first.losses + rest.losses), torch.tensor(straight.losses),
                               rtol=1e-5, atol=1e-6)
    # the log continues rather than restarting
    rows = list(csv.DictReader((tmp_path / "resumed" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 10))


def test_resume_refuses_another_model_recipe(tmp_path: Path) -> None:
    shards = blob_shards(tmp_path / "shards", images=16)
    train(shards, recipe(run={"max_steps": 1}), tmp_path / "run", CPU, progress=False)
    with pytest.raises(ValueError, match="model"):
        train(shards, recipe(model={"prototypes": 30}), tmp_path / "run", CPU, progress=False)


def test_exported_encoder_refuses_tampering_and_other_specs(tmp_path: Path) -> None:
    shards = blob_shards(tmp_path / "shards", images=16)
    train(shards, recipe(run={"max_steps": 1}), tmp_path / "run", CPU, progress=False)
    export_encoder(tmp_path / "run", tmp_path / "encoder")
    spec = load_config(None, {"model": {"encoder": {"arch": "resnet18", "in_channels": 3}}}).model.encoder
    with pytest.raises(ValueError, match="3"):
        load_encoder(tmp_path / "encoder", expect=spec)
    weights = tmp_path / "encoder" / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="SHA-256"):
        load_encoder(tmp_path / "encoder")


def test_two_process_torchrun_on_cpu(tmp_path: Path) -> None:
    shards = blob_shards(tmp_path / "shards")
    config_file = write_recipe(tmp_path / "recipe.yaml", run={"max_steps": 4, "log_every": 2})
    torchrun = Path(sys.executable).with_name("torchrun")
    (tmp_path / "pretrain" / "train").mkdir(parents=True)  # an ML engineer's folder: it must not shadow ours
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python",
         str(Path(sys.executable).with_name("pacsnode")), "pretrain", "train",
         "--shards", str(shards), "--config", str(config_file), "--out", str(tmp_path / "run")],
        check=False, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 4 step(s)" in proc.stdout
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["world"] == 2 and state["global_batch"] == 16 and state["step"] == 4
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]
