"""STOW-RS beside C-STORE: the same phantom CT files into the same node, over 1 and 4 clients.

Each run starts a fresh ``pacsnode serve --no-worker`` (the ingest benchmark's receiver, with its
HTTP server on), sends every file, and checks that the store holds them all. C-STORE goes through
DCMTK ``storescu`` processes (one association each, as in ``bench.ingest``); STOW-RS through
dicomweb-client, the field's Python client, one process per client, ``--batch`` instances per
request (``POST /dicomweb/studies``). Both protocols answer only once every instance is fsynced,
renamed and indexed, so the wall time covers durability. Rounds interleave the modes so that
drifts of the machine hit both alike; the figures are medians over the rounds, and the ratio is
STOW-RS over C-STORE at the same client count.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from dicomweb_client.api import DICOMwebClient

from bench.ingest.phantoms import PhantomSet, prepare_phantoms, split_groups
from bench.ingest.receivers import HOST, PacsnodeReceiver, free_port
from bench.ingest.run import CACHE_DIR, MB, MIB, RunFailed, _median, machine_info, send
from bench.results import RESULTS_DIR, write_results

MODES = ("c-store", "stow-rs")
CLIENT_COUNTS = (1, 4)
FULL_INSTANCES = 1000
FULL_ROUNDS = 3
QUICK_INSTANCES = 128
BATCH = 16


@dataclass(frozen=True)
class Run:
    mode: str
    clients: int
    round: int
    instances: int
    bytes: int
    seconds: float
    receiver_cpu_s: float | None
    peak_rss_mb: float | None

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "instances_per_s": round(self.instances_per_s, 2),
                "mb_per_s": round(self.bytes / MB / self.seconds, 2)}


def _stow_client(url: str, files: list[Path], batch: int) -> int:
    """One client process: the files in requests of ``batch`` instances; returns how many were stored."""
    client = DICOMwebClient(url)
    stored = 0
    for start in range(0, len(files), batch):
        datasets = [pydicom.dcmread(path) for path in files[start:start + batch]]
        answer = client.store_instances(datasets)
        failed = answer.get("FailedSOPSequence", [])
        if failed:
            raise RunFailed(f"{len(failed)} instances refused: {failed[:1]}")
        stored += len(datasets)
    return stored


def stow(phantoms: PhantomSet, clients: int, url: str, batch: int) -> float:
    """Every phantom by STOW-RS from ``clients`` processes at once; returns wall seconds."""
    groups = split_groups(phantoms.files, clients)
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        started = time.perf_counter()
        stored = sum(pool.starmap(_stow_client, [(url, group, batch) for group in groups]))
        elapsed = time.perf_counter() - started
    if stored != len(phantoms.files):
        raise RunFailed(f"clients stored {stored} of {len(phantoms.files)}")
    return elapsed


def one_run(mode: str, clients: int, rnd: int, phantoms: PhantomSet, scratch: Path, batch: int) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix=f"{mode}-{clients}-", dir=scratch))
    http_port = free_port()
    receiver = PacsnodeReceiver(workdir, {"PACSNODE_HTTP__ENABLED": "true", "PACSNODE_HTTP__HOST": HOST,
                                          "PACSNODE_HTTP__PORT": str(http_port)})
    try:
        receiver.start()
        cpu_before = receiver.cpu_seconds()
        if mode == "c-store":
            seconds = send(phantoms, clients, receiver.port, receiver.ae_title, workdir)
        else:
            seconds = stow(phantoms, clients, f"http://{HOST}:{http_port}/dicomweb", batch)
        cpu_after = receiver.cpu_seconds()
        stored = receiver.stored_count()
        rss = receiver.peak_rss()
        if stored != len(phantoms.files):
            raise RunFailed(f"{mode} x{clients}: the store holds {stored} of {len(phantoms.files)}")
    except BaseException:
        print(f"--- pacsnode log tail ---\n{receiver.log_tail()}", file=sys.stderr)
        raise
    finally:
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return Run(mode, clients, rnd, len(phantoms.files), phantoms.total_bytes, seconds,
               None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 2),
               None if rss is None else round(rss / MIB, 1))


def summarise(runs: Sequence[Run]) -> dict[str, object]:
    """Medians per (mode, clients), and STOW-RS over C-STORE per client count."""
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for run in runs:
        mine = [r for r in runs if (r.mode, r.clients) == (run.mode, run.clients)]
        cpu = _median([r.receiver_cpu_s for r in mine])
        medians.setdefault(run.mode, {})[str(run.clients)] = {
            "instances_per_s": _median([r.instances_per_s for r in mine]),
            "receiver_cpu_ms_per_instance": None if cpu is None else round(1000 * cpu / run.instances, 2),
            "peak_rss_mb": _median([r.peak_rss_mb for r in mine]), "runs": len(mine)}
    ratios: dict[str, float | None] = {}
    for clients in {str(r.clients) for r in runs}:
        ours = medians.get("stow-rs", {}).get(clients, {}).get("instances_per_s")
        base = medians.get("c-store", {}).get(clients, {}).get("instances_per_s")
        ratios[clients] = round(ours / base, 3) if ours and base else None
    return {"medians": medians, "stow_over_cstore": ratios}


def report(summary: dict[str, object]) -> str:
    medians = summary["medians"]
    assert isinstance(medians, dict)
    lines = [f"{'mode':<9}{'clients':>8}{'inst/s':>10}{'CPU ms/inst':>13}{'peak RSS MB':>13}"]
    for mode, by_clients in medians.items():
        for clients, m in sorted(by_clients.items()):
            lines.append(f"{mode:<9}{clients:>8}{m['instances_per_s'] or 0:>10.1f}"
                         f"{m['receiver_cpu_ms_per_instance'] or 0:>13.2f}{m['peak_rss_mb'] or 0:>13.1f}")
    ratios = summary["stow_over_cstore"]
    assert isinstance(ratios, dict)
    lines += [f"STOW-RS / C-STORE, {clients} client(s): {ratio}" for clients, ratio in sorted(ratios.items())]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stow",
                                     description="STOW-RS vs C-STORE ingest into pacsnode, 1 and 4 clients.")
    parser.add_argument("--instances", type=int, default=None, help=f"per run (default {FULL_INSTANCES})")
    parser.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds (default {FULL_ROUNDS})")
    parser.add_argument("--batch", type=int, default=BATCH, help="instances per STOW-RS request")
    parser.add_argument("--clients", default=",".join(map(str, CLIENT_COUNTS)), help="comma-separated counts")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_INSTANCES} instances, 1 round, no JSON")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="phantom cache folder")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.instances = args.instances or (QUICK_INSTANCES if args.quick else FULL_INSTANCES)
    args.rounds = args.rounds or (1 if args.quick else FULL_ROUNDS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    phantoms = prepare_phantoms(args.cache, args.instances, args.seed)
    print(f"{len(phantoms.files)} instances ({phantoms.mean_bytes / 1024:.0f} KiB each, {phantoms.source}); "
          f"{args.rounds} round(s); STOW-RS batches of {args.batch}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-stow-"))
    runs: list[Run] = []
    try:
        for rnd in range(1, args.rounds + 1):
            for count in clients:
                for mode in MODES:
                    run = one_run(mode, count, rnd, phantoms, scratch, args.batch)
                    runs.append(run)
                    print(f"round {rnd}  {mode:<8} x{count}: {run.seconds:6.2f} s  {run.instances_per_s:7.1f} inst/s"
                          f"  receiver CPU {run.receiver_cpu_s} s  peak RSS {run.peak_rss_mb} MB", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = summarise(runs)
    print("\n" + report(summary))
    if args.quick:
        print("(quick run: results not written)")
        return 0
    payload: dict[str, object] = {
        "benchmark": "stow", "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv, "settings": {"instances": len(phantoms.files), "rounds": args.rounds,
                                       "batch": args.batch, "clients": clients, "phantom_source": phantoms.source,
                                       "phantom_bytes": phantoms.total_bytes},
        "machine": machine_info(), "runs": [r.as_dict() for r in runs], **summary}
    print(f"\nresults: {write_results('stow', payload, args.results)}")
    return 0
