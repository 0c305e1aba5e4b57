"""The pretraining lever study: its bootstrap, its caching and its report (models.experiment_levers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.experiment import PretrainRecipe
from models.experiment_levers import Lever, LeverStudy, run_levers
from models.experiment_probe import paired_difference


def test_paired_difference_is_the_auc_difference_with_a_study_level_interval() -> None:
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 40)
    noisy = rng.normal(size=80) + 0.3 * y
    sharp = rng.normal(size=80) + 3.0 * y
    groups = [i // 4 for i in range(80)]  # four samples per study
    diff, low, high = paired_difference(y, noisy, sharp, groups, resamples=300)
    assert diff == pytest.approx(roc_auc_score(y, sharp) - roc_auc_score(y, noisy))
    assert 0 < low <= diff <= high
    same, low, high = paired_difference(y, noisy, noisy, groups, resamples=50)
    assert same == low == high == 0.0


def _tiny(levers: tuple[Lever, ...]) -> LeverStudy:
    return LeverStudy(slices=3, synth_size=48, shard_size=48, workers=1, resamples=50, levers=levers,
                      labelled_studies={"cxr-abnormality": 12, "ct-hemorrhage": 12, "mr-metastasis": 12},
                      archives={"2k": {"cxr": 4, "ct-head": 2, "mr-brain": 2}})


@pytest.mark.slow
def test_levers_are_cached_and_a_changed_lever_is_trained_again(tmp_path: Path) -> None:
    recipe = PretrainRecipe(steps=2, batch_size=4, local_crops=2, prototypes=8, hidden_dim=32, out_dim=16,
                            warmup_steps=1, freeze_prototypes_steps=1)
    base = Lever(name="base", change="base", size=32, recipe=recipe)
    # A tuple inside the free-form augment overrides comes back from JSON as a list: still the same lever.
    other = Lever(name="protos", change="4 prototypes", size=32,
                  recipe=recipe.model_copy(update={"prototypes": 4, "augment": {"gamma": (0.9, 1.1)}}))
    report = tmp_path / "report"
    first = run_levers(tmp_path / "work", report, settings=_tiny((base, other)))
    assert first["measured"] == ["base", "protos"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / "pretrain").rglob("summary.json")}
    run_levers(tmp_path / "work", report, settings=_tiny((base, other)))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / "pretrain").rglob("summary.json")} == stamps
    changed = other.model_copy(update={"recipe": recipe.model_copy(update={"prototypes": 6})})
    run_levers(tmp_path / "work", report, settings=_tiny((base, changed)), only=["protos"])
    summary = json.loads((tmp_path / "work" / "pretrain" / "protos" / "summary.json").read_text())
    assert summary["lever"]["recipe"]["prototypes"] == 6
    table = (report / "levers.md").read_text()
    assert "| base |" in table and "| protos |" in table and '"prototypes": 6' in table
    results = json.loads((report / "levers.json").read_text())["levers"]
    for result in results:
        assert set(result["tasks"]) == {"cxr-abnormality", "ct-hemorrhage", "mr-metastasis"}
    with pytest.raises(ValueError, match="unknown lever"):
        run_levers(tmp_path / "work", report, settings=_tiny((base,)), only=["nope"])
