"""The paper's experiment harness (models.experiment) at tiny sizes: order, resumability, report, patients.

One tiny run (three tasks, all arms, one seed, a few training steps, SwAV for a few steps) is made
per module through the CLI and then resumed through the function; the numbers mean nothing, the
checks are about what the harness guarantees: the difficulty is frozen before anything pretrained
exists, finished work is never redone, the archive shares no patient with the labelled data, and
the report carries every task and every claim whatever the outcome.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from scipy.stats import t as student_t
from typer.testing import CliRunner

from models.experiment import (
    ARMS,
    PAPER_CLAIMS,
    SIZES,
    ExperimentSettings,
    arm_name,
    choose_candidate,
    expected_arms,
    run_paper_experiment,
    search_stops,
)
from models.experiment_command import app
from models.experiment_report import seeds_needed, steps_to_target, summarise, tally, write_experiment_report
from models.metrics import mean_ci, roc_auc
from node.synth import generate

# The tiny run trains ~20 small models end to end (about a minute on 2 idle cores, minutes on a busy
# machine), so the tests that use it are outside the default suite (`pytest -m slow ...`); the pure
# checks below them (calibration rule, convergence, report wording, synth's patient prefix) are not.
TASKS = ("cxr-abnormality", "ct-hemorrhage", "mr-metastasis")
# The module fixture's tiny run takes 1-2 min idle and 5 on a loaded machine: past the suite's 300 s.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny experiment run by the CLI, then the same folder run again by the function."""
    out = tmp_path_factory.mktemp("experiment") / "run"
    runner = CliRunner()
    started = time.perf_counter()
    first = runner.invoke(app, ["paper", "--tiny", "--quiet", "--out", str(out)], catch_exceptions=False)
    first_s = time.perf_counter() - started
    assert first.exit_code == 0, first.output
    arm_times = {p.name: p.stat().st_mtime_ns for p in (out / "arms").glob("*.json")}
    started = time.perf_counter()
    again = run_paper_experiment(out, progress=False, settings=ExperimentSettings.preset("tiny"),
                                 report_dir=out / "report")
    return {"out": out, "first_output": first.output, "first_s": first_s, "again": again,
            "again_s": time.perf_counter() - started, "arm_times": arm_times}


@pytest.mark.slow
def test_frozen_before_archive_pretraining_and_any_pretrained_arm(tiny_run: dict[str, Any]) -> None:
    out: Path = tiny_run["out"]
    frozen_path = out / "frozen.json"
    frozen = json.loads(frozen_path.read_text())
    assert set(frozen["tasks"]) == set(TASKS)
    frozen_at = frozen_path.stat().st_mtime_ns
    pretrained = [p for p in (out / "arms").glob("*.json") if "-pretrained-" in p.name or "-hybrid-" in p.name]
    assert len(pretrained) == 2 * sum(len(ExperimentSettings.preset("tiny").sizes(task)) for task in TASKS)
    assert all(p.stat().st_mtime_ns > frozen_at for p in pretrained)
    # The archive the encoder learns from, and the encoder itself, come after the freeze too.
    assert all(p.stat().st_mtime_ns > frozen_at for p in (out / "data" / "archive").glob("*/complete.json"))
    assert (out / "pretrain" / "encoder" / "encoder.yaml").stat().st_mtime_ns > frozen_at
    for task, chosen in frozen["tasks"].items():
        assert chosen["candidate"] in ExperimentSettings.preset("tiny").candidates
        ladder = list(ExperimentSettings.preset("tiny").candidates)
        assert [e["candidate"] for e in chosen["evaluated"]] == ladder[:len(chosen["evaluated"])]
        record = json.loads((out / "arms" / f"{arm_name(task, 'pretrained', 'full', 0)}.json").read_text())
        assert record["difficulty"] == chosen["candidate"] and record["init"] == "pretrained"


