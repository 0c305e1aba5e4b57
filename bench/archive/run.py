"""``pretrain index`` and ``prepare`` at 10^6 frames, against the same pipeline at 10^5 (the baseline).

Each scale runs the real commands as child processes (``pacsnode pretrain index`` twice: a fresh
index with the archive evicted from the page cache, then an incremental run that finds nothing
new; then ``pacsnode pretrain prepare`` at slice stride 1, so every frame is decoded and written).
Figures per scale: frames/s of each step, index bytes per frame, the time of the incremental run,
and peak RSS (the step's own process, and its whole tree with the worker processes). The ratios
full/baseline say what a tenfold archive changes: a flat RSS stays near 1.0, a linear pipeline
keeps its frames/s near 1.0.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.archive.measure import StepRun, run_step
from bench.archive.phantoms import ArchiveSpec, build
from bench.pretrain.pagecache import evict
from bench.results import RESULTS_DIR, write_results

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "archive-scale"
SHARD_SIZE = 4096


def _pacsnode(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "node.cli", *args]


def _files(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(folder) for name in names]


def _index_bytes(index: Path) -> int:
    return sum(p.stat().st_size for p in index.parent.glob(index.name + "*"))


def _frames(index: Path) -> int:
    with sqlite3.connect(index) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM images").fetchone()
    return int(count)


def _step(run: StepRun, frames: int) -> dict[str, float]:
    return {"seconds": round(run.seconds, 2), "frames_per_s": round(frames / run.seconds, 1),
            "peak_rss_main_mb": round(run.peak_rss_main_mb, 1), "peak_rss_tree_mb": round(run.peak_rss_tree_mb, 1)}


def measure_scale(spec: ArchiveSpec, workers: int, keep: bool) -> dict[str, object]:
    """Build (or reuse) the archive of ``spec`` and time index, incremental index and prepare on it."""
    started = time.perf_counter()
    archive = build(CACHE / "archives", spec)
    built_s = time.perf_counter() - started
    work = CACHE / f"run-{spec.total_frames}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    index, shards = work / "index.sqlite", work / "shards"
    files = _files(archive)
    evict(files)
    index_cmd = _pacsnode("pretrain", "index", "--archive", str(archive), "--out", str(index), "--workers",
                          str(workers))
    fresh = run_step(index_cmd, work / "index.log")
    frames = _frames(index)
    if frames != spec.total_frames:
        raise RuntimeError(f"index holds {frames} frames, the archive {spec.total_frames}")
    incremental = run_step(index_cmd, work / "index-again.log")
    prepared = run_step(_pacsnode("pretrain", "prepare", "--index", str(index), "--out", str(shards), "--size", "32",
                                  "--slice-stride", "1", "--shard-size", str(SHARD_SIZE), "--workers", str(workers)),
                        work / "prepare.log")
    result = {
        "spec": asdict(spec), "frames": frames, "files": len(files) - 1,  # less the marker
        "archive_bytes": sum(p.stat().st_size for p in files), "archive_built_s": round(built_s, 1),
        "index": _step(fresh, frames), "index_bytes_per_frame": round(_index_bytes(index) / frames, 1),
        "incremental_index": {**_step(incremental, frames), "frames_per_s": None},
        "prepare": _step(prepared, frames),
        "shard_bytes": sum(p.stat().st_size for p in shards.iterdir()),
    }
    if not keep:
        shutil.rmtree(work)
    return result


def _ratio(full: float, base: float) -> float:
    return round(full / base, 3) if base else float("nan")


def ratios(full: dict[str, object], base: dict[str, object]) -> dict[str, float]:
    def value(result: dict[str, object], step: str, key: str) -> float:
        section = result[step]
        assert isinstance(section, dict)
        return float(section[key])

    return {
        "index_frames_per_s": _ratio(value(full, "index", "frames_per_s"), value(base, "index", "frames_per_s")),
        "prepare_frames_per_s": _ratio(value(full, "prepare", "frames_per_s"), value(base, "prepare", "frames_per_s")),
        "index_peak_rss_tree": _ratio(value(full, "index", "peak_rss_tree_mb"), value(base, "index", "peak_rss_tree_mb")),
        "prepare_peak_rss_tree": _ratio(value(full, "prepare", "peak_rss_tree_mb"),
                                        value(base, "prepare", "peak_rss_tree_mb")),
        "incremental_seconds": _ratio(value(full, "incremental_index", "seconds"),
                                      value(base, "incremental_index", "seconds")),
    }


def print_report(results: dict[str, dict[str, object]], ratio: dict[str, float]) -> None:
    print(f"{'scale':>10} {'step':>12} {'seconds':>9} {'frames/s':>10} {'RSS main':>9} {'RSS tree':>9}")
    for name, result in results.items():
        for step in ("index", "incremental_index", "prepare"):
            section = result[step]
            assert isinstance(section, dict)
            rate = section["frames_per_s"]
            print(f"{result['frames']:>10,} {step.replace('_index', ''):>12} {section['seconds']:>9.1f} "
                  f"{'-' if rate is None else f'{rate:,.0f}':>10} {section['peak_rss_main_mb']:>8.0f}M "
                  f"{section['peak_rss_tree_mb']:>8.0f}M")
        print(f"{result['frames']:>10,} index bytes/frame {result['index_bytes_per_frame']}  ({name})")
    print("full / baseline: " + ", ".join(f"{key} {value}" for key, value in ratio.items()))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames of the full scale")
    parser.add_argument("--baseline-frames", type=int, default=100_000, help="frames of the baseline scale")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="index/prepare worker processes")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20,000 vs 5,000 frames, no JSON written")
    parser.add_argument("--keep", action="store_true", help="keep the index and shards in bench/.cache")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder for the JSON results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    full, base = (20_000, 5_000) if args.quick else (args.frames, args.baseline_frames)
    results = {}
    for name, frames in (("baseline", base), ("full", full)):
        spec = ArchiveSpec(frames=frames)
        print(f"{name}: {spec.total_frames:,} frames ({spec.volume_files} enhanced CT files of "
              f"{spec.frames_per_file} frames, {spec.single_files:,} radiographs)", flush=True)
        results[name] = measure_scale(spec, args.workers, args.keep)
    ratio = ratios(results["full"], results["baseline"])
    print_report(results, ratio)
    payload: dict[str, object] = {
        "benchmark": "archive-scale", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "workers": args.workers, "results": results, "full_over_baseline": ratio,
    }
    if args.quick or args.no_write:
        print("(results not written)")
    else:
        print(f"results: {write_results('archive-scale', payload, args.results)}")
    return 0
