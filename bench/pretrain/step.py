"""Part (b): our full SwAV training step against the same step built on lightly's ``SwaVLoss``.

Ours is ``pretrain.train.Trainer.train_step`` itself (learning rate, prototype normalisation,
multi-crop forward, Sinkhorn codes, swapped-prediction loss, backward, LARS update, cluster-usage
statistics). Lightly's side takes a deep copy of the same ``SwAVModel`` (same encoder, projection
and prototypes, same initial weights), the same optimiser and schedule, batch and crops, and does
what SwAV's loop does with lightly's loss in the middle: normalise the prototypes, forward,
``SwaVLoss(high_resolution_outputs=global crops' scores, low_resolution_outputs=local crops')``,
backward, step. Lightly's loss computes codes for every high-resolution crop, which are our
``assign_crops`` (the global crops), and both sides get temperature, epsilon and Sinkhorn
iterations from the same config. So the steps differ in the loss implementation only (and in the
bookkeeping ``train_step`` does on top), which is what the ratio isolates; the backbone dominates
the time either way.

lightly is not a dependency: its package imports torchvision, which does not load beside this CPU
torch (see ../shared/FIELD-NOTES.md), so only ``lightly/loss/swav_loss.py`` (torch only) is loaded,
by file location. Without lightly installed the comparison is skipped and only our step is timed.

Timing: the two variants alternate (and swap which goes first every round), warm-up rounds are
dropped, and the median of the rest is reported, so slow drifts of a shared machine hit both.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pretrain.config import PretrainConfig, load_config
from pretrain.data import Batch
from pretrain.model import SwAVModel
from pretrain.optim import build_optimizer, learning_rate
from pretrain.runtime import Runtime
from pretrain.swav import SwAVLoss, cluster_usage, sinkhorn
from pretrain.train import Trainer

LIGHTLY_INSTALL = ".venv/bin/pip install --no-deps lightly"


@dataclass(frozen=True)
class StepSettings:
    """A CPU-friendly but representative step: the recipe's head and prototypes, smaller crops."""

    arch: str = "resnet18"
    batch_size: int = 32
    crops: tuple[tuple[int, int], ...] = ((96, 2), (48, 6))  # (size, count), global crops first
    prototypes: int = 3000
    warmup: int = 2  # rounds not counted
    rounds: int = 10  # counted rounds (one step of each variant per round)
    loss_repeats: int = 20  # repeats of the loss-only timings
    breakdown_steps: int = 2
    threads: int = 1

    def overrides(self) -> dict[str, Any]:
        scales = [[0.14, 1.0]] + [[0.05, 0.14]] * (len(self.crops) - 1)
        return {
            "model": {"encoder": {"arch": self.arch, "in_channels": 1}, "prototypes": self.prototypes},
            "crops": [{"size": size, "count": count, "scale": scale}
                      for (size, count), scale in zip(self.crops, scales, strict=True)],
            # Prototypes learn from step 0 on both sides (freezing would only skip their update).
            "swav": {"freeze_prototypes_steps": 0, "queue_length": 0},
            "run": {"batch_size": self.batch_size, "amp": "none", "device": "cpu", "loader_workers": 0},
        }


@dataclass
class Agreement:
    """Ours vs lightly on the same prototype scores: loss, codes and gradients."""

    loss_ours: float
    loss_lightly: float
    loss_abs_diff: float
    loss_rel_diff: float
    codes_max_abs_diff: float
    grad_max_abs_diff: float
    grad_rel_diff: float  # max |difference| over max |our gradient|
    trajectory_max_abs_diff: float | None = None  # over the timed steps (both trained side by side)