@pytest.mark.slow
def test_second_run_retrains_nothing(tiny_run: dict[str, Any]) -> None:
    out: Path = tiny_run["out"]
    counters = tiny_run["again"]["counters"]
    assert counters["arms_trained"] == 0 and counters["calibration_runs"] == 0
    assert counters["synth_sets"] == 0 and counters["pretrain_steps"] == 0
    assert counters["arms_skipped"] == len(expected_arms(ExperimentSettings.preset("tiny"))) == 21
    assert {p.name: p.stat().st_mtime_ns for p in (out / "arms").glob("*.json")} == tiny_run["arm_times"]
    assert tiny_run["again_s"] < tiny_run["first_s"]
    sessions = json.loads((out / "timings.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[0]["counters"]["arms_trained"] > 0
    # The scratch arm with all labels at seed 0 is the calibration run of the frozen difficulty.
    assert sessions[0]["counters"]["arms_reused_from_calibration"] == len(TASKS)
    assert tiny_run["again"]["complete"]


@pytest.mark.slow
def test_report_has_every_task_and_claim(tiny_run: dict[str, Any]) -> None:
    report = tiny_run["again"]["report"]
    text = Path(report["markdown"]).read_text()
    probe = json.loads((tiny_run["out"] / "probe.json").read_text())
    assert set(probe["tasks"]) == set(TASKS)
    assert "what the frozen encoder knows" in text
    for task in TASKS:
        assert f"### {task}" in text
    for claim in PAPER_CLAIMS.values():
        assert claim in text
    assert "+3-7% AUC" in text and "85% faster" in text and "83%" in text and "more robust" in text
    assert "proves nothing" in text and "pacsnode experiment paper" in text
    for plot in report["plots"].values():
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(Path(report["json"]).read_text())
    assert set(results["summary"]) == set(TASKS)
    for task in TASKS:
        sizes = ExperimentSettings.preset("tiny").sizes(task)
        assert set(results["summary"][task]["rows"]) == {f"{a}/{s}" for a in ARMS for s in sizes}
    assert results["missing_arms"] == []


@pytest.mark.slow
def test_archive_shares_no_patient_with_labelled_splits(tiny_run: dict[str, Any]) -> None:
    out: Path = tiny_run["out"]
    check = json.loads((out / "disjointness.json").read_text())
    assert check["disjoint"] and check["shared_patients"] == 0 and check["archive_studies"] > 0
    assert set(check["labelled"]) == set(TASKS)
    # Independently of the harness: the raw IDs in the DICOM headers of both sides.
    archive_ids = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID)
                   for p in (out / "data" / "archive").rglob("*.dcm")}
    labelled_ids = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID)
                    for p in (out / "data" / "labelled").rglob("dicom/**/*.dcm")}
    assert archive_ids and labelled_ids and not archive_ids & labelled_ids
    # The archive is unlabelled: no label tables, SEGs or manifest left beside its images.
    for kind in (out / "data" / "archive").iterdir():
        assert not (kind / "labels.csv").exists() and not (kind / "seg").exists()
        assert not (kind / "manifest.json").exists()


@pytest.mark.slow
def test_other_settings_in_the_same_folder_are_refused(tiny_run: dict[str, Any]) -> None:
    other = ExperimentSettings.preset("tiny").model_copy(update={"seeds": (0, 1)})
    with pytest.raises(ValueError, match="other settings"):
        run_paper_experiment(tiny_run["out"], progress=False, settings=other)


# --- pure parts: no training -------------------------------------------------------------------


def test_calibration_rule() -> None:
    band = (0.75, 0.90)
    assert search_stops(0.8, band) and search_stops(0.6, band) and not search_stops(0.95, band)
    assert not search_stops(math.nan, band)
    assert choose_candidate([("easy", 0.97), ("mid", 0.85)], band) == ("mid", True, "first candidate in the band")
    name, in_band, note = choose_candidate([("easy", 0.93), ("mid", 0.60)], band)
    assert (name, in_band) == ("easy", False) and "closest" in note
    assert choose_candidate([("easy", math.nan), ("mid", 0.5)], band)[0] == "mid"


def test_steps_to_target() -> None:
    curve = [[10, 0.5], [20, 0.7], [30, 0.9]]
    assert steps_to_target(curve, 0.7) == 20
    assert steps_to_target(curve, 0.95) is None and steps_to_target(curve, None) is None


def _fake_arm(task: str, arm: str, size: str, seed: int, test: float, curve: list[list[float]],
              drop: float) -> dict[str, Any]:
    return {"task": task, "arm": arm, "size": size, "seed": seed, "regime": "hybrid" if arm == "hybrid" else "supervised",
            "studies": {"train": 10 if size == "full" else 3, "val": 4, "test": 4},
            "samples": {"train": 10 if size == "full" else 3, "val": 4, "test": 4},
            "validation": {"best_metric": max(v for _, v in curve), "curve": curve, "steps_run": int(curve[-1][0])},
            "test": {"metric": "auc", "headline": test, "findings": {"any": test}},
            "robustness_drop": {"rotation_deg": drop}, "robustness_drop_mean": drop,
            "seconds": {"train": 1.0, "evaluate": 1.0}}


