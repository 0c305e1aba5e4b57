"""Poison messages and unreadable dispatches: one bad item must not stall the lifecycle of every
other study (the node's threads keep running, and the bad item ends visibly failed)."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dicom_factory as f
import pytest
import redis
from conftest import free_port, make_settings, wait_until
from kombu import Producer
from lifecycle_support import queued_chest_study, queued_task_ids, state_of, study, worker_process

from node.broker import connection, report_queue
from node.messages import JobState, ReportMessage
from node.service import Node
from workers.reporting import publish_report


def test_an_undecodable_report_does_not_stop_the_report_consumer(
    start_node, clean_redis: str, tmp_path: Path
) -> None:
    node = start_node(broker={"url": clean_redis})
    uid = queued_chest_study(node, tmp_path / "in")
    (job,) = node.index.jobs_of(uid)
    queue = report_queue(node.settings)
    with connection(node.settings) as conn:
        producer = Producer(conn)
        # Something that is not ours on the report queue: a pickled payload, then JSON of the
        # wrong shape; then the worker's real reports.
        producer.publish(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", routing_key=queue.name,
                         declare=[queue], content_type="application/x-python-serialize",
                         content_encoding="binary")
        producer.publish({"hello": "world"}, routing_key=queue.name, declare=[queue], serializer="json")
        publish_report(conn, node.settings, ReportMessage(job_id=job.job_id, state=JobState.PROCESSING))
        publish_report(conn, node.settings, ReportMessage(job_id=job.job_id, state=JobState.DONE))
    assert wait_until(lambda: state_of(node.index, uid) == "done", timeout=10)
    client = redis.Redis.from_url(clean_redis)
    assert wait_until(lambda: client.llen(queue.name) == 0 and client.hlen("unacked") == 0, timeout=5)


def test_an_unreadable_pending_dispatch_fails_alone_and_the_others_are_published(
    clean_redis: str, tmp_path: Path
) -> None:
    dead = {"url": f"redis://127.0.0.1:{free_port()}/0", "connect_timeout_s": 0.5}
    first = Node(make_settings(tmp_path, broker=dead), with_worker=False)
    first.start()
    try:
        head, chest = f.ct_head(8), f.cxr()
        f.send(head + chest, tmp_path / "in", first.dicom_port)
        head_uid, chest_uid = head[0].StudyInstanceUID, chest[0].StudyInstanceUID
        assert wait_until(lambda: {state_of(first.index, head_uid), state_of(first.index, chest_uid)}
                          == {"complete"}, timeout=10)
    finally:
        first.stop()
    # The urgent job's payload as another version of the node would have written it.
    conn = sqlite3.connect(first.settings.node.index_path)
    with conn:
        (payload,) = conn.execute("SELECT payload FROM jobs WHERE study_uid=?", (head_uid,)).fetchone()
        changed = {**json.loads(payload), "cohort": "research"}
        conn.execute("UPDATE jobs SET payload=? WHERE study_uid=?", (json.dumps(changed), head_uid))
    conn.close()

    second = Node(make_settings(tmp_path, broker={"url": clean_redis}), with_worker=False)
    second.start()
    try:
        client = redis.Redis.from_url(clean_redis)
        assert wait_until(lambda: state_of(second.index, chest_uid) == "queued", timeout=10)
        assert queued_task_ids(client, "pacsnode.cxr-abnormality") == [f"{chest_uid}/v1/cxr-abnormality"]
        assert wait_until(lambda: state_of(second.index, head_uid) == "failed", timeout=5)
        (job,) = second.index.jobs_of(head_uid)
        assert job.state == "failed" and "dispatch payload" in job.reason
        assert queued_task_ids(client, "pacsnode.ct-hemorrhage") == []
        assert second.index.pending_jobs() == []
    finally:
        second.stop()


def _another_version(message: dict[str, Any]) -> None:
    message["cohort"] = "research"


def _path_leaving_the_store(message: dict[str, Any]) -> None:
    message["series"][0]["instances"] = ["../../../../etc/hostname"]


@pytest.mark.parametrize(("tamper", "reason"), [
    (_another_version, "dispatch message not readable by this worker"),
    (_path_leaving_the_store, "worker error: ValueError: path leaves the study store"),
], ids=["other-version", "worker-error"])
def test_a_dispatch_the_worker_cannot_process_ends_failed_not_stuck(
    tamper: Callable[[dict[str, Any]], None], reason: str, start_node, clean_redis: str, tmp_path: Path
) -> None:
    node = start_node(broker={"url": clean_redis})
    uid = queued_chest_study(node, tmp_path / "in")
    # Change the message while it waits in the broker, before any worker runs.
    client = redis.Redis.from_url(clean_redis)
    key = "pacsnode.cxr-abnormality:9"
    raw = client.lindex(key, 0)
    assert raw is not None
    envelope = json.loads(raw)
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    tamper(kwargs["message"])
    envelope["body"] = base64.b64encode(json.dumps([args, kwargs, embed]).encode()).decode()
    client.lset(key, 0, json.dumps(envelope))

    log = tmp_path / "worker.log"
    with worker_process(node.settings, log):
        assert wait_until(lambda: state_of(node.index, uid) == "failed", timeout=40), log.read_text()[-3000:]
    (job,) = node.index.jobs_of(uid)
    assert job.state == "failed" and job.reason.startswith(reason), job.reason
    assert study(node.index, uid).reason == job.reason
