"""The paper's experiment on phantom data: does SwAV pretraining help the three tasks?

``pacsnode experiment paper`` runs it end to end, in an order chosen so that the result cannot be
tuned into a win for pretraining:

1. **Labelled data, difficulty frozen first.** Per task family one labelled phantom set (synth
   seed ``labelled_seed``) is generated for each candidate difficulty of a fixed ladder, easiest
   first. Only the *from-scratch* arm (all training labels, seed 0) is trained on it; the first
   candidate whose validation metric lies in the band (AUC in [0.75, 0.90]; for metastases the Dice
   over positive validation cases in [0.3, 0.7]) is chosen. A candidate below the band ends the
   search (harder ones can only be harder); without a candidate in the band the closest one is
   taken and the report says so. The choice goes to ``frozen.json`` *before* the unlabelled archive
   exists and before any pretrained arm runs; later runs read it and never calibrate again.
2. **Unlabelled archive, no shared patient.** A second synth run (``archive_seed``, the frozen
   difficulty, its own patient-ID prefix) of all three kinds, stripped of labels, SEGs and manifest.
   The patient keys of every archive study are compared with those of every labelled study
   (train, validation and test) and the experiment refuses to go on if any is shared.
3. **Pretraining once** (index, prepare, SwAV train, export) into ``out/pretrain``, cached.
4. **Arms**: scratch, pretrained (supervised finetuning) and hybrid (pretrained + SwAV loss), each
   at each of the task's label sizes (``ExperimentSettings.sizes``: nested subsets of the training
   split, and all of it: for CXR small, medium and >= 1,000 studies), per seed. One :class:`FinetuneConfig` (steps,
   schedule, augmentations, evaluation cadence, early stopping) for all; only the encoder's
   initial weights, the regime, the label count and the seed differ. Each finished arm is one JSON
   file in ``out/arms`` and is skipped when present, so a run can be stopped and resumed.
5. **Report** (:mod:`models.experiment_report`): means with 95% t intervals over seeds, beside the
   paper's claims, whatever the numbers say.

The scratch arm with all labels at seed 0 *is* the calibration run of the frozen candidate (same
data, config and seed), so its weights are kept from calibration and not trained twice.

Running it::

    pacsnode experiment paper --quick          # smoke run, ~15 min on 2 CPU cores; proves nothing
    pacsnode experiment paper                  # full run, sized for ~2.3 h on 2 CPU cores
    pacsnode experiment paper --budget-minutes 50   # the same, in pieces: rerun until complete

The working folder (default ``bench/.cache/experiment-paper[-quick]``, gitignored) keeps every
finished step; rerunning the same command resumes. The full run's report goes to
``bench/results/experiment-paper`` (``report.md``, ``results.json``, PNG plots).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import pydicom
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file

from models.card import AppliesTo, ModelCard, OutputSpec, new_device_uid
from models.dataset import StudyItem, collect_studies, patient_key, patient_split, subsample
from models.evaluate import evaluate
from models.finetune import (
    FinetuneConfig,
    FinetuneResult,
    TaskData,
    build_data,
    build_network,
    deployability,
    finetune,
    predict,
)
from models.metrics import dice
from models.preprocess import InputSpec
from models.report import to_jsonable
from models.tasks import HEAD_CT_WINDOWS, SHARED_CHANNELS, TaskSpec, task_spec
from node.synth import Difficulty, Kind, generate
from pretrain.augment import DEFAULT_CT_WINDOWS, NAMED_CT_WINDOWS
from pretrain.backbones import Encoder, EncoderSpec
from pretrain.config import PretrainConfig
from pretrain.export import load_encoder

ARMS: tuple[str, ...] = ("scratch", "pretrained", "hybrid")
SIZES: tuple[str, ...] = ("small", "medium", "full")  # label sizes, smallest first; "full" = the whole train split
ENCODER = EncoderSpec(arch="resnet18", in_channels=SHARED_CHANNELS)  # every arm's, and the pretrained one's
CALIBRATION_SEED = 0  # the seed of the calibration run, which doubles as the scratch/full arm of seed 0
FROZEN = "frozen.json"
SETTINGS = "settings.json"
DONE = "complete.json"  # marker of a finished generated data set


@dataclass(frozen=True)
class TaskFamily:
    """A task and the phantom kind it learns from; ``code`` keeps its patient IDs apart."""

    task: str
    kind: Kind
    slice_labels: bool
    code: str


FAMILIES: tuple[TaskFamily, ...] = (
    TaskFamily("cxr-abnormality", "cxr", False, "X"),
    TaskFamily("ct-hemorrhage", "ct-head", True, "C"),
    TaskFamily("mr-metastasis", "mr-brain", False, "M"),
)

# The paper's claims, as the report quotes them (read-only).
PAPER_CLAIMS: Mapping[str, str] = MappingProxyType({
    "auc": "+3-7% AUC from self-supervised pretraining",
    "convergence": "up to 85% faster convergence (83% for brain MR metastases)",
    "robustness": "more robust to rotation, zoom, intensity and gamma changes",
})


def family(task: str) -> TaskFamily:
    for fam in FAMILIES:
        if fam.task == task:
            return fam
    raise ValueError(f"unknown task {task!r}")


def _blend(a: Difficulty, b: Difficulty) -> Difficulty:
    """The difficulty half way between two presets (lesion counts rounded down)."""
    def mid(x: float, y: float) -> float:
        return round((x + y) / 2, 4)

    return Difficulty(
        lesion_size_mm=(mid(a.lesion_size_mm[0], b.lesion_size_mm[0]), mid(a.lesion_size_mm[1], b.lesion_size_mm[1])),
        lesion_contrast=mid(a.lesion_contrast, b.lesion_contrast),
        lesion_count=((a.lesion_count[0] + b.lesion_count[0]) // 2, (a.lesion_count[1] + b.lesion_count[1]) // 2),
        noise=mid(a.noise, b.noise),
        anatomy_variation=mid(a.anatomy_variation, b.anatomy_variation),
        prevalence=mid(a.prevalence, b.prevalence),
    )


def difficulty_ladder() -> dict[str, Difficulty]:
    """The candidate difficulties, easiest first: synth's presets and the midpoints between them."""
    easy, standard, hard = (Difficulty.preset(name) for name in ("easy", "standard", "hard"))
    return {"easy": easy, "easy-standard": _blend(easy, standard), "standard": standard,
            "standard-hard": _blend(standard, hard), "hard": hard}


