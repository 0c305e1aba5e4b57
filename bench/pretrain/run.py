"""Orchestration of the pretraining benchmark: archive, index (c), shards, supply (a), step (b), report."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.pretrain.archive import SYNTAXES, UNCOMPRESSED, ArchiveSpec, prepare_archive
from bench.pretrain.indexing import IndexRun, Prepared, index_archive, index_workers, prepare, supply_items
from bench.pretrain.load import Load, LoadMonitor
from bench.pretrain.step import StepResult, StepSettings, measure_step
from bench.pretrain.supply import (
    ON_THE_FLY,
    SHARDS,
    LoaderResult,
    SupplyResult,
    measure_loader,
    measure_supply,
    workers_needed,
)
from bench.results import RESULTS_DIR, write_results

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / "bench" / ".cache"

PARTS = ("a", "b", "c")
# Targets of the issue.
MIN_SUPPLY_RATIO = 10.0
MIN_STEP_RATIO = 1.0
MAX_LOSS_REL_DIFF = 1e-5  # ours vs lightly on the same scores: float32 rounding, nothing more
# What one GPU consumes, to turn loader images/s into workers per GPU. Not measured here (no GPU):
# an estimate for an H100-class card on the shipped recipe (ResNet-50, 2x224 + 6x96, bf16), i.e.
# ~3,000 plain 224px ResNet-50 training images/s over the ~3.1x compute of one multi-crop sample.
DEFAULT_GPU_IMAGES_PER_S = 1000.0


@dataclass(frozen=True)
class Row:
    """One line of the printed table (and of the JSON's ``table``)."""

    part: str
    figure: str
    value: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    remark: str = ""  # printed after the verdict


def _rate(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _share(value: float | None) -> str:
    """A page-cache residency share, as the report prints it."""
    return "unknown" if value is None else f"{100 * value:.0f} % resident"


def _verdict(passed: bool | None) -> str:
    return "" if passed is None else ("PASS" if passed else "MISS")


def _at_least(value: float | None, floor: float) -> bool | None:
    return None if value is None or math.isnan(value) else value >= floor


def format_table(rows: Sequence[Row]) -> str:
    widths = (6, 50, 16, 24, 9, 9)
    head = ("part", "figure", "value", "baseline", "ratio", "target")
    lines = ["".join(f"{h:<{w}}" for h, w in zip(head, widths, strict=True)) + "verdict"]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x" if row.ratio < 100 else f"{row.ratio:,.0f}x"
        cells = (row.part, row.figure, row.value, row.baseline, ratio, row.target)
        verdict = " ".join(v for v in (_verdict(row.passed), row.remark) if v)
        lines.append("".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)) + verdict)
    return "\n".join(lines)


def supply_rows(supply: SupplyResult) -> tuple[list[Row], dict[str, object]]:
    """Part (a)'s image-supply rows and figures: shards vs on the fly, cold and warm, uncompressed."""
    rows: list[Row] = []
    figures: dict[str, object] = {}
    for cache in ("cold", "warm"):
        shards, fly = supply.rate(SHARDS, cache), supply.rate(ON_THE_FLY, cache)
        ratio = shards / fly
        figures[cache] = {"shards_images_per_s": shards, "on_the_fly_images_per_s": fly, "ratio": ratio}
        rows.append(Row("(a)", f"image supply, {cache}: shards vs DICOM on the fly",
                        f"{_rate(shards)} img/s", f"{_rate(fly)} img/s", ratio, f">= {MIN_SUPPLY_RATIO:.0f}x",
                        _at_least(ratio, MIN_SUPPLY_RATIO)))
    chosen = supply.indices(syntax=UNCOMPRESSED)
    if chosen:
        shards, fly = supply.subset(SHARDS, "cold", chosen), supply.subset(ON_THE_FLY, "cold", chosen)
        figures["uncompressed_cold"] = {"images": len(chosen), "shards_images_per_s": shards,
                                        "on_the_fly_images_per_s": fly, "ratio": shards / fly}
        rows.append(Row("(a)", f"  uncompressed only ({len(chosen)} images), cold", f"{_rate(shards)} img/s",
                        f"{_rate(fly)} img/s", shards / fly, f">= {MIN_SUPPLY_RATIO:.0f}x",
                        _at_least(shards / fly, MIN_SUPPLY_RATIO)))
    rows.append(Row("(a)", "  same stored pixels both ways", f"{len(supply.items) - supply.mismatched}"
                    f"/{len(supply.items)}", passed=supply.mismatched == 0))
    by: dict[str, dict[str, object]] = {}
    for kind, values in (("syntax", sorted({i.syntax for i in supply.items})),
                         ("modality", sorted({i.modality for i in supply.items}))):
        for value in values:
            chosen = supply.indices(**{kind: value})
            warm = supply.subset(ON_THE_FLY, "warm", chosen)
            by.setdefault(kind, {})[value] = {
                "images": len(chosen),
                "on_the_fly_cold_images_per_s": supply.subset(ON_THE_FLY, "cold", chosen),
                "on_the_fly_warm_images_per_s": warm,
                "on_the_fly_warm_ms_per_image": 1000 / warm if warm else None,
                "shards_warm_images_per_s": supply.subset(SHARDS, "warm", chosen),
            }
    figures["on_the_fly_by"] = by
    figures["passes"] = [p.as_dict() for p in supply.passes]
    figures["mismatched_images"] = supply.mismatched
    return rows, figures


