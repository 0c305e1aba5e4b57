"""``pacsnode pretrain prepare``: indexed images to shards the data loader streams.

The index is streamed series by series. Volumes contribute every ``slice_stride``-th slice (the
sampled grid is centred in the volume; a volume of ``n`` slices gives ``ceil(n / stride)``):
single-frame CT, MR and PT series of more than one slice, and every multi-frame object (an
enhanced CT/MR, a cine, a tomosynthesis stack). Other images (radiographs above all) are all taken.

Frames are decoded by ``pretrain.decode.prepare_image`` in worker processes, a bounded number of
tasks in flight, and written in submission order, so two runs over the same index write
byte-identical shards whatever the number of workers. A frame that does not decode is skipped
and counted by reason in the manifest; so is a file whose decoder crashes its worker process (the
pool is restarted and the crashing file isolated). Nothing here is fatal but a broken index.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from pretrain.decode import DECODE_ERRORS, LARGE_FILE_BYTES, PixelDataError, prepare_image, read_dataset
from pretrain.index import ArchiveIndex, ImageRow
from pretrain.labels import LabelTable, load_labels
from pretrain.partition import Part
from pretrain.progress import rate_progress
from pretrain.shards import Encoding, SampleRecord, ShardManifest, ShardWriter

log = logging.getLogger(__name__)

# Single-frame series of these modalities are volumes (slices are sampled at the stride).
VOLUME_MODALITIES = frozenset({"CT", "MR", "PT"})
IMAGES_PER_TASK = 16
IN_FLIGHT_PER_WORKER = 3
DECODER_PACKAGES = ("pydicom", "python-gdcm", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls")

# A unit of work: one file and the frames wanted from it. A result per frame: pixels or a reason.
Unit = tuple[str, tuple[int, ...]]
FrameResult = tuple[np.ndarray, Encoding] | str


def sample_slices(count: int, stride: int) -> range:
    """Indices of every ``stride``-th of ``count`` slices, the grid centred: ``ceil(count / stride)``."""
    if stride < 1:
        raise ValueError(f"slice stride must be >= 1, got {stride}")
    offset = ((count - 1) % stride) // 2 if count else 0
    return range(offset, count, stride)


def select_frames(series: Sequence[ImageRow], stride: int) -> list[ImageRow]:
    """The frames of one series that go into the shards, in the series' order."""
    groups: dict[str, list[int]] = {}  # volume -> positions in ``series``
    chosen: set[int] = set()
    for position, row in enumerate(series):
        if row.number_of_frames > 1:
            groups.setdefault(row.path, []).append(position)
        elif row.modality in VOLUME_MODALITIES:
            groups.setdefault("", []).append(position)
        else:
            chosen.add(position)
    for positions in groups.values():
        chosen.update(positions[i] for i in sample_slices(len(positions), stride))
    return [row for position, row in enumerate(series) if position in chosen]


def _units(rows: list[ImageRow]) -> list[Unit]:
    """Group a series' chosen frames per file, so a multi-frame file is read once per task."""
    frames: dict[str, list[int]] = {}
    for row in rows:
        frames.setdefault(row.path, []).append(row.frame)
    return [(path, tuple(wanted)) for path, wanted in frames.items()]


def _prepare_unit(unit: Unit, size: int) -> list[FrameResult]:
    path, frames = unit
    try:
        # A file is read once for all its frames, unless it is too large to hold: then per frame.
        source = Path(path) if os.path.getsize(path) > LARGE_FILE_BYTES else read_dataset(Path(path))
    except FileNotFoundError:
        return ["missing-file"] * len(frames)
    except PixelDataError as exc:
        return [exc.reason] * len(frames)
    results: list[FrameResult] = []
    for frame in frames:
        try:
            results.append(prepare_image(source, frame, size))
        except PixelDataError as exc:
            results.append(exc.reason)
        except DECODE_ERRORS as exc:  # a decoder's own error type that ``decode`` did not foresee
            results.append(f"error:{type(exc).__name__}")
    return results