class FinetuneRecipe(BaseModel):
    """The finetuning knobs the experiment fixes for every arm (the rest are FinetuneConfig's defaults).

    ``lr_by_task`` overrides ``lr`` for a task, for all its arms alike. It was set on the scratch arm
    before anything was frozen: at 1e-3 the metastasis U-Net sits on the blank prediction (which
    scores every negative case's Dice as 1) for longer than the step budget; at 3e-3 it leaves it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    lr: float = 1e-3
    lr_by_task: dict[str, float] = Field(default_factory=lambda: {"mr-metastasis": 3e-3})
    warmup_steps: int = Field(ge=0)
    eval_every: int = Field(ge=1)
    patience: int = Field(ge=1)


class PretrainRecipe(BaseModel):
    """A CPU-sized SwAV recipe: ResNet-18, global crops at the finetuning size, few prototypes.

    ``local_size`` (default half the global size) and ``local_scale`` place the local crops: at the
    default (0.08-0.3 of the image area) a local crop mostly misses a phantom lesion; at lesion
    scale (e.g. 0.02-0.08) it is mostly lesion or mostly background, so matching its code to the
    global views' asks the encoder to tell them apart.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(ge=1, description="Aimed at; rounded to whole epochs so the cosine schedule completes")
    batch_size: int = Field(ge=2)
    local_crops: int = Field(ge=0)
    prototypes: int = Field(ge=2)
    hidden_dim: int = 256
    out_dim: int = 64
    lr: float = Field(0.01, description="For a global batch of 256, scaled linearly (AdamW)")
    warmup_steps: int = 30
    freeze_prototypes_steps: int = 50
    queue_length: int = 0
    queue_start_epoch: int = 2
    global_scale: tuple[float, float] = (0.3, 1.0)
    local_size: int | None = Field(None, ge=8)
    local_scale: tuple[float, float] = (0.08, 0.3)
    augment: dict[str, Any] = Field(default_factory=dict, description="AugmentConfig fields that differ from its "
                                    "defaults (validated there), e.g. milder intensity jitter")

    def swav_config(self, *, size: int, images: int, device: str, seed: int = 0) -> PretrainConfig:
        """The full SwAV config at global crop ``size``, its epochs chosen so that about ``steps``
        steps end the schedule, on the shared 3-channel convention (head-CT windows first)."""
        per_epoch = max(1, images // self.batch_size)
        epochs = max(1, round(self.steps / per_epoch))
        crops: list[dict[str, Any]] = [{"size": size, "count": 2, "scale": list(self.global_scale)}]
        if self.local_crops:
            crops.append({"size": self.local_size or size // 2, "count": self.local_crops,
                          "scale": list(self.local_scale)})
        windows = [list(NAMED_CT_WINDOWS[name]) for name in HEAD_CT_WINDOWS]
        windows += [list(pair) for pair in DEFAULT_CT_WINDOWS if list(pair) not in windows]
        return PretrainConfig.model_validate({
            "model": {"encoder": ENCODER.model_dump(), "hidden_dim": self.hidden_dim,
                      "out_dim": self.out_dim, "prototypes": self.prototypes},
            "crops": crops,
            "augment": {**self.augment, "ct_windows": windows},
            "swav": {"freeze_prototypes_steps": self.freeze_prototypes_steps, "queue_length": self.queue_length,
                     "queue_start_epoch": self.queue_start_epoch},
            "optim": {"name": "adamw", "lr": self.lr, "warmup_steps": self.warmup_steps, "final_lr": 0.0,
                      "weight_decay": 1e-4},
            "run": {"seed": seed, "batch_size": self.batch_size, "epochs": epochs, "loader_workers": 0,
                    "checkpoint_every": 100, "log_every": 10, "amp": "bf16", "device": device, "mix_shards": 4},
        })


class ExperimentSettings(BaseModel):
    """Every size and seed of one experiment; stored in ``out/settings.json`` and quoted by the report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["full", "quick", "tiny"]
    tasks: tuple[str, ...] = tuple(f.task for f in FAMILIES)
    labelled_seed: int = 1001
    archive_seed: int = 2002
    split_seed: int = 0
    subset_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    labelled_studies: dict[str, int] = Field(description="Labelled phantom studies per task (all splits)")
    subset_studies: dict[str, dict[str, int]] = Field(
        description="Per task, the training studies of each label subset (small, medium) finetuned beside the full set")
    archive_studies: dict[str, int] = Field(description="Unlabelled archive studies per task family's kind")
    slices: int = 12
    synth_size: int = 128
    input_size: int = 64
    candidates: tuple[str, ...] = ("easy", "easy-standard", "standard", "standard-hard", "hard")
    auc_band: tuple[float, float] = (0.75, 0.90)
    dice_band: tuple[float, float] = (0.3, 0.7)
    convergence_fraction: float = 0.95
    finetune: FinetuneRecipe
    pretrain: PretrainRecipe
    robustness: bool = True
    workers: int = 2

    @classmethod
    def preset(cls, mode: str) -> ExperimentSettings:
        """``full`` (the report), ``quick`` (a smoke run) or ``tiny`` (the tests' harness check)."""
        if mode == "full":
            # Sized for about 2 h on 2 CPU cores (--quick's report estimates 1.9 h from its per-step and per-sample costs).
            return cls(
                mode="full", slices=10,
                labelled_studies={"cxr-abnormality": 1700, "ct-hemorrhage": 200, "mr-metastasis": 200},
                subset_studies={"cxr-abnormality": {"small": 24, "medium": 120}, "ct-hemorrhage": {"small": 10},
                                "mr-metastasis": {"small": 10}},
                # 20,000 archive images: the lever that moved the probe on all three tasks
                # (bench/results/pretrain-levers/levers.md), one epoch of SwAV.
                archive_studies={"cxr-abnormality": 4000, "ct-hemorrhage": 800, "mr-metastasis": 800},
                finetune=FinetuneRecipe(steps=120, batch_size=16, warmup_steps=10, eval_every=10, patience=10),
                pretrain=PretrainRecipe(steps=625, batch_size=32, local_crops=4, prototypes=100,
                                        queue_length=512),
            )
        if mode == "quick":
            return cls(
                mode="quick", seeds=(0,), slices=8,
                labelled_studies={"cxr-abnormality": 80, "ct-hemorrhage": 30, "mr-metastasis": 30},
                subset_studies={"cxr-abnormality": {"small": 12, "medium": 30}, "ct-hemorrhage": {"small": 6},
                                "mr-metastasis": {"small": 6}},
                archive_studies={"cxr-abnormality": 80, "ct-hemorrhage": 12, "mr-metastasis": 12},
                finetune=FinetuneRecipe(steps=40, batch_size=16, warmup_steps=4, eval_every=5, patience=8),
                pretrain=PretrainRecipe(steps=60, batch_size=16, local_crops=2, prototypes=30,
                                        warmup_steps=6, freeze_prototypes_steps=10),
            )
        if mode == "tiny":
            return cls(
                mode="tiny", seeds=(0,), slices=3, synth_size=48, input_size=32, workers=1,
                candidates=("easy", "hard"),
                labelled_studies={"cxr-abnormality": 12, "ct-hemorrhage": 12, "mr-metastasis": 12},
                subset_studies={"cxr-abnormality": {"small": 3, "medium": 5}, "ct-hemorrhage": {"small": 3},
                                "mr-metastasis": {"small": 3}},
                archive_studies={"cxr-abnormality": 4, "ct-hemorrhage": 2, "mr-metastasis": 2},
                finetune=FinetuneRecipe(steps=2, batch_size=4, warmup_steps=0, eval_every=2, patience=4),
                pretrain=PretrainRecipe(steps=2, batch_size=4, local_crops=2, prototypes=8, hidden_dim=32,
                                        out_dim=16, warmup_steps=1, freeze_prototypes_steps=1),
            )
        raise ValueError(f"unknown experiment mode {mode!r}")

    def finetune_config(self, *, task: str, seed: int, regime: Literal["supervised", "hybrid"],
                        device: str) -> FinetuneConfig:
        """The one finetuning recipe of a task; its arms differ only in ``regime`` and ``seed`` (and init, data)."""
        recipe = self.finetune
        lr = recipe.lr_by_task.get(task, recipe.lr)
        return FinetuneConfig(regime=regime, arch="resnet18", input=self.input_spec(task), steps=recipe.steps,
                              batch_size=recipe.batch_size, lr=lr, warmup_steps=recipe.warmup_steps,
                              eval_every=recipe.eval_every, patience=recipe.patience, seed=seed, device=device)

    def sizes(self, task: str) -> tuple[str, ...]:
        """The label sizes a task is finetuned at, smallest first; every task has ``full``."""
        return tuple(size for size in SIZES if size == "full" or size in self.subset_studies.get(task, {}))

    def input_spec(self, task: str) -> InputSpec:
        """A task's input in every arm: its declared channels (head CT: brain, subdural and bone
        windows; the rest replicated) at ``input_size``, the size the encoder was pretrained at."""
        return task_spec(task).input.model_copy(update={"size": self.input_size})

    def pretrain_config(self, *, images: int, device: str) -> PretrainConfig:
        """The SwAV recipe at ``input_size`` (see :meth:`PretrainRecipe.swav_config`)."""
        return self.pretrain.swav_config(size=self.input_size, images=images, device=device)


# --------------------------------------------------------------------------------------------------
# Small helpers


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Atomically: a file that exists is complete, which is what resuming trusts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def arm_name(task: str, arm: str, size: str, seed: int) -> str:
    return f"{task}-{arm}-{size}-s{seed}"


def default_report_dir() -> Path:
    """``bench/results/experiment-paper`` of the source tree this module is in."""
    return Path(__file__).resolve().parents[1] / "bench" / "results" / "experiment-paper"


def default_work_dir(mode: str) -> Path:
    """``bench/.cache/experiment-paper[-MODE]``: phantoms, shards and weights stay out of git (bench/.gitignore)."""
    name = "experiment-paper" if mode == "full" else f"experiment-paper-{mode}"
    return Path(__file__).resolve().parents[1] / "bench" / ".cache" / name


# --------------------------------------------------------------------------------------------------
# The run's state (one object per call: no module-level mutable state)


@dataclass
class TaskBundle:
    """One task's frozen data: its splits as studies and as decoded samples, built once per process."""

    spec: TaskSpec
    inputs: InputSpec
    items: dict[str, list[StudyItem]]  # train, val, test and the label subsets (small, medium)
    data: dict[str, TaskData]  # the same keys


@dataclass
class Counters:
    """What this call did, so a caller (and the tests) can see that a resumed run retrains nothing."""

    synth_sets: int = 0
    calibration_runs: int = 0
    pretrain_steps: int = 0
    arms_trained: int = 0
    arms_skipped: int = 0
    arms_reused_from_calibration: int = 0


@dataclass
class _Run:
    out: Path
    settings: ExperimentSettings
    device: str
    console: Console
    show_progress: bool
    counters: Counters = field(default_factory=Counters)
    bundles: dict[str, TaskBundle] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - started

    def bar(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=self.console, transient=True,
                        disable=not (self.show_progress and self.console.is_terminal))


# --------------------------------------------------------------------------------------------------
# Data


def _synthesise(run: _Run, folder: Path, fam: TaskFamily, studies: int, seed: int, difficulty: Difficulty,
                prefix: str, label: str, *, unlabelled: bool = False) -> None:
    """Generate one phantom set into ``folder`` unless a finished one is there (marker file last).

    ``unlabelled``: keep the images only (no labels, slice labels, SEG or manifest), so nothing
    downstream can learn from the archive's ground truth even by mistake.
    """
    if (folder / DONE).is_file():
        return
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted generation: synth is deterministic, so start over
    s = run.settings
    with run.bar() as bar:
        task = bar.add_task(f"synth {label}", total=studies, info="")
        generate(folder, studies, fam.kind, seed, difficulty, s.slices, s.slices, ct_size=s.synth_size,
                 mr_size=s.synth_size, cxr_size=s.synth_size, workers=s.workers, patient_prefix=prefix,
                 on_study=lambda _record: bar.advance(task))
    if unlabelled:
        strip_labels(folder)
    run.counters.synth_sets += 1
    write_json_atomic(folder / DONE, {"studies": studies, "seed": seed, "kind": fam.kind, "patient_prefix": prefix,
                                                "difficulty": difficulty.as_dict(), "unlabelled": unlabelled, "finished": utc_now()})


def strip_labels(folder: Path) -> None:
    """Leave a generated phantom set its images only: no label tables, slice labels, SEGs or manifest."""
    for name in ("labels.csv", "slice_labels.csv", "manifest.json"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "seg", ignore_errors=True)


def _labelled_folder(run: _Run, fam: TaskFamily, candidate: str) -> Path:
    return run.out / "data" / "labelled" / fam.task / candidate


def _labelled_set(run: _Run, fam: TaskFamily, candidate: str) -> Path:
    folder = _labelled_folder(run, fam, candidate)
    s = run.settings
    with run.phase("synth"):
        _synthesise(run, folder, fam, s.labelled_studies[fam.task], s.labelled_seed, difficulty_ladder()[candidate],
                    f"L{fam.code}", f"{fam.task} {candidate}")
    return folder


def _bundle(run: _Run, fam: TaskFamily, candidate: str) -> TaskBundle:
    """The splits of a labelled set: patient-level 60/20/20 (seed fixed); each label subset a stratified prefix."""
    key = f"{fam.task}/{candidate}"
    if key in run.bundles:
        return run.bundles[key]
    folder = _labelled_set(run, fam, candidate)
    spec = task_spec(fam.task)
    s = run.settings
    index = run.out / "data" / "index" / f"{fam.task}-{candidate}.sqlite"
    index.parent.mkdir(parents=True, exist_ok=True)
    items = collect_studies(folder, folder / "labels.csv", modality=spec.modalities,
                            slice_labels=folder / "slice_labels.csv" if fam.slice_labels else None,
                            index_path=index, workers=s.workers)
    splits = patient_split(items, seed=s.split_seed)
    named = {"train": splits["train"], "val": splits["val"], "test": splits["test"]}
    for size, count in s.subset_studies.get(fam.task, {}).items():  # one seeded order: smaller sets nest in larger
        named[size] = subsample(splits["train"], count=min(count, len(splits["train"])), seed=s.subset_seed)
    inputs = s.input_spec(fam.task)
    bundle = TaskBundle(spec, inputs, named, {name: build_data(spec, studies, inputs) for name, studies in named.items()})
    run.bundles[key] = bundle
    return bundle


# --------------------------------------------------------------------------------------------------
# Calibration


def _positive_dice(data: TaskData, probs: torch.Tensor) -> float:
    """Mean Dice over the cases with lesions: a blank prediction scores 0 here, not the negatives' share."""
    cases: dict[int, list[int]] = {}
    for sample, study in enumerate(data.study_of):
        cases.setdefault(study, []).append(sample)
    values = []
    for samples in cases.values():
        truth = data.targets[samples].numpy().astype(bool)
        if truth.any():
            values.append(dice((probs[samples] >= 0.5).numpy(), truth))
    return float(np.mean(values)) if values else math.nan


def calibration_metric(bundle: TaskBundle, result: FinetuneResult, device: str) -> tuple[str, float]:
    """What the band is checked on: best validation AUC, or Dice over positive validation cases."""
    if bundle.spec.kind == "segmentation":
        probs = predict(result.network.to(torch.device(device)), bundle.data["val"], bundle.inputs,
                        torch.device(device))
        result.network.cpu()
        return "dice_positive_cases", _positive_dice(bundle.data["val"], probs)
    return "auc", float(result.best_metric)


def _band(settings: ExperimentSettings, spec: TaskSpec) -> tuple[float, float]:
    return settings.dice_band if spec.kind == "segmentation" else settings.auc_band


def _distance(value: float, band: tuple[float, float]) -> float:
    if not math.isfinite(value):
        return math.inf
    return max(band[0] - value, value - band[1], 0.0)


def search_stops(value: float, band: tuple[float, float]) -> bool:
    """Whether calibration stops at this candidate: it is in the band, or below it (later ones are harder)."""
    return _distance(value, band) == 0.0 or (math.isfinite(value) and value < band[0])


def choose_candidate(evaluated: list[tuple[str, float]], band: tuple[float, float]) -> tuple[str, bool, str]:
    """(candidate, in band, note) from the candidates evaluated in ladder order: the first in the band, else
    the closest (ties to the earlier, easier one); a NaN metric (no class pair in validation) is never close."""
    if not evaluated:
        raise ValueError("no calibration candidate was evaluated")
    for name, value in evaluated:
        if _distance(value, band) == 0.0:
            return name, True, "first candidate in the band"
    name, _ = min(evaluated, key=lambda pair: _distance(pair[1], band))
    return name, False, "no candidate in the band: the closest one evaluated is taken"


def _result_record(result: FinetuneResult) -> dict[str, Any]:
    return {"best_metric": result.best_metric, "best_step": result.best_step, "steps_run": result.steps_run,
            "curve": [[step, value] for step, value in result.curve],
            "outputs": [output.model_dump(mode="json") for output in result.outputs],
            "seconds": result.seconds, "losses": result.losses}


def _calibrate_candidate(run: _Run, fam: TaskFamily, candidate: str) -> dict[str, Any]:
    """Train the scratch arm (all labels, seed 0) on one candidate; cached with its weights."""
    folder = run.out / "calibration" / fam.task
    record_path = folder / f"{candidate}.json"
    if record_path.is_file():
        cached: dict[str, Any] = _read_json(record_path)
        return cached
    bundle = _bundle(run, fam, candidate)
    config = run.settings.finetune_config(task=fam.task, seed=CALIBRATION_SEED, regime="supervised",
                                          device=run.device)
    with run.phase("calibration"):
        result = _train(run, bundle, config, None, f"calibrate {fam.task} {candidate}")
        metric_name, metric = calibration_metric(bundle, result, run.device)
    weights = folder / f"{candidate}.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.network.state_dict().items()}, str(weights))
    record = {"task": fam.task, "candidate": candidate, "difficulty": difficulty_ladder()[candidate].as_dict(),
              "metric": metric_name, "value": metric, "band": list(_band(run.settings, bundle.spec)),
              "config": config.model_dump(mode="json"), "result": _result_record(result), "weights": weights.name,
              "studies": {k: len(v) for k, v in bundle.items.items()}, "finished": utc_now()}
    write_json_atomic(record_path, record)
    run.counters.calibration_runs += 1
    return record


def _calibrate(run: _Run) -> dict[str, Any]:
    """Choose and freeze each task's difficulty from the scratch arm alone (see the module docstring)."""
    path = run.out / FROZEN
    if path.is_file():
        frozen: dict[str, Any] = _read_json(path)
        run.console.print(f"difficulty frozen in {path} (written {frozen['written']}): not recalibrating")
        return frozen
    s = run.settings
    tasks: dict[str, Any] = {}
    for task in s.tasks:
        fam = family(task)
        band = _band(s, task_spec(task))
        evaluated: list[dict[str, Any]] = []
        for candidate in s.candidates:
            record = _calibrate_candidate(run, fam, candidate)
            value = float(record["value"]) if record["value"] is not None else math.nan  # NaN is stored as null
            evaluated.append({"candidate": candidate, "metric": record["metric"], "value": value,
                              "in_band": _distance(value, band) == 0.0})
            run.console.print(f"calibration {task} {candidate}: {record['metric']} {value:.3f} "
                              f"(band {band[0]:.2f}-{band[1]:.2f})")
            if search_stops(value, band):
                break
        name, in_band, note = choose_candidate([(e["candidate"], e["value"]) for e in evaluated], band)
        chosen = next(e for e in evaluated if e["candidate"] == name)
        tasks[task] = {"candidate": name, "difficulty": difficulty_ladder()[name].as_dict(), "metric": chosen["metric"],
                       "value": chosen["value"], "in_band": in_band, "band": list(band), "note": note,
                       "evaluated": evaluated}
    frozen = {
        "written": utc_now(), "labelled_seed": s.labelled_seed, "tasks": tasks,
        "rule": ("candidates easiest first; the first whose from-scratch validation metric (all labels, seed 0) "
                 "lies in the band is frozen; a candidate below the band stops the search; with none in the "
                 "band the closest evaluated one is frozen. Decided before the archive, pretraining or any "
                 "pretrained arm exists; never revisited."),
    }
    write_json_atomic(path, frozen)
    for task, chosen_task in tasks.items():  # the other candidates' sets and weights are not needed any more
        for candidate in s.candidates:
            if candidate != chosen_task["candidate"]:
                shutil.rmtree(_labelled_folder(run, family(task), candidate), ignore_errors=True)
                run.bundles.pop(f"{task}/{candidate}", None)
                (run.out / "calibration" / task / f"{candidate}.safetensors").unlink(missing_ok=True)
    run.console.print(f"[bold]difficulty frozen[/] in {path}: "
                      + ", ".join(f"{t} {v['candidate']} ({v['value']:.3f})" for t, v in tasks.items()))
    return frozen


# --------------------------------------------------------------------------------------------------
# The unlabelled archive and pretraining


def _archive(run: _Run, frozen: dict[str, Any]) -> Path:
    """The unlabelled archive: frozen difficulty, another seed, its own patient prefix, labels removed."""
    root = run.out / "data" / "archive"
    s = run.settings
    with run.phase("synth"):
        for task in s.tasks:
            fam = family(task)
            folder = root / fam.kind
            difficulty = Difficulty(**_difficulty_args(frozen["tasks"][task]["difficulty"]))
            _synthesise(run, folder, fam, s.archive_studies[task], s.archive_seed, difficulty, f"U{fam.code}",
                        f"archive {fam.kind}", unlabelled=True)
    return root


def _difficulty_args(stored: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}


def _archive_patient_keys(root: Path) -> dict[str, int]:
    """Patient key -> number of archive studies, read from the DICOM headers (one file per study)."""
    keys: dict[str, int] = {}
    for study in sorted((root).glob("*/dicom/*")):
        first = next(study.rglob("*.dcm"), None)
        if first is None:
            continue
        ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["PatientID"])
        key = patient_key(str(ds.PatientID))
        keys[key] = keys.get(key, 0) + 1
    return keys


def _disjointness(run: _Run, frozen: dict[str, Any], archive: Path) -> dict[str, Any]:
    """Check (and record) that the archive shares no patient with any labelled split; refuse otherwise."""
    archive_keys = _archive_patient_keys(archive)
    labelled: dict[str, Any] = {}
    shared_total = 0
    for task in run.settings.tasks:
        bundle = _bundle(run, family(task), frozen["tasks"][task]["candidate"])
        per_split = {}
        for split in ("train", "val", "test"):
            keys = {item.patient_key for item in bundle.items[split]}
            shared = len(keys & set(archive_keys))
            shared_total += shared
            per_split[split] = {"patients": len(keys), "shared_with_archive": shared}
        labelled[task] = per_split
    check = {"archive_studies": sum(archive_keys.values()), "archive_patients": len(archive_keys),
             "labelled": labelled, "shared_patients": shared_total, "disjoint": shared_total == 0,
             "method": "SHA-256 patient keys of PatientID, read from every archive study's DICOM header and from "
                       "every labelled study (models.dataset.collect_studies)"}
    write_json_atomic(run.out / "disjointness.json", check)
    if shared_total:
        raise RuntimeError(f"the pretraining archive shares {shared_total} patient(s) with the labelled data")
    return check


def _pretrain(run: _Run, archive: Path) -> tuple[Path, dict[str, Any]]:
    """Index -> prepare -> SwAV -> export, each stage cached; returns the encoder folder and a summary."""
    from pretrain.pipeline import shard_archive, train_and_export
    from pretrain.shards import ShardSet

    root = run.out / "pretrain"
    summary_path = root / "summary.json"
    if (root / "encoder" / "encoder.yaml").is_file() and summary_path.is_file():
        return root / "encoder", _read_json(summary_path)
    s = run.settings
    root.mkdir(parents=True, exist_ok=True)
    with run.phase("pretrain"):
        run.console.print("pretraining: index, prepare, SwAV, export")
        shards = shard_archive([archive], root, size=s.synth_size, workers=s.workers, progress=run.show_progress)
        config = s.pretrain_config(images=len(ShardSet(shards)), device=run.device)
        started = time.perf_counter()
        outcome = train_and_export(shards, root, config, progress=run.show_progress, console=run.console)
        run.counters.pretrain_steps += len(outcome.losses)
        card, images, encoder_dir = outcome.card, outcome.images, outcome.encoder_dir
    summary = {"images": images, "steps": card.steps, "global_batch": card.global_batch,
               "modalities": card.training_data.get("modalities"), "studies": card.training_data.get("studies"),
               "recipe": config.model_dump(mode="json"), "encoder_sha256": card.sha256,
               "seconds_this_session": time.perf_counter() - started,
               "final_losses": outcome.losses[-10:], "device": run.device}
    write_json_atomic(summary_path, summary)
    return encoder_dir, summary


# --------------------------------------------------------------------------------------------------
# Arms


def _train(run: _Run, bundle: TaskBundle, config: FinetuneConfig, encoder: Encoder | None, label: str,
           train_split: str = "train") -> FinetuneResult:
    with run.bar() as bar:
        task = bar.add_task(label, total=config.steps, info="")

        def progress(step: int, loss: float, metric: float | None) -> None:
            info = f"loss {loss:.3f}" + (f"  val {metric:.3f}" if metric is not None else "")
            bar.update(task, completed=step, info=info)

        return finetune(bundle.spec, bundle.data[train_split], bundle.data["val"], config, encoder=encoder,
                        progress=progress)


def _card(spec: TaskSpec, result: FinetuneResult, config: FinetuneConfig) -> ModelCard:
    """An in-memory model card (what ``evaluate`` reads), as ``save_model`` would write it."""
    encoder_spec = result.network.encoder.spec  # type: ignore[union-attr]
    deployable, why = deployability(spec, result.best_metric, config)
    return ModelCard(
        name=f"experiment-{spec.name}", version="0", task=spec.name, kind=spec.kind, description=spec.description,
        applies_to=AppliesTo(modalities=spec.modalities, body_parts=spec.body_parts),
        encoder=encoder_spec, input=config.input_for(spec),
        outputs=result.outputs, deployable=deployable, deployability=why,
        device_uid=new_device_uid(), created=utc_now(),
    )


def _reuse_calibration(run: _Run, bundle: TaskBundle, task: str, candidate: str,
                       config: FinetuneConfig) -> FinetuneResult | None:
    """The calibration run of the frozen candidate, if it is this arm (same config and seed) and kept."""
    record_path = run.out / "calibration" / task / f"{candidate}.json"
    weights = run.out / "calibration" / task / f"{candidate}.safetensors"
    if not (record_path.is_file() and weights.is_file()):
        return None
    record = _read_json(record_path)
    if record["config"] != config.model_dump(mode="json"):
        return None
    network = build_network(bundle.spec, Encoder(config.encoder_spec(bundle.spec)), config)
    network.load_state_dict(load_file(str(weights)))
    saved = record["result"]
    return FinetuneResult(network.eval(), float(saved["best_metric"]), int(saved["best_step"]), int(saved["steps_run"]),
                          [(int(a), float(b)) for a, b in saved["curve"]],
                          [OutputSpec.model_validate(output) for output in saved["outputs"]],
                          float(saved["seconds"]), [float(x) for x in saved["losses"]])


def _test_record(bundle: TaskBundle, metrics: dict[str, Any], result: FinetuneResult, device: str) -> dict[str, Any]:
    spec = bundle.spec
    if spec.kind == "segmentation":
        probs = predict(result.network.to(torch.device(device)), bundle.data["test"], bundle.inputs,
                        torch.device(device))
        result.network.cpu()
        return {"metric": "dice", "headline": metrics["dice"], "dice": metrics["dice"],
                "dice_positive_cases": _positive_dice(bundle.data["test"], probs),
                "lesion_sensitivity": metrics.get("lesion_sensitivity"), "fp_per_case": metrics.get("fp_per_case"),
                "truth_lesions": metrics.get("truth_lesions")}
    findings = {name: values.get("auc") for name, values in metrics["findings"].items()}
    aucs = [v for v in findings.values() if _finite(v)]
    return {"metric": "auc", "headline": float(np.mean(aucs)) if aucs else None, "findings": findings}


def _run_arm(run: _Run, task: str, candidate: str, arm: str, size: str, seed: int, encoder_dir: Path) -> dict[str, Any]:
    path = run.out / "arms" / f"{arm_name(task, arm, size, seed)}.json"
    if path.is_file():
        run.counters.arms_skipped += 1
        cached: dict[str, Any] = _read_json(path)
        return cached
    bundle = _bundle(run, family(task), candidate)
    regime: Literal["supervised", "hybrid"] = "hybrid" if arm == "hybrid" else "supervised"
    config = run.settings.finetune_config(task=task, seed=seed, regime=regime, device=run.device)
    split = "train" if size == "full" else size
    started = time.perf_counter()
    result = None
    trained_in = "arm"
    if arm == "scratch" and size == "full" and seed == CALIBRATION_SEED:
        result = _reuse_calibration(run, bundle, task, candidate, config)
        if result is not None:
            trained_in = "calibration"
            run.counters.arms_reused_from_calibration += 1
    init: dict[str, Any] = {"init": "scratch"}
    if result is None:
        encoder = None
        if arm != "scratch":
            encoder, card = load_encoder(encoder_dir, expect=config.encoder_spec(bundle.spec))
            init = {"init": "pretrained", "encoder_sha256": card.sha256, "pretrain_steps": card.steps}
        result = _train(run, bundle, config, encoder, arm_name(task, arm, size, seed), split)
        run.counters.arms_trained += 1
    trained = time.perf_counter() - started
    metrics, _ = evaluate(result.network, _card(bundle.spec, result, config), bundle.items["test"],
                          robustness=run.settings.robustness, device=torch.device(run.device))
    result.network.cpu()
    drops = {k: float(v) for k, v in metrics.get("robustness_drop", {}).items()}
    finite_drops = [v for v in drops.values() if math.isfinite(v)]
    record = {
        "task": task, "arm": arm, "size": size, "seed": seed, "regime": regime, **init,
        "difficulty": candidate, "trained_in": trained_in,
        "studies": {"train": len(bundle.items[split]), "val": len(bundle.items["val"]),
                    "test": len(bundle.items["test"])},
        "samples": {"train": len(bundle.data[split]), "val": len(bundle.data["val"]), "test": len(bundle.data["test"])},
        "config": config.model_dump(mode="json"),
        "validation": {"metric": "mean Dice" if bundle.spec.kind == "segmentation" else "mean study AUC",
                       **_result_record(result)},
        "test": _test_record(bundle, metrics, result, run.device),
        "robustness_drop": drops,
        "robustness_drop_mean": float(np.mean(finite_drops)) if finite_drops else None,
        "robustness": metrics.get("robustness", {}),
        "seconds": {"train": trained if trained_in == "arm" else result.seconds,
                    "evaluate": time.perf_counter() - started - trained},
        "device": run.device, "torch": torch.__version__, "finished": utc_now(),
        # Timings are only comparable on an otherwise idle machine; the 1-minute load says whether it was.
        "load_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
    }
    write_json_atomic(path, record)
    return record


# --------------------------------------------------------------------------------------------------
# Entry point


def _check_settings(out: Path, settings: ExperimentSettings) -> None:
    """A folder belongs to one set of settings: resuming with others would mix incomparable arms."""
    path = out / SETTINGS
    current = settings.model_dump(mode="json")
    if path.is_file():
        stored = _read_json(path)
        if stored != current:
            raise ValueError(f"{out} holds an experiment with other settings ({stored.get('mode')!r}); "
                             "use another --out or remove it")
        return
    write_json_atomic(path, current)


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def _accumulate_timings(out: Path, run: _Run, wall: float) -> dict[str, Any]:
    """Seconds per phase summed over every session that worked on this folder (for the budget)."""
    path = out / "timings.json"
    timings: dict[str, Any] = _read_json(path) if path.is_file() else {"sessions": []}
    timings["sessions"].append({"finished": utc_now(), "wall_s": wall, "phases_s": dict(run.phases),
                                "counters": vars(run.counters), "device": run.device, "machine": _machine()})
    write_json_atomic(path, timings)
    return timings


def run_paper_experiment(
    out: Path,
    quick: bool = False,
    device: str = "cpu",
    progress: bool = True,
    *,
    settings: ExperimentSettings | None = None,
    report_dir: Path | None = None,
    command: str | None = None,
    budget_minutes: float | None = None,
    on_arm: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment in ``out`` and write its report; returns a summary.

    ``settings`` overrides the ``full``/``quick`` preset (the tests use the ``tiny`` one).
    ``report_dir``: where report.md, results.json and the plots go; default ``out/report``, except
    for a full run: ``bench/results/experiment-paper``. ``budget_minutes``: start no new arm after
    this long (the run is resumable; the report then says which arms are missing).
    """
    started = time.perf_counter()
    out = Path(out)
    chosen = settings or ExperimentSettings.preset("quick" if quick else "full")
    console = Console(stderr=True, quiet=not progress)
    run = _Run(out=out, settings=chosen, device=device, console=console, show_progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, chosen)
    console.print(f"[bold]experiment paper[/] ({chosen.mode}) in {out} on {device}")

    frozen = _calibrate(run)
    archive = _archive(run, frozen)
    disjoint = _disjointness(run, frozen, archive)
    console.print(f"archive: {disjoint['archive_studies']} studies of {disjoint['archive_patients']} patients; "
                  f"shared patients with labelled data: {disjoint['shared_patients']}")
    encoder_dir, pretrain_summary = _pretrain(run, archive)

    stopped_early = False
    with run.phase("arms"):
        for seed in chosen.seeds:
            for task in chosen.tasks:
                candidate = frozen["tasks"][task]["candidate"]
                for size in reversed(chosen.sizes(task)):  # full first: the convergence target comes from scratch/full
                    for arm in ARMS:
                        over = budget_minutes is not None and time.perf_counter() - started > budget_minutes * 60
                        name = arm_name(task, arm, size, seed)
                        if over and not (out / "arms" / f"{name}.json").is_file():
                            stopped_early = True
                            break
                        record = _run_arm(run, task, candidate, arm, size, seed, encoder_dir)
                        if on_arm is not None:
                            on_arm(record)
                        console.print(f"{name}: test {record['test']['metric']} "
                                      f"{_fmt(record['test']['headline'])}, robustness drop "
                                      f"{_fmt(record['robustness_drop_mean'])}")
    probe = _probe(run, frozen, encoder_dir)
    wall = time.perf_counter() - started
    timings = _accumulate_timings(out, run, wall)

    from models.experiment_report import write_experiment_report

    target = report_dir or (default_report_dir() if chosen.mode == "full" else out / "report")
    shown = command or ("pacsnode experiment paper" + (" --quick" if quick else "") + f" --out {out}"
                        + (f" --device {device}" if device != "cpu" else ""))
    report = write_experiment_report(out, target, settings=chosen, frozen=frozen, disjoint=disjoint,
                                     pretrain=pretrain_summary, timings=timings, command=shown, device=device,
                                     probe=probe)
    console.print(f"report: {report['markdown']}")
    return {"out": str(out), "report": report, "frozen": frozen, "disjointness": disjoint,
            "counters": vars(run.counters), "wall_s": wall, "complete": report["complete"] and not stopped_early,
            "stopped_by_budget": stopped_early, "summary": report["summary"]}


def _probe(run: _Run, frozen: dict[str, Any], encoder_dir: Path) -> dict[str, Any]:
    """Linear probes on frozen features, pretrained vs random init, per task (cached in ``probe.json``)."""
    from models.experiment_probe import probe_auc

    path = run.out / "probe.json"
    if path.is_file():
        cached: dict[str, Any] = _read_json(path)
        return cached
    device = torch.device(run.device)
    tasks: dict[str, Any] = {}
    with run.phase("probe"):
        for task in run.settings.tasks:
            bundle = _bundle(run, family(task), frozen["tasks"][task]["candidate"])
            encoders = {"random init": random_init_encoder(),
                        "pretrained": load_encoder(encoder_dir, expect=ENCODER)[0]}
            tasks[task] = {name: probe_auc(encoder, bundle.data["train"], bundle.data["test"], bundle.inputs,
                                           bundle.spec.kind, device) for name, encoder in encoders.items()}
            run.console.print(f"probe {task}: " + ", ".join(f"{k} {_fmt(v['auc'])}" for k, v in tasks[task].items()))
    probe = {"tasks": tasks, "written": utc_now(),
             "method": "logistic regression (L2 on standardised pooled features, L-BFGS) fitted on the full training "
                       "split's samples, AUC on the test split's samples (image / slice level)"}
    write_json_atomic(path, probe)
    return probe


def random_init_encoder() -> Encoder:
    """The experiment's encoder at the initialisation every scratch arm starts from (seed
    ``CALIBRATION_SEED``): the probe's baseline."""
    torch.manual_seed(CALIBRATION_SEED)
    return Encoder(ENCODER)


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"


def expected_arms(settings: ExperimentSettings) -> list[str]:
    """Every arm file name a complete run has (the report counts what is missing)."""
    return [arm_name(task, arm, size, seed) for seed in settings.seeds for task in settings.tasks
            for size in reversed(settings.sizes(task)) for arm in ARMS]


def load_arms(out: Path) -> list[dict[str, Any]]:
    return [_read_json(path) for path in sorted((out / "arms").glob("*.json"))]


__all__ = [
    "ARMS", "FAMILIES", "PAPER_CLAIMS", "SIZES", "ExperimentSettings", "FinetuneRecipe", "PretrainRecipe",
    "arm_name", "difficulty_ladder", "expected_arms", "load_arms", "run_paper_experiment",
]
