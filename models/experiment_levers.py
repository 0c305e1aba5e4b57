"""Which pretraining lever makes SwAV learn what the tasks need, measured by the linear probe.

``pacsnode experiment levers`` pretrains one ResNet-18 per lever and gauges each the way the paper
experiment does: a logistic regression on frozen, pooled features, fitted on labelled phantoms and
scored on held-out ones, against the same network at its random initialisation (where a scratch arm
starts). The difference, with a 95% cluster-bootstrap interval over test studies, says how much the
archive taught the encoder about the findings.

Each lever changes one thing against ``base`` (the committed report's recipe on the shared
3-channel input), so its effect is its own; the last ones combine those that helped. The study uses
its own phantom seeds (labelled and archive), distinct from the paper experiment's, so that picking
a recipe here never looks at that experiment's validation or test data.

Everything is cached in the working folder (phantoms, shards, pretraining runs, probe features): a
second run retrains nothing, a new lever trains only itself, and a lever whose definition changed is
trained again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from models.dataset import collect_studies, patient_split
from models.experiment import (
    ENCODER,
    FAMILIES,
    PretrainRecipe,
    TaskFamily,
    difficulty_ladder,
    random_init_encoder,
    strip_labels,
    utc_now,
    write_json_atomic,
)
from models.experiment_probe import paired_difference, probe_scores
from models.finetune import TaskData, build_data
from models.metrics import roc_auc
from models.preprocess import InputSpec
from models.tasks import task_spec
from node.synth import generate
from pretrain.export import load_encoder

DONE = "complete.json"

# Phantom findings are intensity changes (a nodule, an effusion, a bleed is brighter or darker than
# what surrounds it); SwAV makes features invariant to whatever the augmentations vary, so strong
# contrast, gamma and blur jitter teach the encoder to ignore exactly those cues.
MILD_INTENSITY: dict[str, Any] = {"contrast": 0.05, "brightness": 0.02, "gamma": (0.9, 1.1), "gamma_p": 0.2,
                                  "blur_p": 0.0, "noise_p": 0.2, "noise_std": (0.0, 0.02), "window_jitter": 0.03}
_BASE = PretrainRecipe(steps=350, batch_size=32, local_crops=4, prototypes=100, queue_length=512)


class Lever(BaseModel):
    """One pretraining run: which archive, at which size, with which SwAV recipe, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    change: str = Field(description="What it changes against base, in words")
    archive: str = "2k"
    size: int = Field(64, ge=16)
    recipe: PretrainRecipe = _BASE
    seed: int = Field(0, description="Of the pretraining run: a lever rerun at another seed shows its noise")


def default_levers() -> tuple[Lever, ...]:
    """``base`` and one change each: archive size, length, lesion-scale local crops, prototypes, size."""
    return (
        Lever(name="base", change="the committed report's recipe, 3 channels"),
        Lever(name="archive-20k", change="10x the unlabelled archive (one epoch)", archive="20k"),
        Lever(name="longer", change="4x the steps on the 2k archive",
              recipe=_BASE.model_copy(update={"steps": 1400})),
        Lever(name="lesion-crops", change="local crops at lesion scale (2-8% of the image)",
              recipe=_BASE.model_copy(update={"local_scale": (0.02, 0.08)})),
        Lever(name="prototypes-30", change="30 prototypes", recipe=_BASE.model_copy(update={"prototypes": 30})),
        Lever(name="prototypes-300", change="300 prototypes", recipe=_BASE.model_copy(update={"prototypes": 300})),
        Lever(name="size-96", change="96 px global, 48 px local crops", size=96),
        Lever(name="mild-intensity", change="intensity jitter that keeps lesion contrast (no blur, little gamma, "
              "contrast and noise)", recipe=_BASE.model_copy(update={"augment": MILD_INTENSITY})),
        Lever(name="whole-globals", change="global crops of 70-100% of the image (anatomy and its proportions kept)",
              recipe=_BASE.model_copy(update={"global_scale": (0.7, 1.0)})),
        Lever(name="combined", change="lesion-scale local crops + mild intensity jitter + whole globals",
              recipe=_BASE.model_copy(update={"local_scale": (0.02, 0.08), "augment": MILD_INTENSITY,
                                              "global_scale": (0.7, 1.0)})),
        Lever(name="archive-20k-seed1", change="archive-20k pretrained again at seed 1 (its noise)", archive="20k",
              seed=1),
        Lever(name="archive-20k-prototypes-30", change="archive-20k with 30 prototypes", archive="20k",
              recipe=_BASE.model_copy(update={"prototypes": 30})),
    )


