"""Retention: old finished and old unmatched studies go (files and index rows), a study in flight
never does, a dry run deletes nothing, and the running node's own retention loop purges."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import dicom_factory as f
from conftest import free_port, make_settings, wait_until
from lifecycle_support import cli_env, rows, run_cli, state_of

from config.settings import RetentionSettings
from node.broker import connection
from node.index import StudyIndex
from node.messages import JobState, ReportMessage
from node.retention import DAY_S, apply_purge, plan_purge
from node.service import Node
from node.store import StudyStore
from workers.reporting import publish_report

NEVER_BY_DISK = {"max_disk_used_percent": 100.0}  # ages only: the test machine's disk use must not matter


def _report(node: Node, job_id: str, *states: JobState) -> None:
    with connection(node.settings) as conn:
        for state in states:
            publish_report(conn, node.settings, ReportMessage(job_id=job_id, state=state))


def _studies_in_every_state(tmp_path: Path, redis_url: str) -> dict[str, str]:
    """Drive real studies through real nodes into each state; returns state -> study UID."""
    uids: dict[str, str] = {}
    node = Node(make_settings(tmp_path, broker={"url": redis_url}), with_worker=False)
    node.start()
    try:
        spine = f.cxr(body_part="SPINE")
        chests = {state: f.cxr() for state in ("not_applicable", "done", "failed", "queued", "processing")}
        f.send(spine + [ds for datasets in chests.values() for ds in datasets], tmp_path / "p1", node.dicom_port)
        uids["unmatched"] = spine[0].StudyInstanceUID
        uids.update({state: datasets[0].StudyInstanceUID for state, datasets in chests.items()})
        assert wait_until(lambda: all(state_of(node.index, uids[s]) == "queued" for s in chests), timeout=10)
        outcome = {"not_applicable": JobState.NOT_APPLICABLE, "done": JobState.DONE, "failed": JobState.FAILED}
        for state, final in outcome.items():
            _report(node, node.index.jobs_of(uids[state])[0].job_id, JobState.PROCESSING, final)
        _report(node, node.index.jobs_of(uids["processing"])[0].job_id, JobState.PROCESSING)
        assert wait_until(lambda: all(state_of(node.index, uid) == state for state, uid in uids.items()),
                          timeout=10), {s: state_of(node.index, u) for s, u in uids.items()}
    finally:
        node.stop()
    # Second life of the same data folder: the broker is gone and the quiet period long, so one
    # study stays complete (pending dispatch) and one keeps receiving.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    node = Node(make_settings(tmp_path, node={"quiet_period_s": 120.0},
                              broker={"url": dead, "connect_timeout_s": 0.5}), with_worker=False)
    node.start()
    try:
        chest, head = f.cxr(), f.ct_head(8)
        f.send(chest + head, tmp_path / "p2", node.dicom_port)
        uids["complete"], uids["receiving"] = chest[0].StudyInstanceUID, head[0].StudyInstanceUID
        assert wait_until(lambda: state_of(node.index, uids["complete"]) == "complete", timeout=10)
        assert state_of(node.index, uids["receiving"]) == "receiving"
    finally:
        node.stop()
    return uids


def test_purge_takes_old_finished_and_unmatched_studies_and_never_one_in_flight(
    clean_redis: str, tmp_path: Path
) -> None:
    uids = _studies_in_every_state(tmp_path, clean_redis)
    settings = make_settings(tmp_path)
    index, store = StudyIndex(settings.node.index_path), StudyStore(settings.node.store_path)
    policy = RetentionSettings(processed_max_age_days=30, unmatched_max_age_days=7, **NEVER_BY_DISK)
    in_flight = {uids[s] for s in ("receiving", "complete", "queued", "processing")}
    finished = {uids[s] for s in ("done", "failed", "not_applicable")}
    now = time.time()

    assert plan_purge(index, store, policy, now) == []
    assert {i.study_uid for i in plan_purge(index, store, policy, now + 10 * DAY_S)} == {uids["unmatched"]}
    assert plan_purge(index, store, policy, now + 10 * DAY_S)[0].why == "older than 7 days"
    old = {i.study_uid for i in plan_purge(index, store, policy, now + 40 * DAY_S)}
    assert old == finished | {uids["unmatched"]}

    # Age every study by 40 days in the index itself, in flight or not, then ask the CLI.
    conn = sqlite3.connect(settings.node.index_path)
    with conn:
        conn.execute("UPDATE studies SET updated_at = updated_at - ?", (40 * DAY_S,))
    conn.close()
    env = cli_env(settings, PACSNODE_RETENTION__MAX_DISK_USED_PERCENT="100")
    instances_before = len(rows(settings.node.index_path, "SELECT * FROM instances"))

    dry = run_cli("purge", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: 4 studies would be purged" in dry.stdout
    listed = {line.split("\t")[0] for line in dry.stdout.splitlines() if "\t" in line}
    assert listed == old
    assert len(rows(settings.node.index_path, "SELECT * FROM instances")) == instances_before
    assert all((store.root / uid).is_dir() for uid in uids.values())

    purged = run_cli("purge", env=env)
    assert purged.returncode == 0, purged.stderr
    assert "purged 4 studies" in purged.stdout
    for uid in old:
        assert not (store.root / uid).exists(), uid
        for table in ("studies", "series", "instances", "jobs"):
            assert rows(settings.node.index_path, f"SELECT 1 FROM {table} WHERE study_uid=?", (uid,)) == [], table
    assert not any((store.quarantine / "purged").iterdir())  # retired folders were deleted, not kept
    for uid in in_flight:
        assert (store.root / uid).is_dir(), uid
        assert rows(settings.node.index_path, "SELECT 1 FROM studies WHERE study_uid=?", (uid,)), uid
    assert {r["state"] for r in rows(settings.node.index_path, "SELECT state FROM studies")} == {
        "receiving", "complete", "queued", "processing"}
    again = run_cli("purge", env=env)
    assert "purged 0 studies" in again.stdout


def test_apply_purge_skips_a_study_that_changed_after_it_was_planned(start_node, tmp_path: Path) -> None:
    node = start_node()
    spines = [f.cxr(body_part="SPINE") for _ in range(2)]
    f.send([ds for s in spines for ds in s], tmp_path / "in", node.dicom_port)
    kept, gone = (s[0].StudyInstanceUID for s in spines)
    assert wait_until(lambda: all(state_of(node.index, u) == "unmatched" for u in (kept, gone)), timeout=10)
    policy = RetentionSettings(unmatched_max_age_days=1, **NEVER_BY_DISK)
    plan = plan_purge(node.index, node.store, policy, time.time() + 2 * DAY_S)
    assert {i.study_uid for i in plan} == {kept, gone}
    f.send([f.key_object(kept)], tmp_path / "ko", node.dicom_port)  # the PACS sends something meanwhile
    assert apply_purge(node.index, node.store, plan)[0] == 1
    assert state_of(node.index, kept) == "unmatched" and (node.store.root / kept).is_dir()
    assert state_of(node.index, gone) is None and not (node.store.root / gone).exists()


def test_the_running_node_purges_by_itself(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = make_settings(tmp_path, broker={"url": dead, "connect_timeout_s": 0.5},
                             retention={"interval_s": 0.5, "unmatched_max_age_days": 2 / DAY_S, **NEVER_BY_DISK})
    node = Node(settings, with_worker=False)
    node.start()
    try:
        spine, chest = f.cxr(body_part="SPINE"), f.cxr()
        f.send(spine + chest, tmp_path / "in", node.dicom_port)
        spine_uid, chest_uid = spine[0].StudyInstanceUID, chest[0].StudyInstanceUID
        assert wait_until(lambda: state_of(node.index, spine_uid) == "unmatched", timeout=10)
        assert wait_until(lambda: state_of(node.index, spine_uid) is None, timeout=10)  # 2 s old: purged
        assert not (node.store.root / spine_uid).exists()
        assert state_of(node.index, chest_uid) == "complete"  # in flight (broker down): kept
        assert (node.store.root / chest_uid).is_dir()
    finally:
        node.stop()
