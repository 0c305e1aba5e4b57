"""The report of ``pacsnode experiment paper``: tables beside the paper's claims, plots, plain verdicts.

Everything here is read from the arm files (``out/arms/*.json``), ``frozen.json`` and the run's
summaries, so a report can be rewritten at any time (also from a partial run, which it says).
Means over seeds carry 95% Student-t intervals (:func:`models.metrics.mean_ci`); differences to
the scratch arm are *paired* by seed and label size, since the seed fixes the shuffling and the
augmentation draws that two arms share.

The verdicts are mechanical (sign and size of the measured difference against the paper's
number), so a report cannot phrase a loss as a win; the "likely reasons" section is written for
the case where pretraining does not help, from the run's own sizes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from models.experiment import (
    ARMS,
    CALIBRATION_SEED,
    PAPER_CLAIMS,
    SIZES,
    ExperimentSettings,
    arm_name,
    expected_arms,
    load_arms,
)
from models.metrics import mean_ci
from models.report import to_jsonable

ARM_LABELS: Mapping[str, str] = MappingProxyType({"scratch": "from scratch", "pretrained": "pretrained encoder",
                                                  "hybrid": "hybrid (pretrained + SwAV loss)"})
COLOURS: Mapping[str, str] = MappingProxyType({"scratch": "#7f7f7f", "pretrained": "#1f77b4", "hybrid": "#d62728"})
PAPER_AUC_GAIN = (3.0, 7.0)  # percentage points of AUC
MIN_PROBE_GAIN = 0.05  # linear-probe AUC over random init that an encoder must reach (issue 11's bar)
PAPER_FASTER: Mapping[str, float] = MappingProxyType({"default": 85.0, "mr-metastasis": 83.0})  # % fewer steps


# --------------------------------------------------------------------------------------------------
# Numbers


def _ci(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean with a 95% t interval over the finite values; ``n`` says how many there were."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean, low, high = mean_ci(finite)
    return {"mean": mean, "low": low if math.isfinite(low) else None,
            "high": high if math.isfinite(high) else None, "n": len(finite)}


def steps_to_target(curve: Sequence[Sequence[float]], target: float | None) -> int | None:
    """The first evaluated step whose validation metric reaches ``target``; ``None``: not reached."""
    if target is None or not math.isfinite(target):
        return None
    for step, value in curve:
        if value is not None and math.isfinite(value) and value >= target:
            return int(step)
    return None


def _headline(record: Mapping[str, Any]) -> float | None:
    value = record["test"].get("headline")
    return float(value) if value is not None else None


def summarise(arms: Sequence[Mapping[str, Any]], settings: ExperimentSettings) -> dict[str, Any]:
    """Per task and (arm, label size): test metric, paired differences, convergence and robustness."""
    out: dict[str, Any] = {}
    for task in settings.tasks:
        index = {(a["arm"], a["size"], int(a["seed"])): a for a in arms if a["task"] == task}
        targets: dict[int, float] = {}
        for seed in settings.seeds:
            reference = index.get(("scratch", "full", seed))
            best = reference["validation"]["best_metric"] if reference else None
            if best is not None and math.isfinite(best):
                targets[seed] = settings.convergence_fraction * float(best)
        rows: dict[str, Any] = {}
        for size in reversed(SIZES):
            for arm in ARMS:
                present = [seed for seed in settings.seeds if (arm, size, seed) in index]
                if not present:
                    continue
                records = {seed: index[(arm, size, seed)] for seed in present}
                scratch = {seed: index.get(("scratch", size, seed)) for seed in present}
                head = {seed: _headline(r) for seed, r in records.items()}
                deltas: list[float | None] = []
                relative: list[float | None] = []
                for seed in present:
                    reference = scratch[seed]
                    mine_head, base = head[seed], _headline(reference) if reference else None
                    if mine_head is not None and base is not None:
                        deltas.append(100 * (mine_head - base))
                        relative.append(100 * (mine_head / base - 1) if base else None)
                steps = {seed: steps_to_target(r["validation"]["curve"], targets.get(seed)) for seed, r in records.items()}
                faster: list[float | None] = []
                for seed in present:
                    base_record = scratch[seed]
                    base_steps = (steps_to_target(base_record["validation"]["curve"], targets.get(seed))
                                  if base_record else None)
                    mine_steps = steps[seed]
                    if mine_steps is not None and base_steps:
                        faster.append(100 * (base_steps - mine_steps) / base_steps)
                drop_kinds = sorted({k for r in records.values() for k in r.get("robustness_drop", {})})
                drop_delta: list[float | None] = []
                for seed in present:
                    mine = records[seed].get("robustness_drop_mean")
                    reference = scratch[seed]
                    base_drop = reference.get("robustness_drop_mean") if reference else None
                    if mine is not None and base_drop is not None:
                        drop_delta.append(mine - base_drop)
                row: dict[str, Any] = {
                    "arm": arm, "size": size, "seeds": present,
                    "train_studies": records[present[0]]["studies"]["train"],
                    "test": _ci(list(head.values())),
                    "delta_points_vs_scratch": _ci(deltas) if arm != "scratch" else None,
                    "relative_pct_vs_scratch": _ci(relative) if arm != "scratch" else None,
                    "steps_to_target": {str(seed): steps[seed] for seed in present},
                    "reached": sum(v is not None for v in steps.values()),
                    "steps": _ci([v for v in steps.values() if v is not None]),
                    "faster_pct_vs_scratch": _ci(faster) if arm != "scratch" else None,
                    "robustness_drop": _ci([r.get("robustness_drop_mean") for r in records.values()]),
                    "robustness_drop_by_kind": {k: _ci([r["robustness_drop"].get(k) for r in records.values()])
                                                for k in drop_kinds},
                    "robustness_drop_delta_vs_scratch": _ci(drop_delta) if arm != "scratch" else None,
                    "validation_best": _ci([r["validation"]["best_metric"] for r in records.values()]),
                    "train_seconds": _ci([r["seconds"]["train"] for r in records.values()]),
                }
                first = records[present[0]]["test"]
                if first["metric"] == "auc":
                    row["findings"] = {name: _ci([r["test"]["findings"].get(name) for r in records.values()])
                                       for name in first["findings"]}
                else:
                    for key in ("dice", "dice_positive_cases", "lesion_sensitivity", "fp_per_case"):
                        row[key] = _ci([r["test"].get(key) for r in records.values()])
                rows[f"{arm}/{size}"] = row
        metric = "dice" if task == "mr-metastasis" else "auc"
        out[task] = {"metric": metric, "targets": {str(k): v for k, v in targets.items()}, "rows": rows}
    return out


# --------------------------------------------------------------------------------------------------
# Verdicts


def _auc_verdict(delta: Mapping[str, Any] | None, metric: str) -> str:
    if not delta or delta["mean"] is None:
        return "not measured"
    mean, low = delta["mean"], delta["low"]
    sure = " (95% CI above 0)" if low is not None and low > 0 else (
        " (95% CI includes 0)" if low is not None else " (one seed: no CI)")
    if metric != "auc":
        return (f"Dice {mean:+.1f} points{sure}" if mean > 0 else f"no gain: Dice {mean:+.1f} points")
    if mean >= PAPER_AUC_GAIN[0]:
        return f"gain within or above the paper's +3-7: {mean:+.1f} points{sure}"
    if mean > 0:
        return f"positive but below the paper's +3-7: {mean:+.1f} points{sure}"
    return f"no gain: {mean:+.1f} points"


def _convergence_verdict(row: Mapping[str, Any], scratch: Mapping[str, Any] | None, task: str) -> str:
    faster = row.get("faster_pct_vs_scratch")
    paper = PAPER_FASTER.get(task, PAPER_FASTER["default"])
    total = len(row["seeds"])
    if row["reached"] == 0:
        return f"target not reached (0/{total} seeds)"
    if not faster or faster["mean"] is None:
        base = scratch["reached"] if scratch else 0
        return f"reached in {row['reached']}/{total} seeds; scratch reached in {base}/{total}: no paired comparison"
    mean = faster["mean"]
    if round(mean) == 0:
        return f"as fast as scratch (paper: up to {paper:.0f}% faster)"
    word = "faster" if mean > 0 else "slower"
    return f"{abs(mean):.0f}% {word} than scratch (paper: up to {paper:.0f}% faster)"


def _robustness_verdict(delta: Mapping[str, Any] | None) -> str:
    if not delta or delta["mean"] is None:
        return "not measured"
    mean = delta["mean"]
    if mean < 0:
        return f"more robust: drop {abs(mean):.3f} smaller than scratch's"
    if mean > 0:
        return f"less robust: drop {mean:.3f} larger than scratch's"
    return "as robust as scratch"


def verdicts(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Per task, the pretrained and hybrid arms at each label size against the three claims."""
    out: dict[str, Any] = {}
    for task, result in summary.items():
        rows = result["rows"]
        per: dict[str, Any] = {}
        for size in reversed(SIZES):
            for arm in ("pretrained", "hybrid"):
                row = rows.get(f"{arm}/{size}")
                if row is None:
                    continue
                per[f"{arm}/{size}"] = {
                    "metric": _auc_verdict(row["delta_points_vs_scratch"], result["metric"]),
                    "convergence": _convergence_verdict(row, rows.get(f"scratch/{size}"), task),
                    "robustness": _robustness_verdict(row["robustness_drop_delta_vs_scratch"]),
                }
        out[task] = per
    return out