class LeverStudy(BaseModel):
    """The probe data and archives every lever shares; quoted by the report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labelled_seed: int = 3003
    archive_seed: int = 4004
    split_seed: int = 0
    difficulty: str = "standard"
    slices: int = 10
    synth_size: int = 128
    shard_size: int = 128
    labelled_studies: dict[str, int] = Field(
        default_factory=lambda: {"cxr-abnormality": 1000, "ct-hemorrhage": 300, "mr-metastasis": 300})
    archives: dict[str, dict[str, int]] = Field(default_factory=lambda: {
        "2k": {"cxr": 400, "ct-head": 80, "mr-brain": 80},
        "20k": {"cxr": 4000, "ct-head": 800, "mr-brain": 800},
    })
    levers: tuple[Lever, ...] = Field(default_factory=default_levers)
    workers: int = 2
    resamples: int = 1000

    def probe_key(self) -> dict[str, Any]:
        """What a measured probe depends on besides its lever: a cached result with another key is stale."""
        return self.model_dump(mode="json", include={"labelled_seed", "split_seed", "difficulty", "slices",
                                                     "synth_size", "labelled_studies", "resamples"})


@dataclass
class _Study:
    out: Path
    settings: LeverStudy
    device: torch.device
    console: Console


def _synth(study: _Study, folder: Path, studies: int, kind: str, seed: int, prefix: str) -> Path:
    """One phantom set, generated unless finished (synth is deterministic: an interrupted one restarts)."""
    if (folder / DONE).is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    s = study.settings
    study.console.print(f"synth {studies} {kind} studies into {folder}")
    generate(folder, studies, kind, seed, difficulty_ladder()[s.difficulty], s.slices, s.slices,
             ct_size=s.synth_size, mr_size=s.synth_size, cxr_size=s.synth_size, workers=s.workers,
             patient_prefix=prefix)
    write_json_atomic(folder / DONE, {"studies": studies, "kind": kind, "seed": seed, "finished": utc_now()})
    return folder


def _archive(study: _Study, name: str) -> Path:
    """An unlabelled archive: its own seed and patient prefix, labels, SEGs and manifest removed."""
    root = study.out / "archives" / name
    for kind, studies in study.settings.archives[name].items():
        folder = root / kind
        if not (folder / DONE).is_file():
            strip_labels(_synth(study, folder, studies, kind, study.settings.archive_seed, f"V{kind[0].upper()}"))
    return root


@dataclass
class _Probe:
    """One task's probe splits (train + validation to fit, test to score) at one input size."""

    kind: str
    inputs: InputSpec
    train: TaskData
    test: TaskData
    random_init: tuple[np.ndarray, np.ndarray] | None = None  # its probe (labels, scores), the same for every lever


def _probe_data(study: _Study, fam: TaskFamily, size: int, cache: dict[tuple[str, int], _Probe]) -> _Probe:
    key = (fam.task, size)
    if key in cache:
        return cache[key]
    s = study.settings
    name = f"{fam.task}-{s.difficulty}-{s.labelled_studies[fam.task]}-seed{s.labelled_seed}"
    folder = _synth(study, study.out / "labelled" / name, s.labelled_studies[fam.task], fam.kind,
                    s.labelled_seed, f"P{fam.code}")
    spec = task_spec(fam.task)
    items = collect_studies(folder, folder / "labels.csv", modality=spec.modalities,
                            slice_labels=folder / "slice_labels.csv" if fam.slice_labels else None,
                            index_path=study.out / "labelled" / f"{name}.sqlite", workers=s.workers)
    splits = patient_split(items, seed=s.split_seed)
    inputs = spec.input.model_copy(update={"size": size})
    probe = _Probe(spec.kind, inputs, build_data(spec, splits["train"] + splits["val"], inputs),
                   build_data(spec, splits["test"], inputs))
    cache[key] = probe
    return probe