@dataclass
class StepResult:
    settings: dict[str, object]
    hyperparameters: dict[str, object]
    lightly_version: str | None
    lightly_skipped: str | None  # why the comparison did not run
    ours_s: list[float] = field(default_factory=list)
    lightly_s: list[float] = field(default_factory=list)
    loss_ours_s: float = 0.0  # our SwAVLoss forward + backward on leaf scores (median)
    sinkhorn_ours_s: float = 0.0  # of which the Sinkhorn codes
    loss_lightly_s: float | None = None
    agreement: Agreement | None = None
    breakdown_s: dict[str, float] = field(default_factory=dict)  # median seconds per phase of our step
    profile: list[dict[str, object]] = field(default_factory=list)  # top ops of one profiled step
    losses_ours: list[float] = field(default_factory=list)
    losses_lightly: list[float] = field(default_factory=list)

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours_s)

    @property
    def lightly_median(self) -> float | None:
        return statistics.median(self.lightly_s) if self.lightly_s else None

    @property
    def speed_ratio(self) -> float | None:
        """Lightly's step time over ours: above 1 means our step is faster."""
        theirs = self.lightly_median
        return theirs / self.ours_median if theirs is not None else None

    @property
    def paired_ratio(self) -> float | None:
        """Median over rounds of lightly's time over ours in the same round (neighbours share the load)."""
        if not self.lightly_s:
            return None
        return statistics.median(t / o for o, t in zip(self.ours_s, self.lightly_s, strict=True))

    @property
    def best_ratio(self) -> float | None:
        """Lightly's fastest step over ours: the least disturbed rounds of a loaded machine."""
        return min(self.lightly_s) / min(self.ours_s) if self.lightly_s else None

    @staticmethod
    def spread(times: Sequence[float]) -> float:
        """Interquartile range over the median: how noisy the timings were."""
        if len(times) < 4:
            return math.nan
        quartiles = statistics.quantiles(times, n=4)
        return (quartiles[2] - quartiles[0]) / statistics.median(times)

    @property
    def loss_share(self) -> float:
        return self.loss_ours_s / self.ours_median

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.update({"ours_median_s": self.ours_median, "lightly_median_s": self.lightly_median,
                     "ours_min_s": min(self.ours_s), "lightly_min_s": min(self.lightly_s) if self.lightly_s else None,
                     "ours_spread": self.spread(self.ours_s),
                     "lightly_spread": self.spread(self.lightly_s) if self.lightly_s else None,
                     "speed_ratio": self.speed_ratio, "paired_ratio": self.paired_ratio,
                     "best_ratio": self.best_ratio, "loss_share": self.loss_share})
        return data


def load_lightly() -> tuple[ModuleType | None, str | None, str]:
    """lightly's ``swav_loss`` module loaded by file (torch only), its version, or why not."""
    try:
        spec = importlib.util.find_spec("lightly")  # locates the package without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return None, None, f"lightly is not installed (install it with `{LIGHTLY_INSTALL}`)"
    path = Path(spec.origin).parent / "loss" / "swav_loss.py"
    if not path.is_file():
        return None, None, f"{path} not found: this lightly version has no loss/swav_loss.py"
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("lightly")
    except PackageNotFoundError:
        found = "unknown"
    module_spec = importlib.util.spec_from_file_location("bench_lightly_swav_loss", path)
    if module_spec is None or module_spec.loader is None:
        return None, found, f"cannot load {path}"
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, found, ""


class LightlyStep:
    """The same training step as ``Trainer.train_step`` with lightly's SwaVLoss in the middle."""

    def __init__(self, model: SwAVModel, config: PretrainConfig, loss: nn.Module, total_steps: int,
                 peak_lr: float) -> None:
        self.model = model
        self.config = config
        self.loss = loss
        self.optimizer = build_optimizer(model, config.optim, peak_lr)
        self.total_steps = total_steps
        self.peak_lr = peak_lr
        self.step = 0

    def __call__(self, batch: Batch) -> float:
        crops = batch[0]
        lr = learning_rate(self.step, self.total_steps, self.peak_lr, self.config.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.normalise_prototypes()
        output = self.model(crops, self.config.global_crops)
        split = self.config.global_crops
        loss = self.loss(output.scores[:split], output.scores[split:])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())