def loader_rows(loader: LoaderResult, supply: SupplyResult | None, gpu_rate: float, gpu_assumed: bool,
                configured_workers: int) -> tuple[list[Row], dict[str, object]]:
    """Multi-crop loader throughput and the loader workers per GPU it implies (shards vs on the fly)."""
    crops = "+".join(f"{c['count']}x{c['size']}" for c in loader.crops)
    rows = [Row("(a)", f"loader, multi-crop {crops}, 1 worker (shards)",
                f"{_rate(loader.per_worker_images_per_s)} img/s")]
    if loader.dataloader_images_per_s is not None:
        rows.append(Row("(a)", f"  DataLoader, {loader.dataloader_workers} workers",
                        f"{_rate(loader.dataloader_images_per_s)} img/s"))
    per_image = 1 / loader.per_worker_images_per_s
    shards_workers = workers_needed(gpu_rate, per_image)
    figures: dict[str, object] = {"gpu_images_per_s": gpu_rate, "gpu_rate_assumed": gpu_assumed,
                                  "workers_per_gpu_shards": shards_workers,
                                  "configured_loader_workers": configured_workers}
    baseline = ""
    if supply is not None:
        fly = supply.rate(ON_THE_FLY, "warm")
        fly_workers = workers_needed(gpu_rate, per_image + 1 / fly)
        figures["workers_per_gpu_on_the_fly"] = fly_workers
        baseline = f"{fly_workers} on the fly"
    label = "assumed" if gpu_assumed else "given"
    rows.append(Row("(a)", f"  workers per GPU at {gpu_rate:,.0f} img/s ({label})", f"{shards_workers} (shards)",
                    baseline, target=f"cfg {configured_workers}"))
    return rows, figures


def step_rows(step: StepResult) -> list[Row]:
    s = step.settings
    crops = "+".join(f"{count}x{size}" for size, count in s["crops"])  # type: ignore[attr-defined]
    rows = [Row("(b)", f"SwAV step {s['arch']} b{s['batch_size']} {crops} {s['prototypes']}p, median",
                f"{step.ours_median:.3f} s",
                "-" if step.lightly_median is None else f"{step.lightly_median:.3f} s lightly",
                step.speed_ratio, f">= {MIN_STEP_RATIO:.1f}x", _at_least(step.speed_ratio, MIN_STEP_RATIO),
                "(within noise)" if step_within_noise(step) else "comparison skipped" if step.lightly_skipped else "")]
    if step.lightly_s:
        spreads = [step.spread(step.ours_s), step.spread(step.lightly_s)]
        spread = "spread " + " / ".join("-" if math.isnan(v) else f"{100 * v:.0f}%" for v in spreads)
        rows.append(Row("(b)", "  same-round pairs, median of ratios", spread, "", step.paired_ratio))
        rows.append(Row("(b)", "  fastest step each", f"{min(step.ours_s):.3f} s",
                        f"{min(step.lightly_s):.3f} s lightly", step.best_ratio))
    rows.append(Row("(b)", "  Sinkhorn + loss (fwd+bwd) share of our step", f"{100 * step.loss_share:.2f} %",
                    f"{1000 * step.loss_ours_s:.1f} ms of which Sinkhorn {1000 * step.sinkhorn_ours_s:.1f}"))
    if step.loss_lightly_s is not None:
        rows.append(Row("(b)", "  loss alone (fwd+bwd): ours vs lightly", f"{1000 * step.loss_ours_s:.2f} ms",
                        f"{1000 * step.loss_lightly_s:.2f} ms", step.loss_lightly_s / step.loss_ours_s))
    if step.agreement is not None:
        a = step.agreement
        rows.append(Row("(b)", "  loss ours vs lightly, same scores (rel. diff)", f"{a.loss_rel_diff:.1e}",
                        f"codes {a.codes_max_abs_diff:.0e}, grad {a.grad_rel_diff:.0e}",
                        target=f"< {MAX_LOSS_REL_DIFF:.0e}", passed=a.loss_rel_diff < MAX_LOSS_REL_DIFF))
    return rows


