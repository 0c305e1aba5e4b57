"""Orchestration of the ingest benchmark: rounds of runs, verification, medians, report, JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.ingest.phantoms import PhantomSet, Source, prepare_phantoms, split_groups
from bench.ingest.receivers import (
    CALLING_AE,
    HOST,
    OrthancReceiver,
    PacsnodeReceiver,
    Receiver,
    StorescpReceiver,
    dcmtk,
    dcmtk_env,
)
from bench.results import RESULTS_DIR, write_results

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / "bench" / ".cache"

# pacsnode-rN: N receiver processes; pacsnode: the shipped default (one per CPU core).
TARGETS = ("pacsnode-r1", "pacsnode-r2", "pacsnode", "storescp", "orthanc")
PEERS = ("storescp", "orthanc")
ASSOCIATION_COUNTS = (1, 4)
FULL_INSTANCES = 2000
FULL_ROUNDS = 3
QUICK_INSTANCES = 200
SEND_TIMEOUT_S = 1800.0
MB = 1_000_000
MIB = 1024 * 1024
# Targets of the issue, for 4 associations.
MIN_RATIO_STORESCP = 0.7
MIN_RATIO_ORTHANC = 1.0
MAX_PEAK_RSS_MB = 300.0


class RunFailed(RuntimeError):
    """A run that did not deliver every instance (or whose sender failed)."""


@dataclass(frozen=True)
class Run:
    """One timed transfer of the whole phantom set to one receiver."""

    target: str
    associations: int
    round: int
    instances: int
    bytes: int
    seconds: float
    stored: int
    peak_rss_mb: float | None  # VmHWM of the receiver's main process
    cpu_s: float | None = None  # CPU seconds the receiver used during the transfer (user + system)

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "instances_per_s": round(self.instances_per_s, 2),
                "mb_per_s": round(self.mb_per_s, 2)}


@dataclass
class Summary:
    """Medians per (target, associations) and the issue's targets."""

    medians: dict[str, dict[int, dict[str, float | None]]] = field(default_factory=dict)
    ratios: dict[int, dict[str, float | None]] = field(default_factory=dict)
    checks: dict[str, dict[str, object]] = field(default_factory=dict)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: Sequence[Run]) -> Summary:
    """Median instances/s, MB/s, seconds and peak RSS per target and association count; ratios; checks."""
    summary = Summary()
    for target in dict.fromkeys(r.target for r in runs):
        for assoc in ASSOCIATION_COUNTS:
            mine = [r for r in runs if r.target == target and r.associations == assoc]
            if not mine:
                continue
            summary.medians.setdefault(target, {})[assoc] = {
                "instances_per_s": _median([r.instances_per_s for r in mine]),
                "mb_per_s": _median([r.mb_per_s for r in mine]),
                "seconds": _median([r.seconds for r in mine]),
                "peak_rss_mb": _median([r.peak_rss_mb for r in mine]),
                "cpu_s": _median([r.cpu_s for r in mine]),
                "cpu_ms_per_instance": _median([None if r.cpu_s is None else 1000 * r.cpu_s / r.instances
                                                for r in mine]),
                "max_peak_rss_mb": max((r.peak_rss_mb for r in mine if r.peak_rss_mb is not None),
                                       default=None),
                "runs": len(mine),
            }
    for assoc in ASSOCIATION_COUNTS:
        ratios: dict[str, float | None] = {}
        for target in (t for t in summary.medians if t.startswith("pacsnode")):
            node = summary.medians[target].get(assoc, {}).get("instances_per_s")
            for other in PEERS:
                theirs = summary.medians.get(other, {}).get(assoc, {}).get("instances_per_s")
                key = other if target == "pacsnode" else f"{target}/{other}"
                ratios[key] = node / theirs if node is not None and theirs else None
        summary.ratios[assoc] = ratios
    four = summary.ratios.get(4, {})
    rss = summary.medians.get("pacsnode", {}).get(4, {}).get("max_peak_rss_mb")
    summary.checks = {
        "pacsnode/storescp (4 assoc)": {"value": four.get("storescp"), "target": f">= {MIN_RATIO_STORESCP}",
                                        "pass": _at_least(four.get("storescp"), MIN_RATIO_STORESCP)},
        "pacsnode/orthanc (4 assoc)": {"value": four.get("orthanc"), "target": f">= {MIN_RATIO_ORTHANC}",
                                       "pass": _at_least(four.get("orthanc"), MIN_RATIO_ORTHANC)},
        "pacsnode peak RSS MB (4 assoc, worst run)": {"value": rss, "target": f"< {MAX_PEAK_RSS_MB:.0f}",
                                                      "pass": None if rss is None else rss < MAX_PEAK_RSS_MB},
    }
    return summary


