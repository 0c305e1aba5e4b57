"""Part (a): how fast images reach the training loop, from prepared shards vs decoded on the fly.

Both ways end with the same thing, the image as float32 in its encoding's units (``decode_hu`` /
``decode_unit``), for the same images in the same (shuffled) order:

* on the fly: ``pretrain.decode.prepare_image(path, frame, size)`` per image - read the file,
  decode the transfer syntax, modality LUT, normalise, letterbox-resize - then decode to float:
  what a loader without shards would have to do for every sample of every epoch;
* shards: open the ``ShardSet`` (manifest, records per shard, as ``ShardStream`` does), index
  the memory-mapped shard and decode to float.

Each runs in a fresh spawned process with one torch thread (a DataLoader worker has one), so the
figures are per loader worker. The first pass of each way starts cold-ish: its files are evicted
from the page cache (``pagecache.evict``) and the resident share is recorded; later passes are
warm and alternate the order of the two ways. The stored pixels of both ways are compared, so the
figure is for the same images, not merely the same count.

Separately, ``measure_loader`` times what training really consumes: ``ShardStream`` batches with
the recipe's multi-crop views (default 2x224 + 6x96), per worker in-process and through a
``DataLoader`` with several workers.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.pretrain.pagecache import evict, resident_fraction
from pretrain.config import PretrainConfig

ON_THE_FLY = "on-the-fly"
SHARDS = "shards"


@dataclass(frozen=True)
class Item:
    """One image: where it sits in the shards and where it came from in the archive."""

    shard: int
    index: int
    path: str
    frame: int
    encoding: str
    syntax: str
    modality: str


@dataclass
class Pass:
    """One timed pass of one way over all items."""

    way: str
    cache: str  # "cold" (files evicted first) or "warm"
    seconds: float
    per_item: list[float]  # seconds per item, in ``items`` order
    resident_before: float | None  # page-cache share of the pass's files when it started

    @property
    def images_per_s(self) -> float:
        return len(self.per_item) / self.seconds

    def subset_rate(self, chosen: Sequence[int]) -> float:
        """Images per second over the items at ``chosen`` (sum of their own times)."""
        spent = sum(self.per_item[i] for i in chosen)
        return len(chosen) / spent if spent > 0 else math.nan

    def as_dict(self) -> dict[str, object]:
        return {"way": self.way, "cache": self.cache, "seconds": round(self.seconds, 4),
                "images": len(self.per_item), "images_per_s": round(self.images_per_s, 1),
                "resident_before": self.resident_before}


@dataclass
class SupplyResult:
    """All passes of part (a), and whether both ways gave the same stored pixels."""

    items: list[Item]
    passes: list[Pass]
    mismatched: int  # images whose shard pixels differ from a fresh prepare_image
    child_seconds: float = 0.0

    def rates(self, way: str, cache: str) -> list[float]:
        return [p.images_per_s for p in self.passes if p.way == way and p.cache == cache]

    def rate(self, way: str, cache: str) -> float:
        rates = self.rates(way, cache)
        return statistics.median(rates) if rates else math.nan

    def subset(self, way: str, cache: str, chosen: Sequence[int]) -> float:
        rates = [p.subset_rate(chosen) for p in self.passes if p.way == way and p.cache == cache]
        return statistics.median(rates) if rates else math.nan

    def indices(self, *, syntax: str | None = None, modality: str | None = None) -> list[int]:
        return [i for i, item in enumerate(self.items)
                if (syntax is None or item.syntax == syntax) and (modality is None or item.modality == modality)]


def _decode_float(stored: np.ndarray, encoding: str) -> np.ndarray:
    from pretrain.shards import decode_hu, decode_unit

    return decode_hu(stored) if encoding == "hu" else decode_unit(stored)


def _on_the_fly_pass(items: Sequence[Item], size: int, cache: str, keep: list[np.ndarray] | None) -> Pass:
    from pretrain.decode import prepare_image

    paths = sorted({item.path for item in items})
    if cache == "cold":
        evict(paths)
    resident = resident_fraction(paths)
    per_item: list[float] = []
    started = time.perf_counter()
    for item in items:
        t0 = time.perf_counter()
        stored, encoding = prepare_image(Path(item.path), item.frame, size)
        _decode_float(stored, encoding)
        per_item.append(time.perf_counter() - t0)
        if keep is not None:
            keep.append(stored)
    return Pass(ON_THE_FLY, cache, time.perf_counter() - started, per_item, resident)


def _shard_pass(items: Sequence[Item], root: Path, cache: str, keep: list[np.ndarray] | None) -> Pass:
    from pretrain.shards import ShardSet

    files = sorted(str(p) for p in root.glob("*.npy"))
    if cache == "cold":
        evict([*files, *(str(p) for p in root.glob("*.json"))])
    resident = resident_fraction(files)
    per_item: list[float] = []
    started = time.perf_counter()
    shards = ShardSet(root)
    pixels: dict[int, np.ndarray] = {}
    for item in items:
        t0 = time.perf_counter()
        if item.shard not in pixels:  # as ShardStream does: map the shard, parse its records
            pixels[item.shard] = shards.pixels(item.shard)
            shards.records(item.shard)
        stored = pixels[item.shard][item.index]
        _decode_float(stored, item.encoding)
        per_item.append(time.perf_counter() - t0)
        if keep is not None:
            keep.append(np.array(stored))
    seconds = time.perf_counter() - started
    pixels.clear()  # unmap, so the next cold pass can evict the pages
    return Pass(SHARDS, cache, seconds, per_item, resident)


def _supply_child(items: list[Item], root: str, size: int, warm_rounds: int) -> SupplyResult:
    """Runs in a fresh process: warm up the imports, then cold passes, then alternating warm passes."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    shard_root = Path(root)
    # Import every decoder plugin once (not part of any pass): one image of each syntax.
    warmup: dict[str, Item] = {}
    for item in items:
        warmup.setdefault(item.syntax, item)
    _on_the_fly_pass(list(warmup.values()), size, "warm", None)
    _shard_pass(items[:1], shard_root, "warm", None)
    fresh: list[np.ndarray] = []
    stored: list[np.ndarray] = []
    passes = [_on_the_fly_pass(items, size, "cold", fresh), _shard_pass(items, shard_root, "cold", stored)]
    for round_ in range(warm_rounds):
        if round_ % 2 == 0:
            passes += [_shard_pass(items, shard_root, "warm", None), _on_the_fly_pass(items, size, "warm", None)]
        else:
            passes += [_on_the_fly_pass(items, size, "warm", None), _shard_pass(items, shard_root, "warm", None)]
    mismatched = sum(not np.array_equal(a, b) for a, b in zip(fresh, stored, strict=True))
    return SupplyResult(items, passes, mismatched, time.perf_counter() - started)