def step_within_noise(step: StepResult) -> bool | None:
    """Whether the step ratio is closer to 1 than half the timings' spread (then it says "no difference")."""
    if step.speed_ratio is None:
        return None
    noise = max(step.spread(step.ours_s), step.spread(step.lightly_s))
    return abs(step.speed_ratio - 1) < noise / 2


def step_notes(step: StepResult) -> str:
    """Where our step's time goes (phases, top ops), and a warning when the timings were noisy."""
    total = sum(step.breakdown_s.values())
    lines = [
        "our step by phase (median): " + ", ".join(
            f"{name} {1000 * s:.0f} ms ({100 * s / total:.0f}%)" for name, s in step.breakdown_s.items()),
        "top ops by self CPU time in one profiled step: " + ", ".join(
            f"{op['op']} {op['self_ms']:.0f} ms" for op in step.profile[:6]),
    ]
    if step.speed_ratio is not None:
        noise = max(step.spread(step.ours_s), step.spread(step.lightly_s))
        if noise > 0.15 or step_within_noise(step):
            verdict = "within" if step_within_noise(step) else "beyond"
            lines.append(f"note: step timings spread {100 * noise:.0f} % (interquartile range over median); the "
                         f"ratio {step.speed_ratio:.2f} is {verdict} that noise. More --rounds tighten it; on a "
                         "loaded machine --threads 1 suffers fewer OpenMP stalls.")
    return "\n".join(lines)


def index_rows(runs: Sequence[IndexRun], single: IndexRun | None, workers: int) -> list[Row]:
    rows = []
    for run in runs:
        label = f"{run.kind} ({workers} workers, default)" if run.kind == "fresh" else run.kind
        rows.append(Row("(c)", f"index, {label}", f"{_rate(run.summary.files_per_s)} files/s",
                        f"{run.summary.files_seen} files, {run.summary.seconds:.2f} s"))
    if single is not None:
        rows.append(Row("(c)", "  index, fresh, 1 worker (in-process)", f"{_rate(single.summary.files_per_s)} files/s",
                        f"{single.summary.files_seen} files, {single.summary.seconds:.2f} s"))
    return rows


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def code_digest() -> str:
    """SHA-256 over pretrain/ and this benchmark: which code was measured, even in a dirty tree."""
    digest = hashlib.sha256()
    for path in sorted([*REPO_ROOT.glob("pretrain/**/*.py"), *REPO_ROOT.glob("bench/pretrain/*.py"),
                        REPO_ROOT / "config" / "pretrain.yaml"]):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def machine_info(threads: int) -> dict[str, object]:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_step": threads,
        "torch_threads_loader": 1,
        "code_sha256": code_digest(),
        **{name: _package_version(name) for name in ("numpy", "pydicom", "python-gdcm", "pylibjpeg-openjpeg",
                                                      "pyjpegls", "pylibjpeg-rle", "monai", "lightly")},
    }


