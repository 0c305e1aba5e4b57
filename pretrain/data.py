"""Streams prepared shards into multi-crop batches, split across DDP ranks and loader workers.

The epoch's order is a pure function of (seed, epoch): shards are permuted, then shuffled together
in groups of ``mix_shards`` (memory stays a few shards, whatever the archive's size). Sample ``k`` of
that order belongs to rank ``k % world``; a rank's batches are dealt round-robin to its loader
workers, which is the order the DataLoader collects them in. Each sample's views come from a
generator seeded by (seed, epoch, k). Hence resuming at step ``s`` of an epoch only needs to skip
``s`` batches by index arithmetic, and yields exactly the batches an uninterrupted run would see.
Every rank yields the same number of batches per epoch (the tail is dropped), so DDP never waits
on a rank that ran out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.augment import MultiCrop
from pretrain.shards import SampleRecord, ShardSet, decode_hu, decode_unit

Batch = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ShardStream(IterableDataset[Batch]):
    """Whole batches (views per crop, labels, label mask) of one rank for one epoch."""

    def __init__(
        self,
        root: Path,
        multicrop: MultiCrop,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        mix_shards: int = 4,
        labels: Sequence[str] = (),
    ) -> None:
        self.shards = ShardSet(root)
        self.multicrop = multicrop
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.mix_shards = mix_shards
        self.labels = list(labels)
        self.epoch = 0
        self.skip_batches = 0
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{root} holds {len(self.shards)} images: fewer than one batch of {batch_size} per rank "
                f"for {world} rank(s)"
            )

    @property
    def batches_per_epoch(self) -> int:
        return len(self.shards) // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (its order) and how many of this rank's batches were already consumed."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def order(self) -> Iterator[tuple[int, int]]:
        """(shard, index) pairs of the whole epoch, all ranks, in training order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        counts = [shard.count for shard in self.shards.manifest.shards]
        shard_order = rng.permutation(len(counts))
        for start in range(0, len(shard_order), self.mix_shards):
            group = shard_order[start:start + self.mix_shards]
            pairs = np.concatenate([np.stack([np.full(counts[s], s), np.arange(counts[s])], 1) for s in group])
            for shard, index in pairs[rng.permutation(len(pairs))]:
                yield int(shard), int(index)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        per_batch = self.batch_size * self.world
        wanted = self.batches_per_epoch * per_batch
        pixels: dict[int, np.ndarray] = {}
        records: dict[int, list[SampleRecord]] = {}
        batch: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = []
        for position, (shard, index) in enumerate(self.order()):
            if position >= wanted:
                break
            rank_batch = position // per_batch
            if position % self.world != self.rank or rank_batch < self.skip_batches:
                continue
            if (rank_batch - self.skip_batches) % workers != worker:
                continue
            if shard not in pixels:
                if len(pixels) >= self.mix_shards:  # the previous group is done with
                    pixels.clear()
                    records.clear()
                pixels[shard] = self.shards.pixels(shard)
                records[shard] = self.shards.records(shard)
            batch.append(self._sample(pixels[shard][index], records[shard][index], position))
            if len(batch) == self.batch_size:
                yield _collate(batch)
                batch = []

    def _sample(
        self, stored: np.ndarray, record: SampleRecord, position: int
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        decoded = decode_hu(stored) if record.encoding == "hu" else decode_unit(stored)
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, position))
        views = self.multicrop.views(torch.from_numpy(decoded), record.encoding, generator)
        target = torch.tensor([record.labels.get(name, 0.0) for name in self.labels], dtype=torch.float32)
        mask = torch.tensor([name in record.labels for name in self.labels], dtype=torch.float32)
        return views, target, mask


def _collate(samples: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]) -> Batch:
    views = [torch.stack([sample[0][v] for sample in samples]) for v in range(len(samples[0][0]))]
    return views, torch.stack([s[1] for s in samples]), torch.stack([s[2] for s in samples])
