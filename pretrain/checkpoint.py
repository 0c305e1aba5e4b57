"""Training checkpoints that resume exactly: model, optimiser, AMP scaler, queue, RNG and step.

Rank 0 writes the shared state; every rank writes its own queue (SwAV's queue is per rank). Files
are written to a temporary name and moved into place, so a run killed mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def queue_path(out: Path, rank: int) -> Path:
    return out / f"queue-rank{rank}.pt"


def _save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: Path, state: dict[str, Any], queue: dict[str, torch.Tensor] | None, rank: int) -> Path:
    """Write this rank's part of a checkpoint; the caller synchronises ranks afterwards."""
    out.mkdir(parents=True, exist_ok=True)
    if queue is not None:
        _save({"queue": queue, "rng": rng_state()}, queue_path(out, rank))
    if rank == 0:
        _save({**state, "rng": rng_state()}, out / CHECKPOINT)
    return out / CHECKPOINT


def load(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save` (our own files: full unpickling is required for RNG state)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)
