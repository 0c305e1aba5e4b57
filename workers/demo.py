"""``pacsnode demo``: the whole product on one box in a few minutes, on embedded defaults.

1. Models: a phantom archive is pretrained with SwAV (short), the encoder is finetuned on a labelled
   phantom set for each of the three tasks and registered; a later run reuses the registered models.
2. A node starts on loopback with its embedded broker and worker, and a local storage SCP stands in
   for the PACS as the results' destination.
3. New phantom studies (other patients than the training sets) are sent; the demo waits until each
   study's results were stored at the destination, prints the findings and where the SR/SEG files
   are, and exits 0 (1 if a study did not complete).
"""

from __future__ import annotations

import math
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from rich.console import Console
from rich.table import Table

from config.registry_layout import installed_versions
from config.settings import Settings, load_settings
from models.card import read_card
from models.finetune import FinetuneConfig
from models.registry import next_version, register
from models.tasks import task_spec
from models.training import train_task_model
from node.index import StudyIndex
from node.messages import ResultKind
from node.send import Outgoing, SendReport, scan, send_files
from node.service import Node
from node.synth import generate
from node.synth.spec import Difficulty
from node.worklist import Worklist, duration_text
from pretrain.config import load_config
from pretrain.pipeline import shard_archive, train_and_export
from pretrain.runtime import pick_device
from pretrain.shards import ShardSet

TASK_KINDS = {"cxr-abnormality": "cxr", "ct-hemorrhage": "ct-head", "mr-metastasis": "mr-brain"}
SIZE = 64  # the demo's working size: small enough for a CPU, large enough for the phantoms' lesions
TASK_SIZE = {"ct-hemorrhage": 96}  # a bleed under 64 px is a few pixels: head CT gets more
SLICES = 16
DIFFICULTY = "easy"  # big, bright lesions: models a CPU trains in a minute pass their gates on them
FINISHED = ("done", "failed", "not_applicable", "unmatched")
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # the phantoms' ground truth stays home
GIVE_UP_AFTER_FAILURES = 2  # the embedded worker exited this often in a row: it will not come up


@dataclass(frozen=True)
class DemoPlan:
    """How big each part of the demo is; ``quick`` is what the tests run."""

    archive: dict[str, int] = field(default_factory=lambda: {"cxr": 48, "ct-head": 8, "mr-brain": 8})
    # Enough labelled studies that each task's validation fifth holds the 10 positives and 10
    # negatives a finding's operating threshold needs ("any" at prevalence 0.5); MR is judged by Dice.
    labelled: dict[str, int] = field(default_factory=lambda: {"cxr": 120, "ct-head": 110, "mr-brain": 40})
    incoming: dict[str, int] = field(default_factory=lambda: {"cxr": 2, "ct-head": 1, "mr-brain": 1})
    pretrain_steps: int = 40
    finetune_steps: int = 120
    timeout_s: float = 240.0
    # The model gates of production finetuning; the quick plan's models (a few steps on a handful of
    # phantoms) cannot pass them, and it exists to show the flow, so their cards say "not gated".
    gated: bool = True

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(archive={"cxr": 8, "ct-head": 2, "mr-brain": 2}, labelled={"cxr": 15, "ct-head": 10, "mr-brain": 10},
                   incoming={"cxr": 1, "ct-head": 1, "mr-brain": 1}, pretrain_steps=4, finetune_steps=4, gated=False)


def _synth(out: Path, counts: dict[str, int], seed: int, prefix: str) -> None:
    for kind, studies in counts.items():
        if studies and not (out / kind / "manifest.json").is_file():
            generate(out / kind, studies, [kind], seed, Difficulty.preset(DIFFICULTY), ct_slices=SLICES,
                     mr_slices=SLICES, ct_size=SIZE * 2, mr_size=SIZE * 2, cxr_size=SIZE * 4, patient_prefix=prefix)