def _pretrained(study: _Study, lever: Lever) -> tuple[Path, dict[str, Any]]:
    """Index -> prepare -> SwAV -> export for one lever, each stage cached; (encoder folder, summary)."""
    from pretrain.pipeline import shard_archive, train_and_export
    from pretrain.shards import ShardSet

    work = study.out / "pretrain" / lever.name
    summary_path = work / "summary.json"
    definition = lever.model_dump(mode="json")
    if summary_path.is_file():
        summary: dict[str, Any] = json.loads(summary_path.read_text())
        if _same(summary["lever"], lever):
            return work / "encoder", summary
    shutil.rmtree(work, ignore_errors=True)  # a changed definition trains from scratch
    archive = _archive(study, lever.archive)
    shards = shard_archive([archive], study.out / "shards" / f"{lever.archive}-{study.settings.shard_size}",
                           size=study.settings.shard_size, workers=study.settings.workers, progress=False)
    config = lever.recipe.swav_config(size=lever.size, images=len(ShardSet(shards)), device=str(study.device),
                                      seed=lever.seed)
    study.console.print(f"pretraining lever {lever.name}: {lever.change}")
    started = time.perf_counter()
    outcome = train_and_export(shards, work, config, progress=False, console=study.console)
    summary = {"lever": definition, "images": outcome.images, "steps": outcome.card.steps,
               "seconds": round(time.perf_counter() - started, 1), "final_losses": outcome.losses[-10:],
               "first_losses": outcome.losses[:10], "encoder_sha256": outcome.card.sha256, "finished": utc_now()}
    write_json_atomic(summary_path, summary)
    return work / "encoder", summary


def _same(stored: Mapping[str, Any], lever: Lever) -> bool:
    """Whether a cached result is of this lever: compared as JSON after validating the stored one, so
    that a field added later with its default does not invalidate what was measured before it
    existed, and a tuple read back from JSON as a list still matches."""
    return Lever.model_validate(stored).model_dump(mode="json") == lever.model_dump(mode="json")


def _measure(study: _Study, lever: Lever, data: dict[tuple[str, int], _Probe]) -> dict[str, Any]:
    path = study.out / "results" / f"{lever.name}.json"
    definition = lever.model_dump(mode="json")
    if path.is_file():
        cached: dict[str, Any] = json.loads(path.read_text())
        if _same(cached["lever"], lever) and cached.get("probe") == study.settings.probe_key():
            return cached
    encoder_dir, summary = _pretrained(study, lever)
    pretrained, _ = load_encoder(encoder_dir, expect=ENCODER)
    tasks: dict[str, Any] = {}
    for fam in FAMILIES:
        probe = _probe_data(study, fam, lever.size, data)
        if probe.random_init is None:
            probe.random_init = probe_scores(random_init_encoder(), probe.train, probe.test, probe.inputs, probe.kind,
                                             study.device)
        random_scored = probe.random_init
        trained_scored = probe_scores(pretrained, probe.train, probe.test, probe.inputs, probe.kind, study.device)
        if random_scored is None or trained_scored is None:
            tasks[fam.task] = {"note": "one class only in a probe split"}
            continue
        y, random_scores = random_scored
        _, trained_scores = trained_scored
        diff, low, high = paired_difference(y, random_scores, trained_scores, probe.test.study_of,
                                            study.settings.resamples)
        tasks[fam.task] = {"random_init": roc_auc(y, random_scores), "pretrained": roc_auc(y, trained_scores),
                           "difference": diff, "ci95": [low, high], "train_samples": len(probe.train),
                           "test_samples": len(probe.test), "test_studies": len(probe.test.studies),
                           "test_positives": int(y.sum())}
        study.console.print(f"  {fam.task}: random {tasks[fam.task]['random_init']:.3f} pretrained "
                            f"{tasks[fam.task]['pretrained']:.3f} diff {diff:+.3f} ({low:+.3f} to {high:+.3f})")
    result = {"lever": definition, "probe": study.settings.probe_key(), "pretraining": summary, "tasks": tasks,
              "finished": utc_now()}
    write_json_atomic(path, result)
    return result


def default_work_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "bench" / ".cache" / "pretrain-levers"


def default_report_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "bench" / "results" / "pretrain-levers"