def _prepare_task(task: list[Unit], size: int) -> list[list[FrameResult]]:
    """Worker task: a few files' frames, with pydicom's warnings about odd headers muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [_prepare_unit(unit, size) for unit in task]


def _init_worker() -> None:
    """One torch thread per worker process: the processes are the parallelism."""
    import torch

    torch.set_num_threads(1)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # a failing plugin is retried, not news


@dataclass(frozen=True)
class _Task:
    units: list[Unit]
    rows: list[list[ImageRow]]  # per unit, the index rows of its frames (for the records)


def _tasks(index: ArchiveIndex, stride: int, modalities: frozenset[str] | None, part: Part | None) -> Iterator[_Task]:
    units: list[Unit] = []
    rows: list[list[ImageRow]] = []
    images = 0
    for series in index.iter_series():
        if modalities is not None and series[0].modality not in modalities:
            continue
        if part is not None and not part.owns(series[0].study_uid):
            continue
        chosen = select_frames(series, stride)
        by_path: dict[str, list[ImageRow]] = {}
        for row in chosen:
            by_path.setdefault(row.path, []).append(row)
        for unit in _units(chosen):
            units.append(unit)
            rows.append(by_path[unit[0]])
            images += len(unit[1])
            if images >= IMAGES_PER_TASK:
                yield _Task(units, rows)
                units, rows, images = [], [], 0
    if units:
        yield _Task(units, rows)


class _Runner:
    """Runs tasks in a process pool, bounded, results in submission order; survives a crashing decoder."""

    def __init__(self, workers: int, size: int) -> None:
        self.workers = workers
        self.size = size
        self.pool: ProcessPoolExecutor | None = None
        self.crashes = 0

    def _new_pool(self) -> ProcessPoolExecutor:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
        )
        return self.pool

    def _submit(self, task: _Task) -> Future[list[list[FrameResult]]]:
        pool = self.pool or self._new_pool()
        return pool.submit(_prepare_task, task.units, self.size)

    def run(self, tasks: Iterator[_Task]) -> Iterator[tuple[_Task, list[list[FrameResult]]]]:
        if self.workers <= 1:
            for task in tasks:
                yield task, _prepare_task(task.units, self.size)
            return
        self._new_pool()
        pending: deque[tuple[_Task, Future[list[list[FrameResult]]]]] = deque()
        limit = self.workers * IN_FLIGHT_PER_WORKER
        try:
            for task in tasks:
                pending.append((task, self._submit(task)))
                while len(pending) >= limit:
                    yield self._next(pending)
            while pending:
                yield self._next(pending)
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)

    def _next(
        self, pending: deque[tuple[_Task, Future[list[list[FrameResult]]]]]
    ) -> tuple[_Task, list[list[FrameResult]]]:
        task, future = pending.popleft()
        try:
            return task, future.result()
        except BrokenProcessPool:
            pass
        # A worker died (a decoder crashed on some file): run this task file by file in fresh
        # pools to find the culprit, then resubmit what was in flight.
        results: list[list[FrameResult]] = []
        for unit in task.units:
            pool = self._new_pool()
            try:
                results.append(pool.submit(_prepare_task, [unit], self.size).result()[0])
            except BrokenProcessPool:
                self.crashes += 1
                results.append(["decoder-crash"] * len(unit[1]))
        self._new_pool()
        for position, (other, _) in enumerate(pending):
            pending[position] = (other, self._submit(other))
        return task, results


def _decoder_versions() -> dict[str, str]:
    versions = {}
    for package in DECODER_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def prepare_shards(
    index: Path,
    out: Path,
    *,
    size: int = 256,
    slice_stride: int = 4,
    shard_size: int = 1024,
    labels: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    modalities: Sequence[str] | None = None,
    part: Part | None = None,
) -> ShardManifest:
    """Decode the images of ``index`` into shards under ``out``; returns the manifest written.

    ``labels``: optional CSV keyed by study or SOP instance UID (see ``pretrain.labels``).
    ``modalities``: keep only series of these modalities (default: all). ``workers`` decoding
    processes (default: one per CPU; 1 decodes in this process). ``part``: only the studies of this
    partition (``pretrain.partition``), for preparing on several hosts at once.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if slice_stride < 1:
        raise ValueError(f"slice_stride must be >= 1, got {slice_stride}")
    table: LabelTable | None = load_labels(labels) if labels is not None else None
    wanted = frozenset(m.strip().upper() for m in modalities) if modalities else None
    workers = default_workers() if workers is None else max(1, workers)
    settings: dict[str, object] = {
        "size": size,
        "slice_stride": slice_stride,
        "shard_size": shard_size,
        "volume_modalities": sorted(VOLUME_MODALITIES),
        "modalities": sorted(wanted) if wanted else None,
        "index": str(index),
        "labels": str(labels) if labels is not None else None,
        "label_key": table.key if table else None,
        "label_columns": list(table.columns) if table else [],
        "decoders": _decoder_versions(),
        "part": str(part) if part is not None else None,
    }
    started = time.monotonic()
    writer = ShardWriter(out, size=size, shard_size=shard_size, settings=settings)
    runner = _Runner(workers, size)
    written = skipped = 0
    with ArchiveIndex(index) as archive, rate_progress("images", progress) as bar:
        bar_task = bar.add_task("preparing", total=None, note="") if bar is not None else None
        for task, results in runner.run(_tasks(archive, slice_stride, wanted, part)):
            for rows, frames in zip(task.rows, results, strict=True):
                for row, result in zip(rows, frames, strict=True):
                    if isinstance(result, str):
                        writer.skip(result)
                        skipped += 1
                        continue
                    pixels, encoding = result
                    record = SampleRecord(
                        sop_uid=row.sop_uid,
                        study_uid=row.study_uid,
                        series_uid=row.series_uid,
                        frame=row.frame,
                        modality=row.modality,
                        body_part=row.body_part,
                        encoding=encoding,
                        labels=table.lookup(sop_uid=row.sop_uid, study_uid=row.study_uid) if table else {},
                    )
                    writer.add(pixels, record)
                    written += 1
            if bar is not None and bar_task is not None:
                bar.update(bar_task, completed=written + skipped, note=f"skipped {skipped:,}")
    manifest = writer.close()
    seconds = time.monotonic() - started
    log.info(
        "prepare: %d images in %d shards, skipped %s, %.1f images/s",
        manifest.total,
        len(manifest.shards),
        manifest.skipped,
        (written + skipped) / seconds if seconds > 0 else math.inf,
    )
    return manifest
