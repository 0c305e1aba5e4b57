"""How long a study takes from its completion to its SR at the destination, and how many studies
an hour one CPU worker gets through.

Real processes throughout: the node in this process (SCP, assembler, dispatcher, report consumer,
export outbox) on a private ``redis-server``, ``pacsnode worker`` processes, and a storage SCP in
this process as the destination, which notes when each SR arrives. The models are untrained
ResNet-18s at the production input size (``pacsnode finetune --size 128``): the same compute as
trained ones. Phantoms have scanner sizes (512x512 CT/MR slices, a 2048 px radiograph).

Phases, each on a fresh node:

* latency: one worker; studies sent one at a time, each waited for (no queueing). Latency is
  ``studies.completed_at`` (the node closed the version and committed its dispatch) to the SR's
  C-STORE at the destination; its parts come from the index (dispatch published, export queued)
  and the worker's Celery log (task received, task run time).
* throughput: every study sent back to back, one worker, then two worker processes; studies/hour
  from the first completion to the last SR.
* stages: one study a family re-run in this process, timing decode, inference and DICOM encoding.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch
from pydicom.uid import Comprehensive3DSRStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from config.settings import Settings, load_settings
from models.preprocess import image_input
from models.untrained import install_untrained_models
from node.child_process import pacsnode_command
from node.index import job_id_for
from node.logs import configure_logging
from node.messages import DispatchMessage
from node.send import SendReport, scan, send_files
from node.service import Node
from node.synth import generate
from workers.inference import LoadedModel, run_model
from workers.results import ResultContext, build_results
from workers.series import SelectedSeries, select_series
from workers.study import StudyProcessor, encode

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / "bench" / ".cache"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODEL_SIZE = 128  # `pacsnode finetune`'s default --size: what production models take
CLI = pacsnode_command()
DEST_AE = "E2EDEST"
WAIT_S = 600.0
HIGH_LOAD_PER_CORE = 0.5  # a 1-minute load above this per core before the run: other work shares the CPUs
# Every MR voxel counts as lesion for the untrained model, so each MR gets its SEG (64 frames of
# 512x512): the timing of a positive study, the slower case. (A SEG is written only for lesions.)
MR_MASK_THRESHOLD = 0.0


@dataclass(frozen=True)
class Family:
    kind: str  # node.synth kind
    pipeline: str
    target_s: float  # the target: completion to SR at the destination


FAMILIES = (
    Family("cxr", "cxr-abnormality", 2.0),
    Family("ct-head", "ct-hemorrhage", 10.0),
    Family("mr-brain", "mr-metastasis", 10.0),
)


@dataclass(frozen=True)
class Plan:
    studies: int  # measured studies per family (one more per family warms the worker up)
    slices: int
    size: int
    cxr_size: int
    two_workers: bool

    @classmethod
    def full(cls) -> Plan:
        return cls(studies=5, slices=64, size=512, cxr_size=2048, two_workers=True)

    @classmethod
    def quick(cls) -> Plan:
        return cls(studies=1, slices=64, size=512, cxr_size=2048, two_workers=False)


@dataclass(frozen=True)
class Study:
    uid: str
    family: Family
    files: tuple[Path, ...]


# --- phantoms --------------------------------------------------------------------------------


def phantom_studies(plan: Plan) -> dict[str, list[Study]]:
    """``plan.studies + 1`` phantom studies a family (the first warms up), generated once into the cache."""
    out: dict[str, list[Study]] = {}
    for family in FAMILIES:
        folder = CACHE_DIR / f"e2e-{family.kind}-{plan.slices}x{plan.size}-cxr{plan.cxr_size}-n{plan.studies + 1}"
        listing = folder / "bench-studies.json"
        if not listing.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            started = time.perf_counter()
            manifest = generate(folder, plan.studies + 1, [family.kind], seed=2026, ct_slices=plan.slices,
                                mr_slices=plan.slices, ct_size=plan.size, mr_size=plan.size, cxr_size=plan.cxr_size,
                                patient_prefix="EE")
            listing.write_text(json.dumps({r.study_uid: list(r.instances) for r in manifest.studies}))
            print(f"  phantoms: {plan.studies + 1} {family.kind} studies in {time.perf_counter() - started:.0f} s")
        studies = json.loads(listing.read_text())
        out[family.kind] = [Study(uid, family, tuple(folder / p for p in paths)) for uid, paths in studies.items()]
    return out


# --- the processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A private redis-server as production runs it (append-only file), stopped on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "yes", "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        _wait(lambda: _pings(client), 10, "redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(what)
        time.sleep(0.05)


@dataclass
class Destination:
    """The PACS stand-in: notes the wall-clock time each study's SR arrives (in the C-STORE handler)."""

    port: int
    sr_at: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: Event) -> int:
        now = time.time()
        ds = event.dataset
        if str(ds.SOPClassUID) == Comprehensive3DSRStorage:
            with self.lock:
                self.sr_at.setdefault(str(ds.StudyInstanceUID), now)
        return 0x0000

    def arrived(self, uid: str) -> float | None:
        with self.lock:
            return self.sr_at.get(uid)