def test_report_says_plainly_when_pretraining_does_not_help(tmp_path: Path) -> None:
    """Pretrained arms worse on every measure over three seeds: the report must not read as a win."""
    settings = ExperimentSettings.preset("tiny").model_copy(update={"tasks": ("cxr-abnormality",), "seeds": (0, 1, 2)})
    arms = []
    for seed in settings.seeds:
        for size in settings.sizes("cxr-abnormality"):
            arms.append(_fake_arm("cxr-abnormality", "scratch", size, seed, 0.85 + 0.01 * seed,
                                  [[10, 0.7], [20, 0.8 + 0.01 * seed]], 0.05))
            for arm in ("pretrained", "hybrid"):
                arms.append(_fake_arm("cxr-abnormality", arm, size, seed, 0.78 + 0.005 * seed,
                                      [[10, 0.6], [20, 0.7], [30, 0.8 + 0.01 * seed]], 0.10 + 0.01 * seed))
    (tmp_path / "arms").mkdir()
    for record in arms:
        name = arm_name(record["task"], record["arm"], record["size"], record["seed"])
        (tmp_path / "arms" / f"{name}.json").write_text(json.dumps(record))
    summary = summarise(arms, settings)
    counts = tally(summary)
    comparisons = 2 * len(settings.sizes("cxr-abnormality"))  # pretrained and hybrid at each label size
    assert counts["metric"]["better"] == 0 and counts["metric"]["worse_ci"] == comparisons
    assert counts["robustness"]["worse"] == comparisons and counts["convergence"]["better"] == 0
    frozen = {"written": "then", "rule": "r", "tasks": {"cxr-abnormality": {
        "candidate": "easy", "value": 0.8, "metric": "auc", "band": [0.75, 0.9], "in_band": True, "note": "n",
        "difficulty": {}, "evaluated": [{"candidate": "easy", "value": 0.8}]}}}
    disjoint = {"archive_studies": 1, "archive_patients": 1, "shared_patients": 0, "method": "m"}
    probe = {"method": "m", "tasks": {"cxr-abnormality": {"random init": {"auc": 0.80}, "pretrained": {"auc": 0.81}}}}
    (tmp_path / "report" / "arms").mkdir(parents=True)
    (tmp_path / "report" / "arms" / "cxr-abnormality-scratch-full-s9.json").write_text("{}")  # an earlier run's
    report = write_experiment_report(tmp_path, tmp_path / "report", settings=settings, frozen=frozen,
                                     disjoint=disjoint, pretrain={"images": 10, "steps": 2, "global_batch": 4},
                                     timings={"sessions": []}, command="cmd", device="cpu", probe=probe)
    text = Path(report["markdown"]).read_text()
    assert report["helped"] == {"metric": False, "convergence": False, "robustness": False}
    assert text.count("did **not** measurably help") == 3
    assert "no gain" in text and "less robust" in text and "slower than scratch" in text
    assert "Archive size" in text and "Recipe" in text and "Augmentations" in text
    # The measured reasons: the encoder's probe gain is below the bar, and the gain itself is negative.
    assert "which lever fell short" in text and "the pretrained encoder fell short" in text
    assert "+0.010 AUC" in text and "the gain itself is short of +3 points" in text
    # The report folder holds this run's records, and only them: it survives a new checkout.
    kept = sorted(p.name for p in (tmp_path / "report" / "arms").glob("*.json"))
    assert kept == sorted(f"{arm_name(a['task'], a['arm'], a['size'], a['seed'])}.json" for a in arms)
    for name in ("frozen", "disjointness", "settings", "probe"):
        assert json.loads((tmp_path / "report" / f"{name}.json").read_text())
    assert json.loads(Path(report["json"]).read_text())["probe"] == probe


