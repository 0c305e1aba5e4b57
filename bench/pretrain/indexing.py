"""Part (c), and the shards the other parts read: index the archive, then prepare shards from the index.

The index is timed twice with the default workers: a fresh index file (every header read) and a
second run over the unchanged archive (the incremental path: the walk plus one size/mtime lookup
per file). Before the fresh run the archive's files are evicted from the page cache, as a new
archive on disk would be. ``prepare_shards`` is timed too, for information (no target): it is the
one-off cost the shards trade against decoding every epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.pretrain.archive import Archive
from bench.pretrain.pagecache import evict, resident_fraction
from bench.pretrain.supply import Item
from pretrain.index import ArchiveIndex, IndexSummary, build_index, default_workers
from pretrain.prepare import prepare_shards
from pretrain.shards import ShardManifest, ShardSet


@dataclass(frozen=True)
class IndexRun:
    """One ``build_index`` run and the page-cache state it started from."""

    kind: str  # "fresh" or "incremental"
    summary: IndexSummary
    resident_before: float | None

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "resident_before": self.resident_before, **self.summary.as_dict()}


def index_archive(archive: Archive, index_path: Path, workers: int | None = None) -> list[IndexRun]:
    """A fresh index of ``archive`` at ``index_path``, then an incremental re-run; both timed."""
    index_path.unlink(missing_ok=True)
    files = [p for p in archive.root.rglob("*") if p.is_file()]
    evict(files)
    runs: list[IndexRun] = []
    for kind in ("fresh", "incremental"):
        resident = resident_fraction(files)
        runs.append(IndexRun(kind, build_index([archive.root], index_path, workers=workers, progress=False),
                             resident))
    return runs


def index_workers(workers: int | None) -> int:
    return default_workers() if workers is None else max(1, workers)


@dataclass(frozen=True)
class Prepared:
    manifest: ShardManifest
    seconds: float
    workers: int | None

    @property
    def images_per_s(self) -> float:
        return self.manifest.total / self.seconds if self.seconds > 0 else 0.0


def prepare(index_path: Path, out: Path, size: int, shard_size: int, workers: int | None = None) -> Prepared:
    """Every indexed image (slice stride 1: the supply figures compare all of them) into shards."""
    started = time.perf_counter()
    manifest = prepare_shards(index_path, out, size=size, slice_stride=1, shard_size=shard_size,
                              workers=workers, progress=False)
    return Prepared(manifest, time.perf_counter() - started, workers)


def supply_items(shard_root: Path, index_path: Path, archive: Archive, seed: int) -> list[Item]:
    """The shards' images with the archive file and frame each came from, in a seeded shuffled order.

    Shuffled because training reads in a shuffled order (``ShardStream``); the same order serves
    both ways of part (a).
    """
    source: dict[tuple[str, int], str] = {}
    with ArchiveIndex(index_path) as index:
        for series in index.iter_series():
            for row in series:
                source[(row.sop_uid, row.frame)] = row.path
    shards = ShardSet(shard_root)
    items: list[Item] = []
    for shard in range(len(shards.manifest.shards)):
        for position, record in enumerate(shards.records(shard)):
            path = source[(record.sop_uid, record.frame)]
            items.append(Item(shard=shard, index=position, path=path, frame=record.frame,
                              encoding=record.encoding, syntax=archive.syntax.get(path, "unknown"),
                              modality=record.modality))
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]