def _leaves(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [s.detach().clone().requires_grad_(True) for s in scores]


def _agreement(model: SwAVModel, crops: list[torch.Tensor], config: PretrainConfig, ours: SwAVLoss,
               lightly_loss: nn.Module, lightly: ModuleType) -> Agreement:
    """Both losses, codes and score gradients on one forward's scores (of a copy: BN stats move)."""
    probe = copy.deepcopy(model)
    probe.normalise_prototypes()
    with torch.no_grad():
        scores = probe(crops, config.global_crops).scores
    mine, theirs = _leaves(scores), _leaves(scores)
    loss_ours, _ = ours(mine)
    loss_ours.backward()
    split = config.global_crops
    loss_theirs = lightly_loss(theirs[:split], theirs[split:])
    loss_theirs.backward()
    swav = config.swav
    codes_diff = max(
        float((sinkhorn(scores[c], swav.epsilon, swav.sinkhorn_iterations)
               - lightly.sinkhorn(scores[c], iterations=swav.sinkhorn_iterations, epsilon=swav.epsilon)
               ).abs().max())
        for c in swav.assign_crops)
    grad_diff = max(float((a.grad - b.grad).abs().max()) for a, b in zip(mine, theirs, strict=True)
                    if a.grad is not None and b.grad is not None)
    grad_scale = max(float(a.grad.abs().max()) for a in mine if a.grad is not None)
    lo, lt = float(loss_ours.detach()), float(loss_theirs.detach())
    return Agreement(lo, lt, abs(lo - lt), abs(lo - lt) / abs(lo), codes_diff, grad_diff,
                     grad_diff / grad_scale if grad_scale else 0.0)


def _median_time(run: Callable[[], float], repeats: int) -> float:
    return statistics.median(run() for _ in range(repeats))


def _loss_timer(scores: Sequence[torch.Tensor], compute: Callable[[list[torch.Tensor]], torch.Tensor]
                ) -> Callable[[], float]:
    """Seconds of one loss forward + backward on fresh leaf copies of ``scores`` (copying not timed)."""
    def run() -> float:
        leaves = _leaves(scores)
        started = time.perf_counter()
        compute(leaves).backward()
        return time.perf_counter() - started
    return run


def _breakdown(trainer: Trainer, batch: Batch, steps: int) -> dict[str, float]:
    """Median seconds per phase of our step, replayed phase by phase on the trainer's own objects."""
    crops = batch[0]
    config = trainer.config
    phases: dict[str, list[float]] = {}
    for _ in range(steps):
        marks = [time.perf_counter()]
        for group in trainer.optimizer.param_groups:
            group["lr"] = learning_rate(trainer.step, trainer.total_steps, trainer.peak_lr, config.optim)
        trainer.model.normalise_prototypes()
        marks.append(time.perf_counter())
        output = trainer.ddp(crops, config.global_crops)
        marks.append(time.perf_counter())
        loss, codes = trainer.loss(output.scores)
        marks.append(time.perf_counter())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        trainer.optimizer.step()
        marks.append(time.perf_counter())
        cluster_usage(codes, config.model.prototypes)
        float(loss.detach())
        marks.append(time.perf_counter())
        names = ("lr + normalise prototypes", "forward (encoder + heads)", "Sinkhorn + loss forward",
                 "backward", "optimiser (LARS)", "cluster usage + sync")
        for name, start, end in zip(names, marks, marks[1:], strict=False):
            phases.setdefault(name, []).append(end - start)
    return {name: statistics.median(values) for name, values in phases.items()}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: Kineto prints start/stop lines there from C++."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profile(trainer: Trainer, batch: Batch, top: int = 10) -> list[dict[str, object]]:
    """The ops with the most self CPU time in one ``train_step`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 2), "calls": e.count,
             "share": round(e.self_cpu_time_total / total, 4)} for e in events[:top]]


def measure_step(shard_root: Path, settings: StepSettings, seed: int = 0,
                 progress: Callable[[str], None] = print) -> StepResult:
    """Part (b): interleaved timing of both steps, the loss-only timings, agreement, breakdown."""
    torch.set_num_threads(settings.threads)
    config = load_config(None, {**settings.overrides(), "run": {**settings.overrides()["run"], "seed": seed}})
    lightly, lightly_version, skipped = load_lightly()
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-step-") as out:
        runtime = Runtime(device=torch.device("cpu"), rank=0, world=1, local_rank=0)
        trainer = Trainer(shard_root, config, Path(out), runtime)
        batch: Batch = next(iter(trainer.stream))
        swav = config.swav
        hyper = {"temperature": swav.temperature, "epsilon": swav.epsilon,
                 "sinkhorn_iterations": swav.sinkhorn_iterations, "assign_crops": list(swav.assign_crops),
                 "optimiser": config.optim.name, "peak_lr": trainer.peak_lr}
        result = StepResult(settings={**asdict(settings), "views": config.views,
                                      "global_crops": config.global_crops, "torch_threads": torch.get_num_threads()},
                            hyperparameters=hyper, lightly_version=lightly_version,
                            lightly_skipped=skipped or None)
        theirs: LightlyStep | None = None
        lightly_loss: nn.Module | None = None
        if lightly is not None:
            lightly_loss = lightly.SwaVLoss(temperature=swav.temperature,
                                            sinkhorn_iterations=swav.sinkhorn_iterations,
                                            sinkhorn_epsilon=swav.epsilon)
            result.agreement = _agreement(trainer.model, batch[0], config, trainer.loss, lightly_loss, lightly)
            theirs = LightlyStep(copy.deepcopy(trainer.model), config, lightly_loss, trainer.total_steps,
                                 trainer.peak_lr)
        total = settings.warmup + settings.rounds
        for round_ in range(total):
            order: list[str] = ["ours", "lightly"] if round_ % 2 == 0 else ["lightly", "ours"]
            for variant in order:
                if variant == "lightly" and theirs is None:
                    continue
                started = time.perf_counter()
                if variant == "ours":
                    loss = trainer.train_step(batch)["loss"]
                else:
                    assert theirs is not None
                    loss = theirs(batch)
                elapsed = time.perf_counter() - started
                (result.losses_ours if variant == "ours" else result.losses_lightly).append(loss)
                if round_ >= settings.warmup:
                    (result.ours_s if variant == "ours" else result.lightly_s).append(elapsed)
            progress(f"  step round {round_ + 1}/{total}" + (" (warm-up)" if round_ < settings.warmup else "")
                     + f": ours {result.losses_ours[-1]:.4f}"
                     + (f", lightly {result.losses_lightly[-1]:.4f}" if result.losses_lightly else ""))
        if result.agreement is not None and result.losses_lightly:
            result.agreement.trajectory_max_abs_diff = max(
                abs(a - b) for a, b in zip(result.losses_ours, result.losses_lightly, strict=True))
        # Loss-only timings on one forward's scores: the share of Sinkhorn + loss in our step.
        with torch.no_grad():
            scores = [s.detach() for s in copy.deepcopy(trainer.model)(batch[0], config.global_crops).scores]
        result.loss_ours_s = _median_time(_loss_timer(scores, lambda s: trainer.loss(s)[0]), settings.loss_repeats)

        def codes_only() -> float:
            started = time.perf_counter()
            trainer.loss.codes(scores)
            return time.perf_counter() - started

        result.sinkhorn_ours_s = _median_time(codes_only, settings.loss_repeats)
        if lightly_loss is not None:
            split = config.global_crops
            loss_fn = lightly_loss
            result.loss_lightly_s = _median_time(
                _loss_timer(scores, lambda s: loss_fn(s[:split], s[split:])), settings.loss_repeats)
        result.breakdown_s = _breakdown(trainer, batch, settings.breakdown_steps)
        result.profile = _profile(trainer, batch)
    return result
