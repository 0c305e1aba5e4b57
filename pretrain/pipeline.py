"""Archive folders to an exported encoder in one call: index, prepare, SwAV, export.

What ``pacsnode pretrain index|prepare|train|export`` do step by step, for callers that want the
whole chain on one host (the paper experiment, the demo). Each stage is resumable: the index is
incremental, shards are kept once their manifest exists, training resumes from its checkpoint
and a finished export is reused.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from pretrain import runtime as rt
from pretrain.config import PretrainConfig
from pretrain.export import EncoderCard, export_encoder, read_card
from pretrain.index import build_index
from pretrain.prepare import prepare_shards
from pretrain.shards import MANIFEST_NAME, ShardSet
from pretrain.train import train

ENCODER = "encoder"


@dataclass(frozen=True)
class PretrainOutcome:
    encoder_dir: Path
    card: EncoderCard
    images: int
    losses: list[float]  # of this call's steps (empty when the export was reused)


def shard_archive(archives: list[Path], work: Path, *, size: int, slice_stride: int = 1, shard_size: int = 512,
                  workers: int | None = None, progress: bool = True) -> Path:
    """Index the archives and write shards under ``work`` (kept once complete); returns the shard folder."""
    index = work / "index.sqlite"
    build_index(archives, index, workers=workers, progress=progress)
    shards = work / "shards"
    if not (shards / MANIFEST_NAME).is_file():
        shutil.rmtree(shards, ignore_errors=True)
        prepare_shards(index, shards, size=size, slice_stride=slice_stride, shard_size=shard_size, workers=workers,
                       progress=progress)
    return shards


def train_and_export(shards: Path, work: Path, config: PretrainConfig, *, progress: bool = True,
                     console: Console | None = None) -> PretrainOutcome:
    """SwAV on one host (resuming ``work/run``), then export to ``work/encoder`` (reused when present)."""
    encoder_dir = work / ENCODER
    images = len(ShardSet(shards))
    if (encoder_dir / "encoder.yaml").is_file():
        return PretrainOutcome(encoder_dir, read_card(encoder_dir), images, [])
    runtime = rt.Runtime(device=rt.pick_device(config.run.device), rank=0, world=1, local_rank=0)
    result = train(shards, config, work / "run", runtime, resume=True, progress=progress, console=console)
    export_encoder(work / "run", encoder_dir)
    return PretrainOutcome(encoder_dir, read_card(encoder_dir), images, list(result.losses))
