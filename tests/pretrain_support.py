"""Small shard sets and CPU-sized recipes for the pretraining tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pretrain.config import merge_overrides
from pretrain.shards import SampleRecord, ShardWriter, encode_hu, encode_unit


def blob_shards(out: Path, images: int = 48, size: int = 64, shard_size: int = 16) -> Path:
    """Discs of random place, radius and brightness; every third image a CT-like one in HU."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(out, size=size, shard_size=shard_size)
    yy, xx = np.mgrid[:size, :size]
    for i in range(images):
        centre = rng.integers(size // 4, 3 * size // 4, 2)
        disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < rng.integers(size // 12, size // 4) ** 2
        ct = i % 3 == 0
        if ct:
            pixels = encode_hu(np.where(disc, rng.uniform(20, 80), -1000.0))
        else:
            pixels = encode_unit(np.where(disc, rng.uniform(0.3, 1.0), 0.05))
        writer.add(pixels, SampleRecord(
            sop_uid=f"1.2.3.{i}", study_uid=f"1.2.{i // 3}", series_uid=f"1.2.{i // 3}.1",
            modality="CT" if ct else "DX", encoding="hu" if ct else "unit",
            labels={"disc_right": float(centre[1] > size // 2)},
        ))
    writer.close()
    return out


def tiny_recipe(**overrides: Any) -> dict[str, Any]:
    """A recipe a 2-core CPU trains in seconds: ResNet-18, 48/24 px crops, 20 prototypes."""
    base: dict[str, Any] = {
        "model": {"encoder": {"arch": "resnet18", "in_channels": 1}, "hidden_dim": 64, "out_dim": 16,
                  "prototypes": 20},
        "crops": [{"size": 48, "count": 2, "scale": [0.3, 1.0]}, {"size": 24, "count": 2, "scale": [0.1, 0.3]}],
        "swav": {"freeze_prototypes_steps": 2},
        "optim": {"name": "adamw", "lr": 0.05, "warmup_steps": 2, "final_lr": 0.0, "weight_decay": 1e-4},
        "run": {"batch_size": 8, "epochs": 3, "loader_workers": 0, "checkpoint_every": 100, "log_every": 1,
                "amp": "none", "device": "cpu"},
    }
    return merge_overrides(base, overrides)


def write_recipe(path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_recipe(**overrides)))
    return path