def build_models(work: Path, models_dir: Path, plan: DemoPlan, console: Console) -> None:
    """Pretrain an encoder on the phantom archive and finetune + register one model per task (skipped for
    tasks whose newest registered model this version reads; one of an older card format is replaced
    by a new version)."""
    missing = [task for task in TASK_KINDS if not _current(models_dir, task)]
    if not missing:
        console.print(f"models: reusing {', '.join(f'{t}@{installed_versions(models_dir, t)[-1]}' for t in TASK_KINDS)}")
        return
    started = time.perf_counter()
    console.print("models: phantom archive -> SwAV encoder -> finetuned task models (built once, then reused)")
    _synth(work / "archive", plan.archive, seed=11, prefix="AR")
    shards = shard_archive([work / "archive"], work / "pretrain", size=SIZE, workers=1, progress=False)
    batch = 16
    epochs = max(1, math.ceil(plan.pretrain_steps * batch / len(ShardSet(shards))))
    config = load_config(None, {
        "model": {"encoder": {"arch": "resnet18", "in_channels": 3}, "hidden_dim": 128, "out_dim": 32,
                  "prototypes": 30},
        "crops": [{"size": SIZE, "count": 2, "scale": [0.3, 1.0]}, {"size": SIZE // 2, "count": 2, "scale": [0.1, 0.3]}],
        "swav": {"freeze_prototypes_steps": 5, "queue_length": 0},
        "optim": {"name": "adamw", "lr": 0.01, "warmup_steps": 4, "final_lr": 0.0, "weight_decay": 1e-4},
        "run": {"batch_size": batch, "epochs": epochs, "loader_workers": 0, "checkpoint_every": 1000, "amp": "bf16",
                "device": "auto"},
    })
    encoder = train_and_export(shards, work / "pretrain", config, progress=False, console=console).encoder_dir
    console.print(f"  encoder pretrained ({plan.pretrain_steps} SwAV steps) in {time.perf_counter() - started:.0f} s")
    _synth(work / "labelled", plan.labelled, seed=12, prefix="LB")
    device = str(pick_device("auto"))
    for task in missing:
        folder = work / "labelled" / TASK_KINDS[task]
        slice_labels = folder / "slice_labels.csv" if task == "ct-hemorrhage" else None
        recipe = FinetuneConfig(input=task_spec(task).input.model_copy(update={"size": TASK_SIZE.get(task, SIZE)}),
                                steps=plan.finetune_steps, batch_size=16, warmup_steps=4, eval_every=20,
                                patience=4, lr=3e-3 if task == "mr-metastasis" else 1e-3, device=device)
        if not plan.gated:
            recipe = recipe.model_copy(update={"finding_auc_gate": 0.0, "dice_gate": 0.0})
        version = next_version(models_dir, task)
        shutil.rmtree(work / "finetune" / task, ignore_errors=True)
        trained = train_task_model(task, folder, folder / "labels.csv", recipe, init=str(encoder),
                                   out=work / "finetune" / task, name=task, version=version, slice_labels=slice_labels)
        register(models_dir, trained.folder)
        card = trained.card
        console.print(f"  {task}@{version}: {'deployable' if card.deployable else 'NOT deployable'} ({card.deployability}); "
                      f"{sum(o.assessed for o in card.outputs)} of {len(card.outputs)} findings assessed "
                      f"({time.perf_counter() - started:.0f} s)")


def _current(models_dir: Path, task: str) -> bool:
    """A model of ``task`` is registered and its newest card is of the format this version reads."""
    known = installed_versions(models_dir, task)
    if not known:
        return False
    try:
        read_card(models_dir / task / known[-1])
    except ValueError:
        return False
    return True


@dataclass
class LocalPacs:
    """The demo's destination: a storage SCP writing what it receives below ``folder``."""

    folder: Path
    port: int
    files: dict[str, Path] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: Event) -> int:
        ds: Dataset = event.dataset
        path = self.folder / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(event.encoded_dataset()))
        with self.lock:
            self.files[str(ds.SOPInstanceUID)] = path
        return 0x0000