def run_levers(out: Path, report_dir: Path, *, settings: LeverStudy | None = None, only: list[str] | None = None,
               device: str = "cpu", console: Console | None = None) -> dict[str, Any]:
    """Measure every lever (or those named in ``only``) and write ``levers.json`` and ``levers.md``."""
    study = _Study(Path(out), settings or LeverStudy(), torch.device(device), console or Console(stderr=True))
    names = [lever.name for lever in study.settings.levers]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown lever(s) {', '.join(unknown)}; known: {', '.join(names)}")
    data: dict[tuple[str, int], _Probe] = {}
    results = [_measure(study, lever, data) for lever in study.settings.levers if not only or lever.name in only]
    done = sorted((study.out / "results").glob("*.json"))
    every = {r["lever"]["name"]: r for r in (json.loads(p.read_text()) for p in done)}
    ordered = [every[name] for name in names if name in every]
    report = {"settings": study.settings.model_dump(mode="json"), "levers": ordered, "written": utc_now()}
    write_json_atomic(report_dir / "levers.json", report)
    (report_dir / "levers.md").write_text(levers_markdown(ordered, study.settings))
    return {"measured": [r["lever"]["name"] for r in results], "report": str(report_dir / "levers.md")}


def levers_markdown(results: list[Mapping[str, Any]], settings: LeverStudy) -> str:
    """The lever table: per task the probe AUC at random init and pretrained, and the difference with its CI."""
    tasks = [fam.task for fam in FAMILIES]
    lines = [
        "# Pretraining levers, gauged by the linear probe",
        "",
        ("Each row pretrains a ResNet-18 with SwAV on an unlabelled phantom archive and fits a logistic "
        "regression on its frozen, pooled features (the training and validation splits of a labelled phantom "
        "set); the AUC is on the test split's samples (image for CXR, slice for CT and MR). *Random* is the "
        "same network at its random initialisation; the difference has a 95% bootstrap interval over test "
        f"studies ({settings.resamples} resamples). Target: at least +0.05 on every task (**met**: the "
         "difference is at least 0.05 and its interval excludes 0). Minutes are wall time on 2 CPU cores, "
         "and include other work sharing them where a row is slower than its steps suggest."),
        "",
        f"Phantoms: difficulty `{settings.difficulty}`, labelled seed {settings.labelled_seed}, archive seed "
        f"{settings.archive_seed} (both apart from the paper experiment's), {settings.synth_size} px, "
        f"{settings.slices} slices per CT/MR study. Labelled studies: "
        + ", ".join(f"{t} {n}" for t, n in settings.labelled_studies.items()) + ". Archives: "
        + "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in kinds.items())
                    for name, kinds in settings.archives.items()) + " studies.",
        "",
        "| lever | change | images | steps | minutes | " + " | ".join(f"{t}: random / pretrained / diff (95% CI)"
                                                                  for t in tasks) + " |",
        "|---|---|---|---|---|" + "---|" * len(tasks),
    ]
    for result in results:
        lever, pre = result["lever"], result["pretraining"]
        cells = []
        for task in tasks:
            row = result["tasks"].get(task, {})
            if "difference" not in row:
                cells.append("n/a")
                continue
            low, high = row["ci95"]
            mark = (" **met**" if row["difference"] >= 0.05 and low > 0 else
                    " met, CI includes 0" if row["difference"] >= 0.05 else "")
            cells.append(f"{row['random_init']:.3f} / {row['pretrained']:.3f} / {row['difference']:+.3f} "
                         f"({low:+.3f} to {high:+.3f}){mark}")
        lines.append(f"| {lever['name']} | {lever['change']} | {pre['images']:,} | {pre['steps']} | "
                     f"{pre['seconds'] / 60:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Recipes (`models.experiment.PretrainRecipe` fields that differ from base):", ""]
    base = results[0]["lever"] if results else {}
    for result in results:
        lever = result["lever"]
        changed = {k: v for k, v in lever["recipe"].items() if base and base["recipe"].get(k) != v}
        extra = {k: lever[k] for k in ("archive", "size") if base and base.get(k) != lever[k]}
        lines.append(f"- `{lever['name']}`: {json.dumps({**extra, **changed}) if (changed or extra) else 'base'}")
    return "\n".join(lines) + "\n"


__all__ = ["Lever", "LeverStudy", "default_levers", "levers_markdown", "run_levers"]