def tally(summary: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Per claim, over every (task, pretrained or hybrid arm, label size) compared with scratch: how many
    comparisons were made, how many favour pretraining on average, and how many do so (or the opposite)
    with a 95% interval that excludes no difference. One seed gives no interval, so no "sure" counts."""
    fields = {"metric": ("delta_points_vs_scratch", 1), "convergence": ("faster_pct_vs_scratch", 1),
              "robustness": ("robustness_drop_delta_vs_scratch", -1)}
    out = {claim: {"compared": 0, "better": 0, "worse": 0, "better_ci": 0, "worse_ci": 0} for claim in fields}
    for result in summary.values():
        for key, row in result["rows"].items():
            if key.startswith("scratch/"):
                continue
            for claim, (name, sign) in fields.items():
                stat = row.get(name)
                if not stat or stat["mean"] is None:
                    continue
                counts = out[claim]
                counts["compared"] += 1
                mean = sign * stat["mean"]
                counts["better"] += mean > 0
                counts["worse"] += mean < 0
                if stat["low"] is not None and stat["high"] is not None:
                    low, high = sorted((sign * stat["low"], sign * stat["high"]))
                    counts["better_ci"] += low > 0
                    counts["worse_ci"] += high < 0
    return out


def _helps(counts: Mapping[str, Mapping[str, int]], seeds: int) -> dict[str, bool]:
    """Whether a claim's measure favours pretraining: with several seeds, more comparisons beyond their 95%
    CI for pretraining than for scratch (and at least one); with one seed, most comparisons on average
    (which is no evidence, and the report says so). The report shows the counts either way."""
    if seeds > 1:
        return {claim: c["better_ci"] > 0 and c["better_ci"] > c["worse_ci"] for claim, c in counts.items()}
    return {claim: c["better"] > c["worse"] for claim, c in counts.items()}


# --------------------------------------------------------------------------------------------------
# Markdown


def _n(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _mci(stat: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    if not stat or stat["mean"] is None:
        return "n/a"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(stat["mean"])
    if stat["low"] is not None and stat["high"] is not None:
        text += f" ({fmt.format(stat['low'])} to {fmt.format(stat['high'])})"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows], ""]


def _steps_cell(row: Mapping[str, Any]) -> str:
    total = len(row["seeds"])
    if row["reached"] == 0:
        return f"not reached (0/{total})"
    return f"{_mci(row['steps'], 0)} [{row['reached']}/{total}]"


def _task_section(task: str, result: Mapping[str, Any], frozen_task: Mapping[str, Any]) -> list[str]:
    metric = "AUC" if result["metric"] == "auc" else "Dice"
    lines = [f"### {task}", "",
             f"Frozen difficulty: **{frozen_task['candidate']}** (scratch validation {frozen_task['metric']} "
             f"{_n(frozen_task['value'])}, band {frozen_task['band'][0]}-{frozen_task['band'][1]}; "
             f"{frozen_task['note']}). Convergence target per seed: "
             + (", ".join(f"seed {k}: {_n(v)}" for k, v in result["targets"].items()) or "n/a")
             + " (95% of that seed's scratch/full best validation metric).", ""]
    header = ["arm", "labels (studies)", "seeds", f"test {metric}", "vs scratch (points)",
              "steps to target", "fewer steps than scratch", "robustness drop", "drop vs scratch"]
    rows = []
    for row in result["rows"].values():
        rows.append([ARM_LABELS[row["arm"]], f"{row['size']} ({row['train_studies']})", str(len(row["seeds"])),
                     _mci(row["test"]), _mci(row["delta_points_vs_scratch"], 1, signed=True),
                     _steps_cell(row), (_mci(row["faster_pct_vs_scratch"], 0, signed=True) + " %")
                     if row["faster_pct_vs_scratch"] and row["faster_pct_vs_scratch"]["mean"] is not None else "n/a",
                     _mci(row["robustness_drop"]), _mci(row["robustness_drop_delta_vs_scratch"], 3, signed=True)])
    lines += _table(header, rows)
    first = next(iter(result["rows"].values()), None)
    if first and "findings" in first:
        names = list(first["findings"])
        lines += [("Test AUC per finding (mean over seeds; findings without both classes in the test split are "
                  "left out):"), ""]
        lines += _table(["arm", "labels", *names],
                        [[ARM_LABELS[r["arm"]], r["size"], *[_n(r["findings"].get(n, {}).get("mean")) for n in names]]
                         for r in result["rows"].values()])
    elif first:
        lines += [("Segmentation detail (test; Dice over all cases counts a blank negative case as 1, so the "
                  "Dice over cases with metastases is shown beside it):"), ""]
        lines += _table(["arm", "labels", "Dice (all cases)", "Dice (cases with lesions)", "lesion sensitivity",
                         "false positives per case"],
                        [[ARM_LABELS[r["arm"]], r["size"], _mci(r["dice"]), _mci(r["dice_positive_cases"]),
                          _mci(r["lesion_sensitivity"]), _mci(r["fp_per_case"], 2)] for r in result["rows"].values()])
    kinds = sorted({k for r in result["rows"].values() for k in r["robustness_drop_by_kind"]})
    if kinds:
        lines += [("Robustness: largest drop of the test headline metric under each perturbation (rotation "
                  "+-30 deg, zoom 0.8-1.2, intensity x0.7-1.3, gamma 0.6-1.6; lower is more robust):"), ""]
        lines += _table(["arm", "labels", *kinds],
                        [[ARM_LABELS[r["arm"]], r["size"], *[_mci(r["robustness_drop_by_kind"].get(k)) for k in kinds]]
                         for r in result["rows"].values()])
    return lines


def _claims_table(summary: Mapping[str, Any], judged: Mapping[str, Any]) -> list[str]:
    rows = []
    for task, per in judged.items():
        for key, verdict in per.items():
            arm, size = key.split("/")
            rows.append([task, f"{ARM_LABELS[arm]}, {size} labels", verdict["metric"], verdict["convergence"],
                         verdict["robustness"]])
    header = ["task", "arm", f"AUC / Dice - paper: {PAPER_CLAIMS['auc']}",
              f"convergence - paper: {PAPER_CLAIMS['convergence']}", f"robustness - paper: {PAPER_CLAIMS['robustness']}"]
    return _table(header, rows)


def _reasons(settings: ExperimentSettings, pretrain: Mapping[str, Any]) -> list[str]:
    """Why a small CPU run may not reproduce the paper: the run's own numbers, not excuses after the fact."""
    images = pretrain.get("images", 0)
    steps = pretrain.get("steps", 0)
    batch = pretrain.get("global_batch", 0)
    seen = steps * batch
    return [
        (f"- **Archive size.** The unlabelled archive holds {images:,} images; SwAV pretraining in the paper "
        "used a hospital archive orders of magnitude larger. Self-supervised features need many more "
        "images than a handful of phantoms to beat a random initialisation."),
        (f"- **Recipe.** {steps:,} SwAV steps at a batch of {batch} ({seen:,} images seen, about "
        f"{seen / max(images, 1):.1f} epochs), ResNet-18 at {settings.input_size} px with "
        f"{settings.pretrain.prototypes} prototypes: a CPU-sized recipe, far below SwAV's hundreds of "
        "epochs at batch 256+ with 3000 prototypes."),
        ("- **Augmentations.** Pretraining uses the multi-crop views of `pretrain.augment` (crops, flips, "
        "CT windows, contrast, gamma, noise, blur); finetuning uses the same mild rotation/zoom/intensity "
        "jitter in every arm. Phantom lesions are small, local contrast changes, and crops that miss them "
        "teach the encoder little about them."),
        (f"- **Finetuning budget.** {settings.finetune.steps} steps with early stopping (patience "
        f"{settings.finetune.patience} evaluations) may let scratch catch up, or be too short for either arm "
        "to learn the task at all; the convergence table shows which."),
        ("- **Phantoms.** The generator's anatomy is simple and repetitive, so there is little generic "
        "structure for pretraining to learn that supervised training does not find in a few steps."),
    ]


def _spread(stat: Mapping[str, Any] | None) -> float | None:
    """The SD over seeds behind a mean's t interval (None with fewer than two seeds)."""
    if not stat or stat.get("low") is None or stat.get("high") is None or int(stat.get("n") or 0) < 2:
        return None
    n = int(stat["n"])
    return (stat["high"] - stat["low"]) / 2 * math.sqrt(n) / float(student_t.ppf(0.975, n - 1))


def seeds_needed(stat: Mapping[str, Any], most: int = 100) -> int | None:
    """How many seeds a 95% t interval needs to exclude 0 at this mean and this seed-to-seed spread
    (the spread read back from the interval the report gives); None where the mean is not above 0,
    the spread is unknown (one seed), or more than ``most`` would be needed."""
    mean, spread = stat.get("mean"), _spread(stat)
    if mean is None or spread is None or mean <= 0:
        return None
    for k in range(2, most + 1):
        if float(student_t.ppf(0.975, k - 1)) * spread / math.sqrt(k) < mean:
            return k
    return None


def _probe_gain(probe: Mapping[str, Any] | None, task: str) -> float | None:
    arms = (probe or {}).get("tasks", {}).get(task)
    if not arms:
        return None
    random, pretrained = arms["random init"]["auc"], arms["pretrained"]["auc"]
    return None if random is None or pretrained is None else float(pretrained) - float(random)


def shortfall_lines(summary: Mapping[str, Any], probe: Mapping[str, Any] | None) -> list[str]:
    """Per task, whether the AUC/Dice and convergence targets were met and, where not, the measured
    reason: the encoder (the probe gain), the gain itself, or the seed-to-seed spread (and how many
    seeds would resolve the gain seen)."""
    rows, reading = [], []
    for task, result in summary.items():
        compared = {key: row for key, row in result["rows"].items() if not key.startswith("scratch/")}
        if not compared:
            continue
        key, best = max(compared.items(), key=lambda kv: (kv[1]["delta_points_vs_scratch"] or {}).get("mean") or -1e9)
        delta = best["delta_points_vs_scratch"] or {}
        n, mean, low = int(delta.get("n") or 0), delta.get("mean"), delta.get("low")
        needed = seeds_needed(delta)
        scratch = result["rows"].get(f"scratch/{best['size']}")
        scratch_sd = _spread(scratch["test"]) if scratch else None
        fast_key, fastest = max(((k, row["faster_pct_vs_scratch"]) for k, row in compared.items()
                                 if row["faster_pct_vs_scratch"] and row["faster_pct_vs_scratch"]["mean"] is not None),
                                key=lambda item: item[1]["mean"], default=(None, None))
        gain = _probe_gain(probe, task)
        rows.append([task, key, _mci(delta, 1, signed=True), _n(_spread(delta), 1),
                     _n(None if scratch_sd is None else 100 * scratch_sd, 1), str(n),
                     "n/a" if needed is None else str(needed), "n/a" if gain is None else f"{gain:+.3f}",
                     "n/a" if fastest is None else f"{fast_key}: " + _mci(fastest, 0, signed=True) + " %"])
        if mean is not None and mean >= PAPER_AUC_GAIN[0] and low is not None and low > 0:
            reading.append(f"- **{task}: AUC/Dice target met** ({key}, {_mci(delta, 1, signed=True)} points).")
        else:
            if gain is not None and gain < MIN_PROBE_GAIN:
                reading.append(f"- **{task}: the pretrained encoder fell short.** Its frozen features beat the same "
                               f"network at random init by only {gain:+.3f} AUC (the bar is +{MIN_PROBE_GAIN}): the "
                               "pretrained start carries little that scratch lacks.")
            if mean is None or mean < PAPER_AUC_GAIN[0]:
                reading.append(f"- **{task}: the gain itself is short of +{PAPER_AUC_GAIN[0]:g} points** (best: "
                               f"{key}, {_n(mean, 1)} points).")
            else:
                more = (f"about {needed} seeds would put the 95% interval above 0 at this gain and spread"
                        if needed is not None else "no feasible number of seeds would")
                noise = ("" if scratch_sd is None else
                         f" Scratch alone varies by {100 * scratch_sd:.1f} points (SD) across seeds here.")
                reading.append(f"- **{task}: the gain is there ({key}, {mean:+.1f} points) but the seeds "
                               f"disagree**: the gain's SD over seeds is {_n(_spread(delta), 1)} points, so with {n} "
                               f"seeds its t interval is {_mci(delta, 1, signed=True)}; {more}.{noise}")
        if fastest is not None and fastest["mean"] >= 50 and fastest["low"] is not None and fastest["low"] > 0:
            reading.append(f"- **{task}: convergence target met** ({fast_key}, {_mci(fastest, 0, signed=True)} % "
                           "fewer steps).")
        else:
            reading.append(f"- **{task}: convergence** is at best "
                           f"{'n/a' if fastest is None else _mci(fastest, 0, signed=True)} % fewer steps than "
                           "scratch, against the target of 50 % with the interval above 0.")
    if not rows:
        return []
    return ["### Measured: which lever fell short, and why", "",
            ("Per task, the comparison with the largest mean gain over scratch, the SD of that gain over seeds "
            "(read back from its t interval), the SD of scratch's own test metric over seeds, the seeds a 95% "
            "interval needs to exclude 0 at that gain and spread, the linear probe's gain (pretrained minus "
            "random init), and the best convergence gain."), "",
            *_table(["task", "best comparison", "gain (points)", "gain SD", "scratch SD", "seeds run",
                     "seeds needed", "probe gain", "fewer steps"], rows), "", *reading, ""]


def _probe_lines(probe: Mapping[str, Any]) -> list[str]:
    """The frozen-feature probe: did SwAV learn what the findings need, before any finetuning?"""
    rows = []
    for task, arms in probe["tasks"].items():
        random, pretrained = arms["random init"]["auc"], arms["pretrained"]["auc"]
        delta = pretrained - random if _n(random) != "n/a" and _n(pretrained) != "n/a" else None
        rows.append([task, _n(random), _n(pretrained), "n/a" if delta is None else f"{delta:+.3f}",
                     str(arms["pretrained"].get("test", ""))])
    return ["### Measured: what the frozen encoder knows", "",
            "A linear probe on frozen, pooled encoder features (" + str(probe["method"]) + "): the pretrained "
            "encoder against the same network at its random initialisation, where every scratch arm starts. "
            "Pretrained well above random means the archive taught the encoder something the finding needs; "
            "equal means it did not, and no finetuning recipe can make pretraining help.", "",
            *_table(["task", "probe AUC, random init", "probe AUC, pretrained", "difference", "test samples"], rows),
            ""]


def _estimate_full(arms: Sequence[Mapping[str, Any]], pretrain: Mapping[str, Any], full: ExperimentSettings,
                   measured: ExperimentSettings) -> dict[str, Any] | None:
    """A rough full-run time on this machine from this run's costs (same input size and batch).

    Per task: seconds per inference sample from the test evaluation (one clean and 20 perturbed
    passes), seconds per training step (per regime) net of the validation passes made during
    training; both scaled to the full run's step budget, evaluation cadence and split sizes.
    """
    passes = 1 + 20 if measured.robustness else 1
    per_sample: dict[str, list[float]] = {}
    rates: dict[tuple[str, str], list[float]] = {}
    for record in arms:
        if "samples" not in record or "seconds" not in record:
            continue
        seconds, samples = record["seconds"], record["samples"]
        infer = seconds["evaluate"] / max(passes * samples["test"], 1)
        per_sample.setdefault(record["task"], []).append(infer)
        steps = record["validation"]["steps_run"]
        if steps:
            validation = len(record["validation"]["curve"]) * samples["val"] * infer
            rates.setdefault((record["task"], record["regime"]), []).append(
                max(seconds["train"] - validation, 0.0) / steps)
    if any((task, regime) not in rates for task in full.tasks for regime in ("supervised", "hybrid")):
        return None  # a partial run: no rate for some task or regime yet
    total = 0.0
    per_task: dict[str, float] = {}
    recipe = full.finetune
    for task in full.tasks:
        sup, hyb = (float(np.mean(rates[(task, regime)])) for regime in ("supervised", "hybrid"))
        infer = float(np.mean(per_sample[task]))
        per_study = 1 if task == "cxr-abnormality" else full.slices
        split_samples = 0.2 * full.labelled_studies[task] * per_study  # validation and test are 20% each
        arm_eval = (recipe.steps / recipe.eval_every) * split_samples * infer + passes * split_samples * infer
        per_seed = recipe.steps * (4 * sup + 2 * hyb) + 6 * arm_eval
        calibration = 2 * (recipe.steps * sup + (recipe.steps / recipe.eval_every) * split_samples * infer)
        per_task[task] = per_seed * len(full.seeds) + calibration
        total += per_task[task]
    pretrain_seconds = None
    seconds = pretrain.get("seconds_this_session")
    if seconds and pretrain.get("steps"):
        def work(s: ExperimentSettings) -> float:
            crop = s.input_size
            return s.pretrain.batch_size * (2 * crop**2 + s.pretrain.local_crops * (crop // 2) ** 2)
        pretrain_seconds = seconds / pretrain["steps"] * full.pretrain.steps * work(full) / work(measured)
        total += pretrain_seconds
    synth = 0.2 * sum(full.labelled_studies.values()) * 2 + 0.2 * sum(full.archive_studies.values())
    total += synth
    return {"total_s": total, "finetune_by_task_s": per_task, "pretrain_s": pretrain_seconds, "synth_s": synth,
            "method": "this run's seconds per training step (per task and regime) and per inference sample, "
                      "scaled to the full step budget (an upper bound: early stopping cuts it), evaluation cadence "
                      "and split sizes; two calibration candidates per task; SwAV time scaled by pixels per step; "
                      "synth at 0.2 s a study"}


# --------------------------------------------------------------------------------------------------
# Plots


def _figure(panels: int) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * panels, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _plot_curves(path: Path, arms: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    fig, axes = _figure(len(summary))
    for ax, (task, result) in zip(axes, summary.items(), strict=True):
        for record in arms:
            if record["task"] != task:
                continue
            curve = [(s, v) for s, v in record["validation"]["curve"] if v is not None]
            if not curve:
                continue
            label = f"{record['arm']}/{record['size']}" if record["seed"] == CALIBRATION_SEED else None
            ax.plot([c[0] for c in curve], [c[1] for c in curve], color=COLOURS[record["arm"]], alpha=0.8,
                    linestyle="-" if record["size"] == "full" else "--", linewidth=1.2, label=label)
        for value in result["targets"].values():
            ax.axhline(value, color="black", linestyle=":", linewidth=0.8)
        ax.set(title=task, xlabel="finetuning step", ylabel="validation " + ("AUC" if result["metric"] == "auc" else "Dice"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_bars(path: Path, summary: Mapping[str, Any], field: str, ylabel: str) -> None:
    fig, axes = _figure(len(summary))
    width = 0.25
    for ax, (task, result) in zip(axes, summary.items(), strict=True):
        for i, arm in enumerate(ARMS):
            xs, means, errs = [], [], []
            for j, size in enumerate(reversed(SIZES)):
                row = result["rows"].get(f"{arm}/{size}")
                stat = row[field] if row else None
                if not stat or stat["mean"] is None:
                    continue
                xs.append(j + (i - 1) * width)
                means.append(stat["mean"])
                errs.append(0.0 if stat["low"] is None else stat["mean"] - stat["low"])
            if xs:
                ax.bar(xs, means, width, yerr=errs, capsize=3, color=COLOURS[arm], label=arm)
        ax.set_xticks(range(len(SIZES)), [f"{s} labels" for s in reversed(SIZES)])
        ax.set(title=task, ylabel=ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------------


def _keep_records(out: Path, report_dir: Path, arms: Sequence[Mapping[str, Any]],
                  records: Mapping[str, Any]) -> None:
    """Make the report folder self-contained: this run's arm records and its settings, frozen
    difficulty, disjointness check and probe beside the report (the working folder is a cache that
    does not survive a new checkout). Stale arm records of an earlier run are removed."""
    if report_dir.resolve() == out.resolve():
        return
    folder = report_dir / "arms"
    folder.mkdir(parents=True, exist_ok=True)
    names = {f"{arm_name(a['task'], a['arm'], a['size'], int(a['seed']))}.json" for a in arms}
    for stale in folder.glob("*.json"):
        if stale.name not in names:
            stale.unlink()
    for arm in arms:
        name = arm_name(arm["task"], arm["arm"], arm["size"], int(arm["seed"]))
        (folder / f"{name}.json").write_text(json.dumps(to_jsonable(arm), indent=2, sort_keys=True) + "\n")
    for name, data in records.items():
        if data is not None:
            (report_dir / f"{name}.json").write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")


def write_experiment_report(
    out: Path, report_dir: Path, *, settings: ExperimentSettings, frozen: Mapping[str, Any],
    disjoint: Mapping[str, Any], pretrain: Mapping[str, Any], timings: Mapping[str, Any], command: str, device: str,
    probe: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report.md``, ``results.json`` and the PNG plots into ``report_dir``; returns paths and summary."""
    report_dir.mkdir(parents=True, exist_ok=True)
    arms = load_arms(out)
    expected = expected_arms(settings)
    have = {f"{a['task']}-{a['arm']}-{a['size']}-s{a['seed']}" for a in arms}
    missing = [name for name in expected if name not in have]
    summary = summarise(arms, settings)
    judged = verdicts(summary)
    counts = tally(summary)
    helps = _helps(counts, len(settings.seeds))
    estimate = _estimate_full(arms, pretrain, ExperimentSettings.preset("full"), settings) if settings.mode != "full" \
        else None

    plots = {"curves": report_dir / "validation_curves.png", "test": report_dir / "test_metric.png",
             "steps": report_dir / "steps_to_target.png", "robustness": report_dir / "robustness_drop.png"}
    _plot_curves(plots["curves"], arms, summary)
    _plot_bars(plots["test"], summary, "test", "test AUC (Dice for mr-metastasis)")
    _plot_bars(plots["steps"], summary, "steps", "steps to the common target (reached seeds)")
    _plot_bars(plots["robustness"], summary, "robustness_drop", "mean drop under perturbations (lower: more robust)")

    sessions = timings.get("sessions", [])
    compute = sum(float(s.get("wall_s", 0.0)) for s in sessions)
    mode_note = {
        "quick": "**A smoke run** (`--quick`: one seed, small phantom sets, short pretraining and finetuning). "
                 "It checks that the harness works end to end and **proves nothing** about the paper's claims.",
        "tiny": "**The tests' harness check** (tiny sizes). It proves nothing.",
        "full": "The full run: three seeds, the sizes below.",
    }[settings.mode]
    lines = [f"# The paper's experiment on phantom data ({settings.mode})", "", mode_note, ""]
    if missing:
        lines += [f"**Incomplete:** {len(expected) - len(missing)} of {len(expected)} arms finished; missing: "
                  + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else "")
                  + ". Rerun the same command to resume (finished arms are skipped).", ""]
    lines += ["## Verdict", ""]
    plain = []
    for claim, word in (("metric", "test AUC / Dice"), ("convergence", "convergence to the common target"),
                        ("robustness", "robustness")):
        c = counts[claim]
        detail = (f"of {c['compared']} comparisons with scratch (task x pretrained/hybrid x label size), "
                  f"{c['better']} favour pretraining on average and {c['worse']} favour scratch")
        if len(settings.seeds) > 1:
            detail += f"; beyond the 95% CI: {c['better_ci']} for pretraining, {c['worse_ci']} for scratch"
        else:
            detail += " (one seed: no confidence intervals, so none of this is evidence)"
        if len(settings.seeds) > 1:
            head = "helped" if helps[claim] else "did **not** measurably help"
        else:
            head = "looked better in most comparisons" if helps[claim] else "did **not** help"
        plain.append(f"- **{word}**: pretraining {head} - {detail}.")
    lines += plain + [""]
    if len(settings.seeds) > 1:
        lines += shortfall_lines(summary, probe)
    if not all(helps.values()):
        lines += [("Where pretraining did not help, further possible reasons (not measured here; the data were "
                  "not changed after freezing):"), "", *_reasons(settings, pretrain), ""]
    if probe:
        lines += _probe_lines(probe)
    lines += ["## Claims side by side", "", *_claims_table(summary, judged)]

    lines += ["## Setup", "",
              f"- **Command**: `{command}`",
              f"- **Mode**: {settings.mode}; **seeds** {', '.join(map(str, settings.seeds))}; **device** {device}",
              (f"- **Phantoms**: `node.synth`, labelled seed {settings.labelled_seed}, archive seed "
              f"{settings.archive_seed}; {settings.slices} slices per CT/MR series, {settings.synth_size} px images, "
              f"network input {settings.input_size} px"),
              (f"- **Splits**: by patient 60/20/20 (`patient_split`, seed {settings.split_seed}), the same for every "
              f"arm; each label subset (small, medium) a stratified prefix of the training split (`subsample`, seed {settings.subset_seed}), "
              "the same studies for every arm and seed"),
              f"- **Difficulty** frozen in `frozen.json` at {frozen['written']}, before the archive, pretraining "
              "and any pretrained arm; later runs read it and never recalibrate. Rule: " + frozen["rule"],
              (f"- **Patients**: the archive ({disjoint['archive_studies']} studies, {disjoint['archive_patients']} "
              f"patients) shares **{disjoint['shared_patients']}** patients with the labelled train/val/test splits "
              f"(checked: {disjoint['method']})."), ""]
    size_rows = []
    for task in settings.tasks:
        first = next((a for a in arms if a["task"] == task and a["size"] == "full"), None)
        ft = frozen["tasks"][task]
        studies = first["studies"] if first else {}
        subsets = []
        for size in settings.sizes(task)[:-1]:
            ran = next((a for a in arms if a["task"] == task and a["size"] == size), None)
            subsets.append(f"{size} {ran['studies']['train'] if ran else settings.subset_studies[task][size]}")
        size_rows.append([task, f"{ft['candidate']} ({_n(ft['value'])}, {'in band' if ft['in_band'] else 'closest'})",
                          str(settings.labelled_studies[task]), str(studies.get("train", "n/a")),
                          ", ".join(subsets) or "none", str(studies.get("val", "n/a")), str(studies.get("test", "n/a")),
                          str(settings.archive_studies[task])])
    lines += _table(["task", "frozen difficulty (scratch val metric)", "labelled studies", "full train",
                     "label subsets (train studies)", "val", "test", "archive studies (unlabelled)"], size_rows)
    difficulty_rows = [[task, ft["candidate"], json.dumps(ft["difficulty"], sort_keys=True),
                        "; ".join(f"{e['candidate']} {_n(e['value'])}" for e in ft["evaluated"])]
                       for task, ft in frozen["tasks"].items()]
    lines += ["Calibration (scratch arm, all labels, seed 0, validation split):", ""]
    lines += _table(["task", "frozen", "generator settings", "candidates evaluated (metric)"], difficulty_rows)
    first_task = settings.tasks[0]
    config = settings.finetune_config(task=first_task, seed=0, regime="supervised", device=device).model_dump(mode="json")
    config.pop("seed")
    config.pop("regime")
    config["lr"] = {task: settings.finetune_config(task=task, seed=0, regime="supervised", device=device).lr
                    for task in settings.tasks}
    recipe = pretrain.get("recipe", {})
    lines += ["**Finetuning** (every arm of a task; only init, regime, label size and seed differ; the learning "
              "rate is per task, set on the scratch arm before calibration because the metastasis U-Net needs "
              "3e-3 to leave its blank start within the step budget): `" + json.dumps(config, sort_keys=True) + "`",
              "",
              (f"**Pretraining** (SwAV, once, on the unlabelled archive): {pretrain.get('images', 0):,} images, "
              f"{pretrain.get('steps', 0)} steps at batch {pretrain.get('global_batch', 0)}; crops "
              f"`{json.dumps(recipe.get('crops'))}`; model `{json.dumps(recipe.get('model'))}`; optimiser "
              f"`{json.dumps(recipe.get('optim'))}`; final losses {[round(x, 3) for x in pretrain.get('final_losses', [])]}."),
              ""]

    lines += ["## Results per task", "",
              ("Means over seeds with 95% t intervals (none with one seed). Differences to scratch are paired by "
              "seed and label size: AUC/Dice in points (x100). Steps to target: the first validation step at "
              "which an arm reaches the common target; [k/n] seeds reached it. Robustness drop: mean over "
              "perturbation kinds of the largest fall of the test metric; a model near chance (AUC ~0.5, or a "
              "blank segmentation) has little to lose, so a small drop there is no sign of robustness. For "
              "mr-metastasis the validation curve is finetuning's mean Dice over all validation cases, where a "
              "blank prediction scores each negative case 1."), ""]
    for task, result in summary.items():
        lines += _task_section(task, result, frozen["tasks"][task])
    lines += ["## Plots", "", f"![validation curves]({plots['curves'].name})", "",
              f"![test metric]({plots['test'].name})", "", f"![steps to target]({plots['steps'].name})", "",
              f"![robustness drop]({plots['robustness'].name})", ""]

    lines += ["## Time", "", f"- Wall time of the sessions on this folder: {compute / 60:.1f} min "
              f"({len(sessions)} finished session(s); a killed one leaves no record); phases of the last: "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in (sessions[-1]["phases_s"].items() if sessions else {})),
              f"- Machine: {json.dumps(sessions[-1]['machine']) if sessions else 'n/a'}", ""]
    loads = [float(a["load_1min"]) for a in arms if a.get("load_1min") is not None]
    if loads:
        lines += [(f"- Machine load at the end of each arm (1-minute load average, {arms[0].get('cpus')} CPUs): "
                  f"mean {np.mean(loads):.1f}, max {max(loads):.1f}; above the CPU count other work shared the "
                  "cores and the times here (and the estimate below) are inflated."), ""]
    if estimate:
        lines += [(f"- Estimated full run on this machine: **{estimate['total_s'] / 3600:.1f} h** "
                  f"({estimate['method']})."), ""]
    lines += ["## Reproduce, resume", "", "```sh",
              f"{command}",
              "```", "",
              ("The folder keeps `settings.json`, `frozen.json`, `disjointness.json`, `calibration/`, `pretrain/`, "
              "`arms/*.json` and `timings.json`. Running the same command again skips every finished step and "
              "arm (a run stopped by `--budget-minutes` or killed loses at most the arm in progress) and rewrites "
              "this report from all arm files."), ""]
    markdown = report_dir / "report.md"
    markdown.write_text("\n".join(lines).rstrip() + "\n")
    results = {"settings": settings.model_dump(mode="json"), "frozen": frozen, "disjointness": disjoint,
               "pretrain": pretrain, "probe": probe, "summary": summary, "verdicts": judged, "pretraining_helped": helps,
               "comparisons": counts,
               "missing_arms": missing, "command": command, "estimate_full": estimate,
               "timings": timings}
    json_path = report_dir / "results.json"
    json_path.write_text(json.dumps(to_jsonable(results), indent=2, sort_keys=True, allow_nan=False) + "\n")
    _keep_records(out, report_dir, arms, {"settings": settings.model_dump(mode="json"), "frozen": frozen,
                                          "disjointness": disjoint, "probe": probe})
    brief = {task: {key: {"test": row["test"]["mean"], "steps": row["steps"]["mean"], "reached": row["reached"],
                          "robustness_drop": row["robustness_drop"]["mean"]}
                    for key, row in result["rows"].items()} for task, result in summary.items()}
    return {"markdown": markdown, "json": json_path, "plots": plots, "complete": not missing, "missing": missing,
            "summary": brief, "verdicts": judged, "helped": helps, "comparisons": counts, "estimate_full": estimate}
