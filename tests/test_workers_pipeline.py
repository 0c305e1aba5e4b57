"""From C-STORE to results at a destination: real node, real Redis, real Celery worker processes.

The models are untrained (``workers_support``): these tests check the flow and the guarantees
(valid DICOM, one result set whatever happens to workers, reasons for what was not processed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import dicom_factory as f
import pytest
from conftest import free_port, wait_until
from lifecycle_support import rows, state_of, worker_process
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, KeyObjectSelectionDocumentStorage
from workers_support import (
    KIND_OF_TASK,
    TASKS,
    Destination,
    dciodvfy_errors,
    destination_scp,
    install_untrained_models,
    phantoms,
    study_files,
)

from node.send import SendReport, scan, send_files
from node.service import Node

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _node(start_node: Any, tmp_path: Path, redis_url: str, dest_port: int, **extra: dict[str, Any]) -> Node:
    node: Node = start_node(
        broker={"url": redis_url},
        destinations=[{"name": "pacs", "host": "127.0.0.1", "port": dest_port, "ae_title": "DEST"}],
        **extra,
    )
    return node


def _send_paths(paths: list[Path], port: int) -> None:
    report = SendReport()
    result = send_files(scan(paths, report), "127.0.0.1", port, "PACSNODE")
    assert not result.failed and result.sent == len(paths), result


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _job(node: Node, study_uid: str) -> Any:
    (job,) = node.index.jobs_of(study_uid)
    return job


def _results_at(dest: Destination, study_uid: str) -> list[Dataset]:
    return [ds for ds in dest.of_study(study_uid) if str(ds.SOPClassUID) != ""]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    install_untrained_models(tmp_path / "models")
    return tmp_path / "models"


def test_each_family_flows_to_valid_results_at_the_destination(start_node, clean_redis: str, tmp_path: Path,
                                                               models: Path) -> None:
    data = tmp_path / "phantoms"
    manifest = phantoms(data, tuple(KIND_OF_TASK.values()), slices=10, size=64)
    port = free_port()
    with destination_scp(port) as dest:
        node = _node(start_node, tmp_path, clean_redis, port)
        with worker_process(node.settings, tmp_path / "worker.log"):
            for record in manifest.studies:
                _send_paths(study_files(data, record.study_uid), node.dicom_port)
            studies = [record.study_uid for record in manifest.studies]
            assert wait_until(lambda: all(state_of(node.index, s) in ("done", "failed", "not_applicable")
                                          for s in studies), timeout=240), (tmp_path / "worker.log").read_text()[-3000:]
            for uid in studies:
                assert state_of(node.index, uid) == "done", _job(node, uid).reason
            assert wait_until(lambda: all(any(str(ds.SOPClassUID) == Comprehensive3DSRStorage
                                              for ds in dest.of_study(s)) for s in studies), timeout=60)
    received = dest.datasets()
    by_study: dict[str, list[Dataset]] = {}
    for ds in received:
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    for record in manifest.studies:
        classes = sorted(str(ds.SOPClassUID) for ds in by_study[record.study_uid])
        # SR (and SEG) only: this destination reads SR/SEG, so KO and SC stay home.
        assert KeyObjectSelectionDocumentStorage not in classes
        assert classes.count(Comprehensive3DSRStorage) == 1
        if record.kind == "mr-brain":
            assert classes.count(SEG_STORAGE) <= 1
    # Every delivered object passes dciodvfy, and so do the KO and SC kept in the store.
    store_results = [p for p in node.settings.node.store_path.rglob("*.dcm")
                     if (rows(node.settings.node.index_path, "SELECT 1 FROM produced WHERE sop_uid=?", (p.stem,)))]
    assert len(store_results) >= 3 * len(manifest.studies)
    for path in store_results:
        assert dciodvfy_errors(path) == [], path
    for task in TASKS:
        (job,) = [j for uid in by_study for j in node.index.jobs_of(uid) if j.pipeline == task]
        assert job.state == "done"
    (findings,) = rows(node.settings.node.index_path, "SELECT findings FROM jobs WHERE pipeline='mr-metastasis'")
    metastasis = json.loads(findings["findings"])["metastasis"]
    assert isinstance(metastasis["lesions"], int) and metastasis["present"] == (metastasis["lesions"] > 0)
    # What the study page shows: the model's card figures and a key image per job, CT in its first window.
    for job in rows(node.settings.node.index_path, "SELECT pipeline, model, key_images FROM jobs"):
        model, keys = json.loads(job["model"]), json.loads(job["key_images"])
        assert model["name"] == job["pipeline"] and model["outputs"], job["pipeline"]
        assert len(keys) >= 1 and all(k["findings"] for k in keys), job["pipeline"]
        assert all((k["window"] is not None) == (job["pipeline"] == "ct-hemorrhage") for k in keys)


def test_worker_killed_mid_task_still_delivers_one_identical_result_set(
        start_node, clean_redis: str, tmp_path: Path, models: Path) -> None:
    data = tmp_path / "phantoms"
    manifest = phantoms(data, ("ct-head",), slices=48, size=128)
    (record,) = manifest.studies
    port = free_port()
    with destination_scp(port) as dest:
        node = _node(start_node, tmp_path, clean_redis, port)
        with worker_process(node.settings, tmp_path / "worker.log") as worker:
            assert wait_until(lambda: len(_children(worker.pid)) == 1, timeout=60)
            _send_paths(study_files(data, record.study_uid), node.dicom_port)
            assert wait_until(lambda: state_of(node.index, record.study_uid) == "processing", timeout=60)
            (child,) = _children(worker.pid)
            os.kill(child, signal.SIGKILL)
            assert wait_until(lambda: state_of(node.index, record.study_uid) == "done", timeout=180), \
                (tmp_path / "worker.log").read_text()[-3000:]
            assert _job(node, record.study_uid).attempts == 2
            assert wait_until(lambda: any(str(ds.SOPClassUID) == Comprehensive3DSRStorage
                                          for ds in dest.of_study(record.study_uid)), timeout=60)
            first = dict(dest.received)
            stores = dest.stores
            # The same job delivered again (a duplicate delivery): same instances, same bytes, no new send.
            job = _job(node, record.study_uid)
            with node.index.transaction() as conn:
                conn.execute("UPDATE jobs SET state='pending' WHERE job_id=?", (job.job_id,))
            log = tmp_path / "worker.log"
            assert wait_until(lambda: log.read_text().count("succeeded") == 2, timeout=120), log.read_text()[-3000:]
            assert wait_until(lambda: state_of(node.index, record.study_uid) == "done", timeout=30)
            time.sleep(3)  # time for a (wrong) second export to arrive
    assert dest.stores == stores
    assert set(dest.received) == set(first)
    assert all(dest.received[uid] == blob for uid, blob in first.items())


def test_a_study_that_keeps_killing_its_worker_ends_failed(start_node, clean_redis: str, tmp_path: Path,
                                                           models: Path) -> None:
    data = tmp_path / "phantoms"
    manifest = phantoms(data, ("ct-head",), slices=48, size=128)
    (record,) = manifest.studies
    node = _node(start_node, tmp_path, clean_redis, free_port())
    with worker_process(node.settings, tmp_path / "worker.log", PACSNODE_WORKERS__MAX_ATTEMPTS="2") as worker:
        assert wait_until(lambda: len(_children(worker.pid)) == 1, timeout=60)
        _send_paths(study_files(data, record.study_uid), node.dicom_port)
        for attempt in (1, 2):  # the study "kills" each worker child that takes it
            assert wait_until(lambda attempt=attempt: state_of(node.index, record.study_uid) == "processing"
                              and _job(node, record.study_uid).attempts == attempt, timeout=120)
            (child,) = _children(worker.pid)
            os.kill(child, signal.SIGKILL)
        assert wait_until(lambda: state_of(node.index, record.study_uid) == "failed", timeout=120), \
            (state_of(node.index, record.study_uid), (tmp_path / "worker.log").read_text()[-4000:])
    job = _job(node, record.study_uid)
    assert "stopped after 2 attempts" in job.reason


def test_studies_no_model_applies_to_end_with_a_reason(start_node, clean_redis: str, tmp_path: Path,
                                                       models: Path) -> None:
    node = _node(start_node, tmp_path, clean_redis, free_port())
    derived = f.mr_brain(count=8)
    for ds in derived:
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
    (tmp_path / "models" / "cxr-abnormality").rename(tmp_path / "cxr-model-removed")
    chest = f.cxr()
    with worker_process(node.settings, tmp_path / "worker.log"):
        f.send(derived, tmp_path / "derived", node.dicom_port)
        f.send(chest, tmp_path / "chest", node.dicom_port)
        for ds in (derived[0], chest[0]):
            assert wait_until(lambda ds=ds: state_of(node.index, ds.StudyInstanceUID) == "not_applicable",
                              timeout=120), (tmp_path / "worker.log").read_text()[-3000:]
    assert "localizer or derived image x8" in _job(node, derived[0].StudyInstanceUID).reason
    assert "no model installed for pipeline 'cxr-abnormality'" in _job(node, chest[0].StudyInstanceUID).reason


def test_two_workers_on_one_queue_share_the_work(start_node, clean_redis: str, tmp_path: Path,
                                                 models: Path) -> None:
    data = tmp_path / "phantoms"
    manifest = phantoms(data, ("cxr",), studies=6, size=64)
    port = free_port()
    with destination_scp(port) as dest:
        node = _node(start_node, tmp_path, clean_redis, port)
        with worker_process(node.settings, tmp_path / "w1.log"), worker_process(node.settings, tmp_path / "w2.log"):
            for record in manifest.studies:
                _send_paths(study_files(data, record.study_uid), node.dicom_port)
            uids = [r.study_uid for r in manifest.studies]
            assert wait_until(lambda: all(state_of(node.index, u) == "done" for u in uids), timeout=180)
            assert wait_until(lambda: len(dest.received) == len(uids), timeout=60)
        logs = [(tmp_path / name).read_text() for name in ("w1.log", "w2.log")]
    assert all("succeeded" in log for log in logs), "each worker should have processed a study"
    assert len({str(ds.SOPInstanceUID) for ds in dest.datasets()}) == len(uids)