def _crops(text: str) -> tuple[tuple[int, int], ...]:
    """``96x2,48x6`` (size x count, global crops first) -> ((96, 2), (48, 6))."""
    out = []
    for part in text.split(","):
        size, _, count = part.strip().partition("x")
        out.append((int(size), int(count)))
    return tuple(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(
        prog="python -m bench.pretrain",
        description="Pretraining throughput: (a) image supply from shards vs DICOM on the fly and the "
                    "multi-crop loader, (b) our SwAV step vs lightly's SwaVLoss, (c) archive index speed.")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny archive and step, no JSON written")
    parser.add_argument("--parts", default="abc", help="which timed parts to run (index and shards always run)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="phantom archive cache folder")
    parser.add_argument("--studies", type=int, default=None, help="CT and MR studies each (default 4)")
    parser.add_argument("--slices", type=int, default=None, help="slices per CT/MR study (default 32)")
    parser.add_argument("--radiographs", type=int, default=None, help="DX studies (default 64)")
    parser.add_argument("--syntaxes", default=",".join(SYNTAXES),
                        help="transfer syntaxes, round-robin per series: " + ", ".join(SYNTAXES))
    parser.add_argument("--size", type=int, default=256, help="shard working resolution (prepare's default)")
    parser.add_argument("--shard-size", type=int, default=None, help="images per shard (default 128)")
    parser.add_argument("--warm-rounds", type=int, default=None, help="warm supply passes per way (default 2)")
    parser.add_argument("--loader-batch", type=int, default=None, help="multi-crop loader batch (default 32)")
    parser.add_argument("--loader-batches", type=int, default=None, help="timed loader batches (default 9)")
    parser.add_argument("--loader-workers", type=int, default=cpus, help=f"DataLoader workers (default {cpus})")
    parser.add_argument("--gpu-images-per-s", type=float, default=None,
                        help=f"what one GPU consumes, for workers per GPU (default {DEFAULT_GPU_IMAGES_PER_S:,.0f}, "
                             "an estimate for an H100 on the shipped ResNet-50 recipe)")
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50", "densenet121"))
    parser.add_argument("--batch", type=int, default=None, help="SwAV step batch (default 32)")
    parser.add_argument("--crops", type=_crops, default=None, help="step crops as SIZExCOUNT,... (default 96x2,48x6)")
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=None, help="step warm-up rounds (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed step rounds (default 10)")
    parser.add_argument("--threads", type=int, default=cpus, help=f"torch threads for the step (default {cpus})")
    parser.add_argument("--index-workers", type=int, default=None, help="index workers (default: build_index's)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder for the JSON results")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"studies": (1, 4), "slices": (8, 32), "radiographs": (8, 64), "shard_size": (8, 128),
                "warm_rounds": (1, 2), "loader_batch": (8, 32), "loader_batches": (2, 9), "batch": (8, 32),
                "crops": (((64, 2), (32, 6)), ((96, 2), (48, 6))), "warmup": (1, 2), "rounds": (2, 10)}
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if set(args.parts) - set(PARTS):
        parser.error(f"--parts takes letters of {''.join(PARTS)}")
    return args


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    machine = machine_info(args.threads)  # before the runs: the code as measured
    syntaxes = tuple(s.strip() for s in args.syntaxes.split(",") if s.strip())
    spec = ArchiveSpec(studies=args.studies, slices=args.slices, radiographs=args.radiographs, seed=args.seed,
                       syntaxes=syntaxes)
    archive = prepare_archive(args.cache.resolve(), spec)
    info = archive.summary()
    print(f"archive: {info['image_files']} images ({info['image_mb']} MB) {info['per_modality']}, "
          f"syntaxes {info['per_syntax']}; {archive.root}", flush=True)
    loads: dict[str, Load] = {}
    rows: list[Row] = []
    payload: dict[str, object] = {"archive": info}
    failures: list[str] = []
    with LoadMonitor() as whole, tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        work = Path(tmp)
        index_path, shard_root = work / "index.sqlite", work / "shards"
        _section("(c) index")
        with LoadMonitor() as monitor:
            runs = index_archive(archive, index_path, args.index_workers)
            single: IndexRun | None = None
            if args.index_workers is None and index_workers(None) > 1:
                single = index_archive(archive, work / "index-1.sqlite", 1)[0]
        assert monitor.result is not None
        loads["index"] = monitor.result
        workers = index_workers(args.index_workers)
        for run, label in [*((r, f"{r.kind}, {workers} workers") for r in runs),
                           *([(single, "fresh, 1 worker")] if single else [])]:
            print(f"  {label:<24} {run.summary.files_seen} files in {run.summary.seconds:.2f} s "
                  f"({run.summary.files_per_s:,.0f} files/s), page cache before {_share(run.resident_before)}",
                  flush=True)
        payload["index"] = {"workers": workers, "runs": [r.as_dict() for r in runs],
                            "single_worker": single.as_dict() if single else None}
        _section("shards (prepare_shards, slice stride 1)")
        prepared: Prepared = prepare(index_path, shard_root, args.size, args.shard_size)
        print(f"  {prepared.manifest.total} images in {len(prepared.manifest.shards)} shard(s), "
              f"{prepared.seconds:.1f} s ({prepared.images_per_s:.1f} images/s), skipped {prepared.manifest.skipped}",
              flush=True)
        payload["prepare"] = {"images": prepared.manifest.total, "shards": len(prepared.manifest.shards),
                              "seconds": round(prepared.seconds, 2), "images_per_s": round(prepared.images_per_s, 1),
                              "skipped": prepared.manifest.skipped, "size": args.size, "shard_size": args.shard_size}
        items = supply_items(shard_root, index_path, archive, args.seed)
        supply: SupplyResult | None = None
        step: StepResult | None = None
        if "a" in args.parts:
            _section(f"(a) image supply: {len(items)} images both ways, 1 thread, fresh process")
            with LoadMonitor() as monitor:
                supply = measure_supply(items, shard_root, args.size, args.warm_rounds)
            assert monitor.result is not None
            loads["supply"] = monitor.result
            for p in supply.passes:
                print(f"  {p.way:<10} {p.cache}: {p.images_per_s:8.1f} img/s  ({p.seconds:.2f} s, "
                      f"page cache before {_share(p.resident_before)})", flush=True)
            supply_table, supply_figures = supply_rows(supply)
            rows += supply_table
            payload["supply"] = supply_figures
            if supply.mismatched:
                failures.append(f"{supply.mismatched} image(s) differ between the shards and prepare_image")
            from pretrain.config import load_config

            recipe = load_config()
            _section(f"(a) multi-crop loader from shards: batch {args.loader_batch}")
            with LoadMonitor() as monitor:
                loader = measure_loader(shard_root, recipe, args.loader_batch, args.loader_batches,
                                        args.loader_workers)
            assert monitor.result is not None
            loads["loader"] = monitor.result
            gpu_rate = args.gpu_images_per_s or DEFAULT_GPU_IMAGES_PER_S
            more_rows, loader_figures = loader_rows(loader, supply, gpu_rate, args.gpu_images_per_s is None,
                                                    recipe.run.loader_workers)
            rows += more_rows
            payload["loader"] = {**loader.as_dict(), **loader_figures}
            print(f"  1 worker {loader.per_worker_images_per_s:.1f} img/s; DataLoader x{loader.dataloader_workers} "
                  f"{_rate(loader.dataloader_images_per_s)} img/s", flush=True)
        if "b" in args.parts:
            settings = StepSettings(arch=args.arch, batch_size=args.batch, crops=args.crops,
                                    prototypes=args.prototypes, warmup=args.warmup, rounds=args.rounds,
                                    loss_repeats=5 if args.quick else 20, breakdown_steps=1 if args.quick else 2,
                                    threads=args.threads)
            _section(f"(b) SwAV step, ours vs lightly, {args.threads} threads")
            with LoadMonitor() as monitor:
                step = measure_step(shard_root, settings, args.seed)
            assert monitor.result is not None
            loads["step"] = monitor.result
            if step.lightly_skipped:
                print(f"  lightly comparison skipped: {step.lightly_skipped}", flush=True)
            rows += step_rows(step)
            payload["step"] = {**step.as_dict(), "ratio_within_noise": step_within_noise(step)}
            if step.agreement is not None and not step.agreement.loss_rel_diff < MAX_LOSS_REL_DIFF:
                failures.append(f"losses disagree: relative difference {step.agreement.loss_rel_diff:.2e}")
        if "c" in args.parts:
            rows += index_rows(runs, single, workers)
    assert whole.result is not None
    loads["whole"] = whole.result
    share = whole.result.other_share
    print(f"\npretrain benchmark: {os.cpu_count()} CPUs, torch {machine['torch']}, "
          f"{time.monotonic() - started:.0f} s; other processes used "
          f"{'-' if share is None else f'{100 * share:.0f} %'} of the machine meanwhile")
    print(format_table(rows))
    if supply is not None:
        print("\non the fly by transfer syntax (warm, 1 thread): " + ", ".join(
            f"{name} {1000 / supply.subset(ON_THE_FLY, 'warm', supply.indices(syntax=name)):.1f} ms"
            for name in sorted({i.syntax for i in supply.items})))
        print("on the fly by modality (warm, 1 thread):        " + ", ".join(
            f"{name} {1000 / supply.subset(ON_THE_FLY, 'warm', supply.indices(modality=name)):.1f} ms"
            for name in sorted({i.modality for i in supply.items})))
    if step is not None:
        print(step_notes(step))
    busy = {name: load.other_share for name, load in loads.items()
            if load.other_share is not None and load.other_share > 0.1}
    if busy:
        print("note: other processes loaded the machine during: " + ", ".join(
            f"{name} ({100 * value:.0f} % of all CPUs)" for name, value in busy.items())
              + "; rates are lower than on an idle box, interleaved ratios less affected")
    payload = {
        "benchmark": "pretrain",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine,
        "load": {name: load.as_dict() for name, load in loads.items()},
        "targets": {"supply_ratio": MIN_SUPPLY_RATIO, "step_ratio": MIN_STEP_RATIO,
                    "loss_rel_diff": MAX_LOSS_REL_DIFF},
        "table": [asdict(row) for row in rows],
        **payload,
        "failures": failures,
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.quick or args.no_write:
        print("(quick run: results not written)" if args.quick else "(--no-write: results not written)")
    else:
        print(f"\nresults: {write_results('pretrain', payload, args.results)}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0