def test_seeds_needed_follows_the_t_interval() -> None:
    # Five seeds with mean 2 and SD 1: the t interval (2 +- 2.776 / sqrt 5) already excludes 0.
    values = [1.0, 2.0, 3.0, 1.5, 2.5]
    mean, low, high = mean_ci(values)
    stat = {"mean": mean, "low": low, "high": high, "n": 5}
    assert seeds_needed(stat) == next(k for k in range(2, 100)
                                      if student_t.ppf(0.975, k - 1) * np.std(values, ddof=1) / np.sqrt(k) < mean)
    wide = {"mean": 4.0, "low": -6.0, "high": 14.0, "n": 3}  # SD 4.0: seven seeds
    assert seeds_needed(wide) == 7 and seeds_needed({**wide, "mean": 0.1}) is None  # over 100 seeds
    assert seeds_needed({"mean": -1.0, "low": -3.0, "high": 1.0, "n": 3}) is None
    assert seeds_needed({"mean": 1.0, "low": None, "high": None, "n": 1}) is None


# --- node.synth's patient prefix (the option the experiment needs) -----------------------------


def test_synth_patient_prefix_keeps_sets_apart(tmp_path: Path) -> None:
    small = {"ct_slices": 1, "mr_slices": 1, "ct_size": 32, "mr_size": 32, "cxr_size": 32}
    default = generate(tmp_path / "a", 2, "cxr", 5, **small)  # type: ignore[arg-type]
    other = generate(tmp_path / "b", 2, "cxr", 5, patient_prefix="UX", **small)  # type: ignore[arg-type]
    assert all(s.patient_id.startswith("PH") for s in default.studies)
    assert all(s.patient_id.startswith("UX") for s in other.studies)
    assert {s.patient_id[2:] for s in default.studies} == {s.patient_id[2:] for s in other.studies}
    # Only identity changes: the pixels are those of the default run.
    a = pydicom.dcmread(default.out_dir / default.studies[0].instances[0])
    b = pydicom.dcmread(other.out_dir / other.studies[0].instances[0])
    assert a.PixelData == b.PixelData and str(a.PatientName) == "PHANTOM^0001" != str(b.PatientName)
    with pytest.raises(ValueError, match="patient prefix"):
        generate(tmp_path / "c", 1, "cxr", 5, patient_prefix="P H", **small)  # type: ignore[arg-type]


def test_linear_probe_has_a_per_sample_penalty_and_separates_what_is_separable() -> None:
    from sklearn.linear_model import LogisticRegression

    from models.experiment_probe import L2, fit_probe

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=generator).numpy()
    y = (x[:, 0] + 0.5 * x[:, 3] + 0.3 * torch.randn(300, generator=generator).numpy() > 0).astype(float)
    probe = fit_probe(x[:200], y[:200])
    scaler, logistic = probe[0], probe[-1]
    z = scaler.transform(x[:200])
    # The probe minimises the mean log-loss + L2 |w|^2: scikit-learn's C = 1 / (2 L2 n).
    reference = LogisticRegression(C=1 / (2 * L2 * 200), tol=1e-8, max_iter=1000).fit(z, y[:200])
    assert np.allclose(logistic.coef_[0], reference.coef_[0], atol=2e-3)
    assert float(np.abs(z.mean(0)).max()) < 1e-6  # standardised on the training samples (float32)
    assert roc_auc(y[200:], probe.decision_function(x[200:])) > 0.9

def test_full_preset_has_a_large_cxr_label_set_and_nested_subsets() -> None:
    """The paper's gains come from realistic label counts: the full run finetunes CXR on >= 1,000
    training studies (60% of the labelled set) beside smaller, nested subsets."""
    settings = ExperimentSettings.preset("full")
    assert settings.sizes("cxr-abnormality") == SIZES
    assert 0.6 * settings.labelled_studies["cxr-abnormality"] >= 1000
    for task in TASKS:
        counts = [settings.subset_studies[task][size] for size in settings.sizes(task)[:-1]]
        assert counts == sorted(counts) and counts[-1] < 0.6 * settings.labelled_studies[task]
        spec = settings.input_spec(task)
        assert spec.size == settings.input_size and spec.in_channels == 3
    assert [w.name for w in settings.input_spec("ct-hemorrhage").ct_windows()] == ["brain", "subdural", "bone"]
    config = settings.pretrain_config(images=1000, device="cpu")
    assert config.model.encoder.in_channels == 3
    assert config.augment.ct_windows[:3] == settings.input_spec("ct-hemorrhage").window_pairs()