@contextmanager
def destination() -> Iterator[Destination]:
    dest = Destination(free_port())
    ae = AE(ae_title=DEST_AE)
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", dest.port), block=False, evt_handlers=[(evt.EVT_C_STORE, dest.on_store)])
    assert server is not None  # block=False always returns the running server
    try:
        yield dest
    finally:
        server.shutdown()


def node_settings(folder: Path, models: Path, broker_url: str, dest: Destination) -> Settings:
    """Shipped defaults except: a private folder and ports, a 1 s quiet period (CT/MR complete 1 s
    after their last slice instead of 10 s: completion is where latency starts, so this only
    shortens the run), no HTTP, warnings only."""
    return load_settings(None, node={"data_dir": folder, "host": "127.0.0.1", "port": 0, "quiet_period_s": 1.0,
                                     "min_free_disk_mb": 64},
                         http={"enabled": False}, broker={"url": broker_url},
                         workers={"embedded": False, "models_dir": models},
                         destinations=[{"name": "dest", "host": "127.0.0.1", "port": dest.port, "ae_title": DEST_AE}],
                         logging={"json": False, "level": "WARNING"})


@contextmanager
def workers(settings: Settings, count: int, logs: Path) -> Iterator[list[Path]]:
    """``count`` ``pacsnode worker`` processes (prefork, one child each), ready when this yields."""
    assert settings.broker.url is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    env.update({"PACSNODE_NODE__DATA_DIR": str(settings.node.data_dir),
                "PACSNODE_WORKERS__MODELS_DIR": str(settings.workers.models_dir),
                "PACSNODE_BROKER__URL": settings.broker.url.get_secret_value(), "PACSNODE_LOGGING__JSON": "false"})
    paths = [logs / f"worker{i}.log" for i in range(count)]
    processes = []
    try:
        for i, path in enumerate(paths):
            with path.open("wb") as out:
                processes.append(subprocess.Popen([*CLI, "worker", "--concurrency", "1", "--name", f"e2e{i}@localhost"],
                                                  env=env, stdout=out, stderr=subprocess.STDOUT))
        _wait(lambda: all(" ready." in p.read_text(errors="replace") for p in paths), 180, "workers did not start")
        yield paths
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- measuring -------------------------------------------------------------------------------

CELERY_LINE = re.compile(r"^\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[\w-]+\] Task "
                         r"pacsnode\.process_study\[(?P<id>[^\]]+)\] (?P<what>received|succeeded in (?P<s>[\d.]+)s)")