def _spawned(workers: int = 1) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def measure_supply(items: list[Item], shard_root: Path, size: int, warm_rounds: int) -> SupplyResult:
    """Part (a)'s image-supply passes, run in a fresh spawned process."""
    with _spawned() as pool:
        return pool.submit(_supply_child, items, str(shard_root), size, warm_rounds).result()


@dataclass
class LoaderResult:
    """Multi-crop loader throughput (images per second) per worker and through a DataLoader."""

    batch_size: int
    crops: list[dict[str, object]]
    per_worker_images_per_s: float
    per_worker_batches: int
    dataloader_workers: int
    dataloader_images_per_s: float | None
    dataloader_batches: int
    per_batch_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()
                if k != "per_batch_s"} | {"per_batch_s": [round(s, 4) for s in self.per_batch_s]}


def _loader_child(root: str, config: PretrainConfig, batch_size: int, batches: int,
                  workers: int) -> LoaderResult:
    import torch
    from torch.utils.data import DataLoader

    from pretrain.augment import MultiCrop
    from pretrain.data import ShardStream

    torch.set_num_threads(1)
    multicrop = MultiCrop(config.crops, config.augment, config.model.encoder.in_channels)
    stream = ShardStream(Path(root), multicrop, batch_size, seed=config.run.seed, mix_shards=config.run.mix_shards)
    per_batch: list[float] = []
    epoch = 0
    warmed = False
    while len(per_batch) < batches:
        stream.set_epoch(epoch)
        iterator = iter(stream)
        while len(per_batch) < batches:
            t0 = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            if warmed:
                per_batch.append(time.perf_counter() - t0)
            warmed = True  # the first batch (allocations, first touches) is not timed
        epoch += 1
    per_worker = batch_size * len(per_batch) / sum(per_batch)
    loader_rate: float | None = None
    loader_batches = 0
    if workers > 0:
        # One epoch, as Trainer.batches loads it. Batch k comes from worker k % workers, so the
        # first ``workers`` batches carry each worker's start-up (fork, first touches): the rate
        # is taken from the arrival of the last of them to the end, the steady state of a long epoch.
        stream.set_epoch(0)
        loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2)
        arrivals = [time.perf_counter() for _ in loader]
        if len(arrivals) > workers:
            loader_batches = len(arrivals) - workers
            loader_rate = batch_size * loader_batches / (arrivals[-1] - arrivals[workers - 1])
    return LoaderResult(batch_size, [c.model_dump() for c in config.crops], per_worker, len(per_batch), workers,
                        loader_rate, loader_batches, per_batch)


def measure_loader(shard_root: Path, config: PretrainConfig, batch_size: int, batches: int,
                   workers: int) -> LoaderResult:
    """Multi-crop batches from the shards: one worker in-process, then ``workers`` DataLoader workers."""
    with _spawned() as pool:
        return pool.submit(_loader_child, str(shard_root), config, batch_size, batches, workers).result()


def workers_needed(gpu_images_per_s: float, seconds_per_image: float) -> int:
    """Loader workers (one core each) to keep one GPU fed at ``gpu_images_per_s``."""
    return max(1, math.ceil(gpu_images_per_s * seconds_per_image))