def _at_least(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def _verdict(ok: object) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(summary: Summary, phantoms: PhantomSet, rounds: int) -> str:
    """The human-readable table printed at the end."""
    lines = [
        (f"{len(phantoms.files)} instances ({phantoms.total_bytes / MB:.0f} MB, {phantoms.source} phantoms), "
         f"median of {rounds} round(s)"),
        (f"{'target':<12}{'assoc':>6}{'inst/s':>10}{'MB/s':>9}{'seconds':>9}{'peak RSS MB':>13}{'CPU s':>8}"
        f"{'CPU ms/inst':>13}"),
    ]
    for target, by_assoc in summary.medians.items():
        for assoc, m in by_assoc.items():
            lines.append(f"{target:<12}{assoc:>6}{_fmt(m['instances_per_s']):>10}{_fmt(m['mb_per_s']):>9}"
                         f"{_fmt(m['seconds'], 2):>9}{_fmt(m['peak_rss_mb']):>13}{_fmt(m['cpu_s'], 2):>8}"
                         f"{_fmt(m['cpu_ms_per_instance'], 2):>13}")
    lines.append("")
    for assoc, ratios in summary.ratios.items():
        shown = ", ".join(f"{'pacsnode/' + key if '/' not in key else key} = {_fmt(value, 2)}"
                          for key, value in ratios.items())
        lines.append(f"ratios, {assoc} assoc: {shown}")
    lines.append("")
    for name, check in summary.checks.items():
        value = check["value"]
        shown = _fmt(value if isinstance(value, float) else None, 2)
        lines.append(f"{name:<42}{shown:>8}  target {check['target']:<7} {_verdict(check['pass'])}")
    return "\n".join(lines)


def send(phantoms: PhantomSet, associations: int, port: int, called_ae: str, logdir: Path) -> float:
    """Send every phantom with ``associations`` parallel storescu processes; returns wall seconds.

    Raises ``RunFailed`` when any storescu exits non-zero.
    """
    groups = split_groups(phantoms.files, associations)
    env = dcmtk_env()
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    started = time.perf_counter()
    for number, group in enumerate(groups):
        log = logdir / f"storescu-{number}.log"
        with log.open("wb") as handle:
            processes.append((subprocess.Popen(
                [dcmtk("storescu"), "-aet", CALLING_AE, "-aec", called_ae, "-R", HOST, str(port),
                 *map(str, group)],
                env=env, stdout=handle, stderr=subprocess.STDOUT), log))
    failures: list[str] = []
    for process, log in processes:
        try:
            code = process.wait(timeout=SEND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if code != 0:
            failures.append(f"storescu exited {code}: " + log.read_text(errors="replace")[-2000:])
    elapsed = time.perf_counter() - started
    if failures:
        raise RunFailed("\n".join(failures))
    return elapsed


def make_receiver(target: str, workdir: Path, storescp_fork: bool) -> Receiver:
    if target == "pacsnode":
        return PacsnodeReceiver(workdir)
    if target.startswith("pacsnode-r") and target[len("pacsnode-r"):].isdigit():
        return PacsnodeReceiver(workdir, receivers=int(target[len("pacsnode-r"):]))
    if target == "storescp":
        return StorescpReceiver(workdir, fork=storescp_fork)
    if target == "orthanc":
        return OrthancReceiver(workdir)
    raise ValueError(f"unknown target {target!r}")


def _flush_page_cache_writes() -> None:
    """Write back dirty pages (storescp leaves ~1 GB unsynced) so no run pays for the previous one."""
    os.sync()


def one_run(target: str, associations: int, rnd: int, phantoms: PhantomSet, scratch: Path,
            storescp_fork: bool,
            during: Callable[[Receiver], Callable[[], None]] | None = None) -> Run:
    """Start a fresh receiver, send everything, verify the count, read the peak RSS, stop, clean up.

    ``during``, when given, is called with the started receiver before sending and returns a
    function called right after sending (the profiler hooks in here).
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"{target}-{associations}-", dir=scratch))
    receiver = make_receiver(target, workdir, storescp_fork)
    try:
        receiver.start()
        finish = during(receiver) if during is not None else None
        cpu_before = receiver.cpu_seconds()
        try:
            seconds = send(phantoms, associations, receiver.port, receiver.ae_title, workdir)
        finally:
            if finish is not None:
                finish()
        cpu_after = receiver.cpu_seconds()
        stored = receiver.stored_count()
        rss = receiver.peak_rss()
        if stored != len(phantoms.files):
            raise RunFailed(f"{target} with {associations} association(s) holds {stored} of "
                            f"{len(phantoms.files)} instances:\n{receiver.log_tail()}")
    except BaseException:
        print(f"--- {receiver.name} log tail ---\n{receiver.log_tail()}", file=sys.stderr)
        raise
    finally:
        receiver.stop()
        _flush_page_cache_writes()
        shutil.rmtree(workdir, ignore_errors=True)
        _flush_page_cache_writes()
    return Run(target=target, associations=associations, round=rnd, instances=len(phantoms.files),
               bytes=phantoms.total_bytes, seconds=seconds, stored=stored,
               peak_rss_mb=None if rss is None else rss / MIB,
               cpu_s=None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 2))


def _tool_version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def code_digest() -> str:
    """SHA-256 over the node's and config's sources: which code was measured, even in a dirty tree."""
    digest = hashlib.sha256()
    for path in sorted([*REPO_ROOT.glob("node/**/*.py"), *REPO_ROOT.glob("config/**/*.py"),
                        *REPO_ROOT.glob("config/*.yaml")]):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def machine_info() -> dict[str, object]:
    """Where the numbers were measured."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _tool_version(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": commit,
        "code_sha256": code_digest(),  # node/ + config/ as measured (uncommitted edits included)
        "pydicom": _package_version("pydicom"),
        "pynetdicom": _package_version("pynetdicom"),
        "dcmtk": _tool_version([dcmtk("storescu"), "--version"]),
        "orthanc": _tool_version(["Orthanc", "--version"]),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="C-STORE ingest throughput of pacsnode vs DCMTK storescp vs Orthanc, "
                    "over 1 and 4 parallel storescu associations.")
    parser.add_argument("--instances", type=int, default=None,
                        help=f"instances per run (default {FULL_INSTANCES})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved rounds (default {FULL_ROUNDS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_INSTANCES} instances, 1 round, no JSON written")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of " + ",".join(TARGETS))
    parser.add_argument("--associations", default=",".join(map(str, ASSOCIATION_COUNTS)),
                        help="comma-separated association counts (default 1,4)")
    parser.add_argument("--phantoms", choices=("auto", "synth", "pydicom"), default="auto",
                        help="phantom source: node.synth when importable (auto), or the built-in pydicom one")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="phantom cache folder")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="parent of the receivers' temp storage (default: system temp)")
    parser.add_argument("--storescp-fork", action="store_true",
                        help="run storescp --fork (one process per association) instead of single-process")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder for the JSON results")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also run pacsnode once more with 4 associations under py-spy; raw (collapsed) "
                             "stacks are written to this file")
    parser.add_argument("--profile-mode", choices=("active", "gil", "idle"), default="active",
                        help="with --profile: py-spy samples of active threads (default), only of the "
                             "thread holding the GIL (--gil), or of all threads, idle ones too (--idle)")
    args = parser.parse_args(argv)
    if args.quick:
        args.instances = args.instances or QUICK_INSTANCES
        args.rounds = args.rounds or 1
    args.instances = args.instances or FULL_INSTANCES
    args.rounds = args.rounds or FULL_ROUNDS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    assoc_counts = [int(a) for a in args.associations.split(",") if a.strip()]
    source: Source = args.phantoms
    phantoms = prepare_phantoms(args.cache, args.instances, args.seed, source)
    print(f"{len(phantoms.files)} instances, {phantoms.total_bytes / MB:.0f} MB "
          f"({phantoms.mean_bytes / 1024:.0f} KiB each), from {phantoms.source}; "
          f"{args.rounds} round(s) of {', '.join(targets)} x {assoc_counts} association(s)", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.scratch))
    runs: list[Run] = []
    failures: list[str] = []
    try:
        for rnd in range(1, args.rounds + 1):
            for target in targets:
                for assoc in assoc_counts:
                    try:
                        run = one_run(target, assoc, rnd, phantoms, scratch, args.storescp_fork)
                    except RunFailed as exc:
                        failures.append(f"round {rnd} {target} x{assoc}: {exc}")
                        print(f"round {rnd}  {target:<9} x{assoc}: FAILED: {exc}", file=sys.stderr,
                              flush=True)
                        continue
                    runs.append(run)
                    print(f"round {rnd}  {target:<9} x{assoc}: {run.seconds:6.2f} s  "
                          f"{run.instances_per_s:7.1f} inst/s  {run.mb_per_s:6.1f} MB/s  "
                          f"peak RSS {_fmt(run.peak_rss_mb)} MB  receiver CPU {_fmt(run.cpu_s, 2)} s",
                          flush=True)
        profile_info: dict[str, object] | None = None
        if args.profile is not None:
            from bench.ingest.profile import profiled_run

            mode_flags = {"active": (), "gil": ("--gil",), "idle": ("--idle",)}[args.profile_mode]
            extra = ("--threads", "--nonblocking", "--subprocesses", *mode_flags)  # receivers are children
            profile_info = profiled_run(args.profile, lambda during: one_run(
                "pacsnode", 4, 0, phantoms, scratch, args.storescp_fork, during), extra)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = summarise(runs)
    print()
    print(format_report(summary, phantoms, args.rounds))
    if not args.no_write:
        payload: dict[str, object] = {
            "benchmark": "ingest",
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv,
            "settings": {"instances": len(phantoms.files), "rounds": args.rounds, "targets": targets,
                         "associations": assoc_counts, "phantom_source": phantoms.source,
                         "phantom_bytes": phantoms.total_bytes, "seed": args.seed,
                         "storescp_fork": args.storescp_fork,
                         "receivers": {t: make_receiver(t, scratch / t, args.storescp_fork).describe()
                                       for t in targets}},
            "machine": machine_info(),
            "runs": [r.as_dict() for r in runs],
            "failures": failures,
            "medians": {t: {str(a): m for a, m in by.items()} for t, by in summary.medians.items()},
            "ratios": {str(a): r for a, r in summary.ratios.items()},
            "checks": summary.checks,
            "profile": profile_info,
        }
        if args.quick:
            print("(quick run: results not written)")
        else:
            print(f"\nresults: {write_results('ingest', payload, args.results)}")
    if failures:
        print(f"\n{len(failures)} run(s) FAILED (lost instances or sender errors)", file=sys.stderr)
        return 1
    return 0