@contextmanager
def local_pacs(folder: Path) -> Iterator[LocalPacs]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    pacs = LocalPacs(folder, port)
    ae = AE(ae_title="DEMOPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, pacs.on_store)])
    assert server is not None  # block=False always returns the running server
    try:
        yield pacs
    finally:
        server.shutdown()


def demo_settings(work: Path, models_dir: Path, pacs: LocalPacs) -> Settings:
    """Embedded defaults (no Redis: the embedded broker and worker), on loopback, free ports."""
    return load_settings(None, node={"data_dir": work / "node", "host": "127.0.0.1", "port": 0, "quiet_period_s": 2.0,
                                     "min_free_disk_mb": 64},
                         http={"port": 0}, workers={"embedded": True, "models_dir": models_dir,
                                                         "embedded_log": work / "node" / "worker.log"},
                         destinations=[{"name": "demo-pacs", "host": "127.0.0.1", "port": pacs.port,
                                        "ae_title": "DEMOPACS"}],
                         logging={"json": False, "level": "WARNING"})


def _delivered(index: StudyIndex, study_uid: str) -> bool:
    """Finished, and every result export reached its destination (or none was due)."""
    study = index.study(study_uid)
    if study is None or study.state not in FINISHED:
        return False
    return all(row.state != "pending" for row in index.exports_of(study_uid))


def run_demo(work: Path, plan: DemoPlan, console: Console, on_node: Callable[[Node], None] = lambda node: None) -> bool:
    """Build or reuse the models, run the node, send the studies, print the findings; True if all were delivered."""
    models_dir = work / "models"
    build_models(work, models_dir, plan, console)
    for stale in ("incoming", "node", "destination"):  # each run: new studies, a fresh node and PACS
        shutil.rmtree(work / stale, ignore_errors=True)
    _synth(work / "incoming", plan.incoming, seed=int(time.time()) % 100_000, prefix="DM")
    with local_pacs(work / "destination") as pacs:
        node = Node(demo_settings(work, models_dir, pacs), with_worker=True)
        node.start()
        on_node(node)
        try:
            studies = _send_incoming(work / "incoming", node, console)
            sent_at = time.monotonic()
            stopped = wait_for_results(node, studies, plan.timeout_s)
            if stopped is not None:
                console.print(f"stopped waiting after {time.monotonic() - sent_at:.1f} s: {stopped} "
                              f"(worker log: {work / 'node' / 'worker.log'})")
            else:
                console.print(f"results back {time.monotonic() - sent_at:.1f} s after the last study was sent "
                              f"(worker log: {work / 'node' / 'worker.log'})")
            ok = _print_results(node.index, studies, pacs, console) and stopped is None
        finally:
            node.stop()
    return ok


def wait_for_results(node: Node, studies: list[str], timeout_s: float) -> str | None:
    """Wait until every study's results were delivered; the reason when waiting is pointless (the
    embedded worker keeps failing: it exited twice in a row soon after starting) or timed out."""
    deadline = time.monotonic() + timeout_s
    while not all(_delivered(node.index, uid) for uid in studies):
        worker = node.worker.health() if node.worker is not None else None
        if worker is not None and worker.failing and worker.failures >= GIVE_UP_AFTER_FAILURES:
            return worker.summary()
        if time.monotonic() >= deadline:
            return f"not all results were back within {timeout_s:.0f} s"
        time.sleep(0.5)
    return None


def _send_incoming(folder: Path, node: Node, console: Console) -> list[str]:
    report = SendReport()
    images = [o for o in scan(sorted(folder.rglob("*.dcm")), report) if o.sop_class != SEG_STORAGE]
    result = send_files(images, "127.0.0.1", node.dicom_port, node.settings.node.ae_title)
    if result.failed:
        raise RuntimeError(f"{len(result.failed)} instances were refused by the node")
    studies = sorted({_study_uid(item) for item in images})
    console.print(f"sent {result.sent} instances of {len(studies)} studies to the node on port {node.dicom_port}")
    return studies


def _study_uid(item: Outgoing) -> str:
    return str(pydicom.dcmread(item.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)


def _print_results(index: StudyIndex, studies: list[str], pacs: LocalPacs, console: Console) -> bool:
    """One row per study: its state, the findings with their calibrated probabilities, thresholds and calls
    (or why a finding is not assessed), the processing time and the SR/SEG files."""
    worklist = Worklist(index)
    table = Table("study", "state", "findings (calibrated probability, threshold, call)", "AI time",
                  "SR / SEG at the local PACS", show_lines=True)
    ok = True
    for uid in studies:
        detail = worklist.study(uid)
        if detail is None:
            ok = False
            table.add_row(f"…{uid[-12:]}", "missing", "", "", "")
            continue
        entry = detail.study
        ok = ok and entry.state == "done" and _delivered(index, uid)
        findings = "\n".join(f"{p.pipeline}@{p.reason.rpartition('@')[2]}: " + ", ".join(f.text() for f in p.findings)
                             if p.findings else f"{p.pipeline}: {p.reason}" for p in entry.pipelines)
        files = [f"{e.kind.upper()} {pacs.files.get(e.sop_uid, '(not received)')}" for e in detail.exports
                 if e.kind in (ResultKind.SR.value, ResultKind.SEG.value)]
        table.add_row(f"…{uid[-12:]}", entry.state, findings, duration_text(entry.processing_s), "\n".join(files))
    console.print(table)
    return ok
