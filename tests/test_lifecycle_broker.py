"""Node, broker and real worker processes: urgent before routine, the outbox surviving a broker
outage and a node restart, and the embedded default carrying a study all the way to an outcome."""

from __future__ import annotations

import re
import time
import urllib.request
from functools import partial
from pathlib import Path

import dicom_factory as f
import redis
from conftest import PrivateRedis, make_settings, wait_until
from lifecycle_support import queue_lengths, queued_task_ids, rows, state_of, study, worker_process

from node.service import Node


def metric(node: Node, name: str) -> float:
    """A sample of the node's /metrics, scraped over HTTP like Prometheus does."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_urgent_study_is_processed_before_routine_ones_queued_earlier(
    start_node, clean_redis: str, tmp_path: Path
) -> None:
    node = start_node(broker={"url": clean_redis})
    client = redis.Redis.from_url(clean_redis)
    routine = [f.cxr(), f.cxr(), f.mr_brain(8), f.cxr()]
    for n, datasets in enumerate(routine):  # routine first, each published before the next arrives
        f.send(datasets, tmp_path / f"routine-{n}", node.dicom_port)
        uid = str(datasets[0].StudyInstanceUID)
        assert wait_until(partial(lambda u: state_of(node.index, u) == "queued", uid), timeout=10)
    urgent = f.ct_head(8)
    urgent_uid = urgent[0].StudyInstanceUID
    f.send(urgent, tmp_path / "urgent", node.dicom_port)
    assert wait_until(lambda: state_of(node.index, urgent_uid) == "queued", timeout=10)
    assert queue_lengths(client, "pacsnode.ct-hemorrhage") == {"pacsnode.ct-hemorrhage": 1}
    assert queue_lengths(client, "pacsnode.cxr-abnormality") == {"pacsnode.cxr-abnormality:9": 3}

    all_uids = [d[0].StudyInstanceUID for d in routine] + [urgent_uid]
    log = tmp_path / "worker.log"
    with worker_process(node.settings, log, concurrency=1):
        assert wait_until(lambda: all(state_of(node.index, u) == "not_applicable" for u in all_uids),
                          timeout=60), log.read_text()[-3000:]
    for uid in all_uids:
        row = study(node.index, uid)
        assert row.reason.startswith("no model installed for pipeline"), row

    # With one worker process, jobs run one after the other: the order of their reports (applied
    # by the node as they arrive) is the processing order; so is the order the worker took them.
    order = [r["study_uid"] for r in rows(
        node.settings.node.index_path, "SELECT study_uid FROM jobs ORDER BY updated_at")]
    assert order[0] == urgent_uid, order
    taken = re.findall(r"Task pacsnode\.process_study\[([^\]]+)\] received", log.read_text())
    assert len(taken) == 5 and taken[0].startswith(urgent_uid + "/"), taken
    # The routine ones keep their arrival order among themselves (FIFO within a priority).
    assert [t.split("/")[0] for t in taken[1:] if "cxr" in t] == [
        d[0].StudyInstanceUID for d in routine if d[0].Modality == "DX"]


def test_outbox_holds_dispatches_while_the_broker_is_down_and_publishes_each_once(
    start_node, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    private_redis.stop()
    node = start_node(broker={"url": private_redis.url, "connect_timeout_s": 0.5})
    studies = [f.cxr(), f.cxr()]
    uids = [s[0].StudyInstanceUID for s in studies]
    for n, datasets in enumerate(studies):
        f.send(datasets, tmp_path / f"s{n}", node.dicom_port)
    assert wait_until(lambda: all(state_of(node.index, u) == "complete" for u in uids), timeout=10)
    errors = metric(node, "pacsnode_broker_errors_total")
    assert wait_until(lambda: metric(node, "pacsnode_broker_errors_total") > errors, timeout=20)
    assert all(state_of(node.index, u) == "complete" for u in uids)
    assert sorted(j.job_id for j in node.index.pending_jobs()) == sorted(f"{u}/v1/cxr-abnormality" for u in uids)
    assert metric(node, 'pacsnode_dispatches_published_total{pipeline="cxr-abnormality"}') == 0

    private_redis.start()  # same port, same (empty) data folder
    client = redis.Redis(host="127.0.0.1", port=private_redis.port)
    assert wait_until(lambda: all(state_of(node.index, u) == "queued" for u in uids), timeout=30)
    time.sleep(1.0)  # give a duplicate publish the chance to show
    assert sorted(queued_task_ids(client, "pacsnode.cxr-abnormality")) == sorted(
        f"{u}/v1/cxr-abnormality" for u in uids)
    assert node.index.pending_jobs() == []
    assert metric(node, 'pacsnode_dispatches_published_total{pipeline="cxr-abnormality"}') == 2


def test_pending_dispatches_survive_a_node_restart(private_redis: PrivateRedis, tmp_path: Path) -> None:
    private_redis.stop()
    settings = make_settings(tmp_path, broker={"url": private_redis.url, "connect_timeout_s": 0.5})
    first = Node(settings, with_worker=False)
    first.start()
    try:
        head = f.ct_head(8)
        uid = head[0].StudyInstanceUID
        f.send(head, tmp_path / "head", first.dicom_port)
        assert wait_until(lambda: state_of(first.index, uid) == "complete", timeout=10)
    finally:
        first.stop()
    assert [(j.job_id, j.state) for j in first.index.pending_jobs()] == [(f"{uid}/v1/ct-hemorrhage", "pending")]

    private_redis.start()
    client = redis.Redis(host="127.0.0.1", port=private_redis.port)
    assert queued_task_ids(client, "pacsnode.ct-hemorrhage") == []
    second = Node(make_settings(tmp_path, broker={"url": private_redis.url}), with_worker=False)
    assert second.settings.node.data_dir == settings.node.data_dir
    second.start()
    try:
        assert wait_until(lambda: state_of(second.index, uid) == "queued", timeout=15)
        time.sleep(1.0)
        assert queued_task_ids(client, "pacsnode.ct-hemorrhage") == [f"{uid}/v1/ct-hemorrhage"]
        (job,) = second.index.jobs_of(uid)
        assert (job.state, study(second.index, uid).version) == ("queued", 1)
    finally:
        second.stop()


def test_embedded_default_runs_a_real_worker_and_reports_not_applicable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)  # broker.url unset: kombu's filesystem transport below data_dir
    assert settings.broker.url is None
    node = Node(settings, with_worker=True)
    node.start()
    try:
        chest = f.cxr()
        uid = chest[0].StudyInstanceUID
        f.send(chest, tmp_path / "chest", node.dicom_port)
        assert wait_until(lambda: state_of(node.index, uid) == "not_applicable", timeout=60)
        first = study(node.index, uid)
        assert first.reason == "no model installed for pipeline 'cxr-abnormality'"
        (job,) = node.index.jobs_of(uid)
        assert (job.job_id, job.state, job.attempts) == (f"{uid}/v1/cxr-abnormality", "not_applicable", 1)

        # A late image of the finished study: version 2 goes round the same loop.
        late = f.image(uid, chest[0].SeriesInstanceUID, sop_class=f.DX_IMAGE, modality="DX", body_part="CHEST",
                       instance_number=2, slice_thickness=None)
        f.send([late], tmp_path / "late", node.dicom_port)
        assert wait_until(lambda: study(node.index, uid).version == 2
                          and state_of(node.index, uid) == "not_applicable", timeout=30)
        assert [(j.version, j.state) for j in node.index.jobs_of(uid)] == [
            (1, "not_applicable"), (2, "not_applicable")]
        assert metric(node, 'pacsnode_reports_total{state="processing"}') == 2
        assert metric(node, 'pacsnode_reports_total{state="not_applicable"}') == 2
        messages = settings.node.data_dir / "broker" / "messages"
        assert messages.is_dir() and list(messages.iterdir()) == []  # every message was consumed
    finally:
        node.stop()
