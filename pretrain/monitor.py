"""Rank 0's record of a run: a CSV of training metrics, optional TensorBoard, and collapse warnings.

SwAV collapses in two recognisable ways: the loss stays near ``ln K`` (the codes are uniform and
predict nothing), or a handful of prototypes take every sample (cluster-usage perplexity of a few).
Both are cheap to watch and expensive to find out about after a week of GPU time.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIELDS = ["step", "epoch", "lr", "loss", "swav_loss", "supervised_loss", "images_per_s",
          "cluster_entropy", "cluster_perplexity"]


@dataclass
class CollapseWatch:
    """Warns (once per kind) when the loss sits near ln K or cluster usage shrinks to a few prototypes.

    ``patience`` consecutive logged steps after ``start_step`` must show the symptom, so the first
    noisy steps and the frozen-prototype phase do not raise false alarms.
    """

    prototypes: int
    start_step: int
    patience: int = 5
    min_perplexity: float = 3.0
    warned: set[str] = field(default_factory=set)
    _streak: dict[str, int] = field(default_factory=dict)

    def check(self, step: int, loss: float, perplexity: float) -> list[str]:
        if step < self.start_step:
            return []
        symptoms = {
            "loss": abs(loss - math.log(self.prototypes)) < 0.03 * math.log(self.prototypes),
            "usage": perplexity < self.min_perplexity,
        }
        messages = []
        for kind, present in symptoms.items():
            self._streak[kind] = self._streak.get(kind, 0) + 1 if present else 0
            if self._streak[kind] >= self.patience and kind not in self.warned:
                self.warned.add(kind)
                messages.append(
                    f"possible collapse at step {step}: loss {loss:.3f} stays near ln K = "
                    f"{math.log(self.prototypes):.3f}" if kind == "loss" else
                    f"possible collapse at step {step}: only ~{perplexity:.1f} of {self.prototypes} "
                    "prototypes take the samples"
                )
        if messages:
            messages.append("remedies: lower swav.epsilon, freeze prototypes longer, start the queue later "
                            "or make it shorter")
        return messages


class MetricsLog:
    """Appends rows to ``log.csv`` (kept across resumes) and mirrors them to TensorBoard if asked."""

    def __init__(self, out: Path, tensorboard: bool, warn: Callable[[str], None]) -> None:
        self.path = out / "log.csv"
        new = not self.path.exists()
        self._file = self.path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=FIELDS)
        if new:
            self._csv.writeheader()
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warn("run.tensorboard is set but the tensorboard package is not installed; logging CSV only")
            else:
                self._tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict[str, float]) -> None:
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self._tb.add_scalar(key, value, int(row["step"]))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