def task_times(logs: list[Path]) -> dict[str, dict[str, float]]:
    """Per job id: when a worker took the task (``received``, epoch s) and how long it ran (``run_s``)."""
    out: dict[str, dict[str, float]] = {}
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            match = CELERY_LINE.match(line)
            if match is None:
                continue
            entry = out.setdefault(match["id"], {})
            if match["s"] is not None:
                entry["run_s"] = float(match["s"])
            else:  # Celery logs local time
                entry["received"] = dt.datetime.strptime(match["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return out


def send(study: Study, port: int) -> float:
    """C-STORE one study to the node; returns the seconds it took (every instance durable)."""
    started = time.perf_counter()
    report = send_files(scan(list(study.files), SendReport()), "127.0.0.1", port, "PACSNODE")
    if report.failed or report.sent != len(study.files):
        raise RuntimeError(f"the node refused {len(report.failed)} instances of a {study.family.kind} study")
    return time.perf_counter() - started


def index_times(settings: Settings, uid: str) -> dict[str, float | None]:
    """From the node's index: completion, dispatch published to the broker, SR export queued."""
    conn = sqlite3.connect(settings.node.index_path, timeout=30)
    try:
        completed, published = conn.execute(
            "SELECT s.completed_at, j.published_at FROM studies s JOIN jobs j ON j.study_uid=s.study_uid"
            " AND j.version=s.version WHERE s.study_uid=?", (uid,)).fetchone()
        (queued,) = conn.execute("SELECT created_at FROM exports WHERE study_uid=? AND kind='sr'", (uid,)).fetchone()
    finally:
        conn.close()
    return {"completed_at": completed, "published_at": published, "export_queued_at": queued}


def wait_for_sr(node: Node, dest: Destination, uid: str) -> float:
    deadline = time.monotonic() + WAIT_S
    while (arrived := dest.arrived(uid)) is None:
        study = node.index.study(uid)
        if study is not None and study.state in ("failed", "not_applicable", "unmatched"):
            raise RuntimeError(f"study ended {study.state}: {study.reason}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SR at the destination after {WAIT_S:.0f} s (state {study and study.state})")
        time.sleep(0.02)
    return arrived


@dataclass
class Phase:
    """A fresh node, its worker(s) and a destination, warmed up with one study a family."""

    node: Node
    dest: Destination
    logs: list[Path]


@contextmanager
def phase(work: Path, name: str, models: Path, worker_count: int, warmups: list[Study]) -> Iterator[Phase]:
    folder = work / name
    folder.mkdir()
    with ExitStack() as stack:
        broker = stack.enter_context(redis_server(folder))
        dest = stack.enter_context(destination())
        settings = node_settings(folder / "node", models, broker, dest)
        node = Node(settings, with_worker=False)
        node.start()
        stack.callback(node.stop)
        logs = stack.enter_context(workers(settings, worker_count, folder))
        for study in warmups:
            send(study, node.dicom_port)
            wait_for_sr(node, dest, study.uid)
        yield Phase(node, dest, logs)


def measure_latency(run: Phase, studies: list[Study]) -> list[dict[str, Any]]:
    """One study at a time: each is sent, completed, processed and delivered before the next."""
    rows = []
    for study in studies:
        ingest_s = send(study, run.node.dicom_port)
        sr_at = wait_for_sr(run.node, run.dest, study.uid)
        times = index_times(run.node.settings, study.uid)
        task = task_times(run.logs).get(job_id_for(study.uid, 1, study.family.pipeline), {})
        completed = times["completed_at"]
        assert completed is not None
        row: dict[str, Any] = {"family": study.family.kind, "instances": len(study.files), "ingest_s": ingest_s,
                               "latency_s": sr_at - completed}
        if times["published_at"] and "received" in task and "run_s" in task and times["export_queued_at"]:
            received, run_s = task["received"], task["run_s"]
            row["parts_s"] = {
                "dispatch": times["published_at"] - completed,  # outbox -> published to Redis
                "to_worker": received - times["published_at"],  # Redis -> Celery worker took it
                "task": run_s,  # read, decode, infer, encode, write results, report
                "report": times["export_queued_at"] - (received + run_s),  # report applied, exports queued
                "export": sr_at - times["export_queued_at"],  # outbox poll + C-STORE to the destination
            }
        rows.append(row)
        print(f"    {study.family.kind:8s} ingest {ingest_s:5.2f} s   completion -> SR {row['latency_s']:5.2f} s")
    return rows


def measure_throughput(run: Phase, studies: list[Study]) -> dict[str, Any]:
    """Every study sent back to back (the queue stays full); studies/hour from first completion to last SR."""
    for study in studies:
        send(study, run.node.dicom_port)
    arrivals = [wait_for_sr(run.node, run.dest, study.uid) for study in studies]
    first = min(float(index_times(run.node.settings, s.uid)["completed_at"] or 0.0) for s in studies)
    seconds = max(arrivals) - first
    return {"studies": len(studies), "seconds": seconds, "studies_per_hour": len(studies) / seconds * 3600}


# --- stages in this process ------------------------------------------------------------------


@dataclass
class _Precomputed(LoadedModel):
    """A loaded model whose probabilities were computed already: ``run_model`` on it times only
    what follows the network (study scores, masks on the source grid, lesions)."""

    probs: torch.Tensor | None = None

    def probabilities(self, selected: SelectedSeries) -> torch.Tensor:
        assert self.probs is not None
        return self.probs


def stage_profile(settings: Settings, study: Study) -> dict[str, float]:
    """Re-run one delivered study's job here, step by step: where the worker's task time goes."""
    conn = sqlite3.connect(settings.node.index_path, timeout=30)
    try:
        (payload,) = conn.execute("SELECT payload FROM jobs WHERE job_id=?",
                                  (job_id_for(study.uid, 1, study.family.pipeline),)).fetchone()
    finally:
        conn.close()
    job = DispatchMessage.model_validate_json(payload)
    processor = StudyProcessor(settings)
    model = processor.models().get(job.pipeline)  # loading is the worker's start-up, not the task's
    context = ResultContext(manufacturer=settings.node.manufacturer,
                            software_version=importlib.metadata.version("pacsnode"), uid_root=settings.node.uid_root)
    clock = time.perf_counter()

    def lap() -> float:
        nonlocal clock
        now = time.perf_counter()
        elapsed, clock = now - clock, now
        return elapsed

    selected = select_series(processor.store_root, job.series, model.card.applies_to)
    select_s = lap()
    for item in selected.slices:
        image_input(item.path, item.frame, model.card.input)
    decode_s = lap()
    probs = model.probabilities(selected)  # decodes again, then runs the network
    network_s = lap()
    outcome = run_model(_Precomputed(model.folder, model.card, model.network, model.device, probs), job, selected)
    post_s = lap()
    results = build_results(outcome, context, previous=[])
    build_s = lap()
    for _, ds in results.all():
        encode(ds)
    return {"select_headers": select_s, "decode_preprocess": decode_s, "network": network_s - decode_s,
            "postprocess": post_s, "build_sr_seg_ko_sc": build_s, "serialise": lap()}


# --- report ----------------------------------------------------------------------------------


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def summarise(rows: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family.kind]
        latencies = [r["latency_s"] for r in mine]
        parts = [r["parts_s"] for r in mine if "parts_s" in r]
        median = statistics.median(latencies)
        out[family.kind] = {
            "pipeline": family.pipeline, "studies": len(mine), "instances": mine[0]["instances"],
            "latency_median_s": median, "latency_p90_s": p90(latencies), "target_s": family.target_s,
            "ratio_to_target": median / family.target_s, "meets_target": p90(latencies) < family.target_s,
            "ingest_median_s": statistics.median(r["ingest_s"] for r in mine),
            "parts_median_s": {k: statistics.median(p[k] for p in parts) for k in parts[0]} if parts else {},
            # one worker, studies back to back: its capacity is one study per task run
            "worker_studies_per_hour": 3600 / statistics.median(p["task"] for p in parts) if parts else None,
        }
    return out


def machine_info(load_before: tuple[float, float, float]) -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "pacsnode": importlib.metadata.version("pacsnode"),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "cpus_shared": shared_cpus(load_before)}


def shared_cpus(load_before: tuple[float, float, float]) -> bool:
    """Whether other work used the CPUs: judged on the load before the run (the run loads them itself)."""
    return load_before[0] / (os.cpu_count() or 1) > HIGH_LOAD_PER_CORE


def print_report(summary: dict[str, Any], throughput: dict[str, Any], stages: dict[str, dict[str, float]],
                 load_before: tuple[float, float, float]) -> None:
    print("\ncompletion -> SR at the destination, one CPU worker, models at 128 px (untrained ResNet-18)")
    print(f"{'family':9s} {'n':>2s} {'median':>7s} {'p90':>7s} {'target':>7s} {'ratio':>6s}  {'':4s} "
          f"{'ingest':>7s} {'worker/h':>8s}")
    for kind, s in summary.items():
        verdict = "PASS" if s["meets_target"] else "MISS"
        per_hour = f"{s['worker_studies_per_hour']:.0f}" if s["worker_studies_per_hour"] else "-"
        print(f"{kind:9s} {s['studies']:2d} {s['latency_median_s']:6.2f}s {s['latency_p90_s']:6.2f}s "
              f"{s['target_s']:6.1f}s {s['ratio_to_target']:5.2f}x  {verdict} {s['ingest_median_s']:6.2f}s "
              f"{per_hour:>8s}")
    print("\nwhere the time goes (median s): dispatch | to worker | task | report | export")
    for kind, s in summary.items():
        p = s["parts_median_s"]
        if p:
            print(f"  {kind:9s} {p['dispatch']:.3f} | {p['to_worker']:.3f} | {p['task']:.3f} | "
                  f"{p['report']:.3f} | {p['export']:.3f}")
    if stages:
        print("inside the task (one study, re-run in the bench process, s): "
              "headers | decode+preprocess | network | scores/masks/lesions | build SR/SEG/KO/SC | serialise")
        for kind, st in stages.items():
            print(f"  {kind:9s} " + " | ".join(f"{v:.3f}" for v in st.values()))
    for name, t in throughput.items():
        print(f"throughput, {name}: {t['studies']} mixed studies back to back in {t['seconds']:.1f} s = "
              f"{t['studies_per_hour']:.0f} studies/h")
    if shared_cpus(load_before):
        print(f"\nNOTE: load average {load_before[0]:.2f} on {os.cpu_count()} cores before the run: other work shared "
              "the CPUs; the figures are pessimistic.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one study a family, one worker only, no JSON written")
    parser.add_argument("--studies", type=int, help="measured studies a family (default 5, --quick 1)")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    args = parser.parse_args(argv)
    configure_logging(load_settings(None, logging={"json": False, "level": "WARNING"}).logging)
    plan = Plan.quick() if args.quick else Plan.full()
    if args.studies:
        plan = Plan(args.studies, plan.slices, plan.size, plan.cxr_size, plan.two_workers)
    load_before = os.getloadavg()
    started = time.perf_counter()
    print(f"e2e: {plan.studies} studies a family (CXR {plan.cxr_size} px, CT/MR {plan.slices}x{plan.size}x{plan.size}), "
          f"models at {MODEL_SIZE} px, load average {load_before[0]:.2f}")
    studies = phantom_studies(plan)
    warmups = [studies[f.kind][0] for f in FAMILIES]
    measured = [s for f in FAMILIES for s in studies[f.kind][1:]]
    throughput: dict[str, Any] = {}
    stages: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pacsnode-e2e-") as tmp:
        work = Path(tmp)
        install_untrained_models(work / "models", size=MODEL_SIZE, seg_threshold=MR_MASK_THRESHOLD)
        print("  latency: one worker, one study at a time")
        with phase(work, "latency", work / "models", 1, warmups) as run:
            rows = measure_latency(run, measured)
            settings = run.node.settings
        for family in FAMILIES:
            stages[family.kind] = stage_profile(settings, studies[family.kind][1])
        interleaved = [s for group in zip(*(studies[f.kind][1:] for f in FAMILIES), strict=True) for s in group]
        for count in (1, 2) if plan.two_workers else (1,):
            name = f"{count} worker{'s' if count > 1 else ''}"
            print(f"  throughput: {name}, {len(interleaved)} studies back to back")
            with phase(work, f"throughput-{count}", work / "models", count, warmups) as run:
                throughput[name] = measure_throughput(run, interleaved)
    summary = summarise(rows, plan)
    machine = machine_info(load_before)
    print_report(summary, throughput, stages, load_before)
    print(f"\nrun took {time.perf_counter() - started:.0f} s")
    if not args.quick and not args.no_write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        document = {"benchmark": "e2e", "utc": stamp, "plan": plan.__dict__, "model_size": MODEL_SIZE,
                    "families": summary, "throughput": throughput, "stages_s": stages, "runs": rows,
                    "machine": machine, "seconds": time.perf_counter() - started}
        for name in (f"e2e-{stamp}.json", "e2e-latest.json"):
            (RESULTS_DIR / name).write_text(json.dumps(document, indent=2, default=float) + "\n")
        print(f"wrote {RESULTS_DIR / 'e2e-latest.json'}")
    return 0  # a missed target is a finding, printed and recorded; failures raise

