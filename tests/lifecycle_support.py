"""Helpers of the study-lifecycle tests: real worker processes, CLI runs, index and broker probes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dicom_factory as f
import redis
from conftest import wait_until
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from config.settings import Settings
from node.child_process import pacsnode_command
from node.index import StudyIndex, StudyRow
from node.service import Node

CLI = pacsnode_command()


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment that points a ``pacsnode`` subprocess at the same node as ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    env.update({
        "PACSNODE_NODE__DATA_DIR": str(settings.node.data_dir),
        "PACSNODE_WORKERS__MODELS_DIR": str(settings.workers.models_dir),
        "PACSNODE_LOGGING__JSON": "false",
    })
    if settings.broker.url is not None:
        env["PACSNODE_BROKER__URL"] = settings.broker.url.get_secret_value()
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, env=env, timeout=timeout)


@contextmanager
def worker_process(settings: Settings, log: Path, concurrency: int = 1,
                   **env_extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``pacsnode worker`` (Celery, prefork) on the node's broker, stopped on exit; ``env_extra``
    are further ``PACSNODE_*`` settings of the worker alone."""
    env = cli_env(settings, **env_extra)
    name = f"lifecycle-{uuid.uuid4().hex[:8]}@localhost"
    with log.open("wb") as out:
        process = subprocess.Popen([*CLI, "worker", "--concurrency", str(concurrency), "--name", name],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL if it has not ended within ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def study(index: StudyIndex, study_uid: str) -> StudyRow:
    row = index.study(study_uid)
    assert row is not None, f"study {study_uid} not in the index"
    return row


def state_of(index: StudyIndex, study_uid: str) -> str | None:
    row = index.study(study_uid)
    return row.state if row else None


def rows(index_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read the node's SQLite index directly (a separate connection, as an operator would)."""
    conn = sqlite3.connect(index_path, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def queued_task_ids(client: redis.Redis, queue: str) -> list[str]:
    """Celery task ids waiting in a pipeline queue, over all of kombu's priority sub-lists."""
    ids = []
    for key in sorted(_text(k) for k in client.keys(f"{queue}*")):
        if key != queue and not key.startswith(f"{queue}:"):
            continue
        for raw in client.lrange(key, 0, -1):
            ids.append(str(json.loads(raw)["headers"]["id"]))
    return ids


def queue_lengths(client: redis.Redis, queue: str) -> dict[str, int]:
    """Messages per kombu priority list of a queue, e.g. {'pacsnode.x': 1, 'pacsnode.x:9': 2}."""
    keys = [_text(k) for k in client.keys(f"{queue}*")]
    return {k: int(client.llen(k)) for k in keys if (k == queue or k.startswith(f"{queue}:")) and client.llen(k)}


def mpps_association(port: int) -> Any:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    return assoc


def mpps_in_progress(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = "PPS1"
    ds.Modality = "CT"
    ds.PerformedStationAETitle = "MODALITY"
    ds.PerformedProcedureStepStartDate = "20240611"
    ds.PerformedProcedureStepStartTime = "120000"
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.AccessionNumber = "ACC1"
    item.ScheduledProcedureStepID = "SPS1"
    ds.ScheduledStepAttributesSequence = [item]
    ds.PerformedSeriesSequence = []
    return ds


def mpps_completed(images: list[Dataset]) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = "20240611"
    ds.PerformedProcedureStepEndTime = "121000"
    series: dict[str, Dataset] = {}
    for image in images:
        entry = series.get(image.SeriesInstanceUID)
        if entry is None:
            entry = Dataset()
            entry.SeriesInstanceUID = image.SeriesInstanceUID
            entry.Modality = image.Modality
            entry.ReferencedImageSequence = []
            series[image.SeriesInstanceUID] = entry
        ref = Dataset()
        ref.ReferencedSOPClassUID = image.SOPClassUID
        ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
        entry.ReferencedImageSequence.append(ref)
    ds.PerformedSeriesSequence = list(series.values())
    return ds


def queued_chest_study(node: Node, folder: Path) -> str:
    """Send one phantom chest radiograph and wait until its job is published; returns its study UID."""
    chest = f.cxr()
    uid = str(chest[0].StudyInstanceUID)
    f.send(chest, folder, node.dicom_port)
    assert wait_until(lambda: state_of(node.index, uid) == "queued", timeout=10)
    return uid
