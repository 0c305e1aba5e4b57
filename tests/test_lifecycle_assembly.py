"""Study assembly over real associations: quiet period, re-opening as a new version, superseding,
routing expectations and MPPS completing a study before its quiet period ends."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dicom_factory as f
import redis
from conftest import free_port, wait_until
from lifecycle_support import (
    mpps_association,
    mpps_completed,
    mpps_in_progress,
    queued_task_ids,
    rows,
    state_of,
    study,
)
from pydicom.uid import generate_uid

from node.messages import DispatchMessage


def dead_broker() -> dict[str, object]:
    """A Redis URL nobody listens on: the dispatcher can never publish, jobs stay pending."""
    return {"url": f"redis://127.0.0.1:{free_port()}/0", "connect_timeout_s": 0.5}


def test_quiet_period_completes_the_study_and_a_late_instance_reopens_it_as_version_2(
    start_node, clean_redis: str, tmp_path: Path
) -> None:
    node = start_node(node={"quiet_period_s": 2.0}, broker={"url": clean_redis})  # no worker
    client = redis.Redis.from_url(clean_redis)
    images = f.ct_head(9)
    uid = images[0].StudyInstanceUID

    # Instances 1 s apart never let the 2 s quiet period pass: the study keeps receiving.
    for n, image in enumerate(images[:8]):
        f.send([image], tmp_path / f"first-{n}", node.dicom_port)
        assert state_of(node.index, uid) == "receiving"
        if n in (3, 6):
            time.sleep(1.0)
            assert state_of(node.index, uid) == "receiving"
    assert wait_until(lambda: state_of(node.index, uid) == "queued", timeout=10)
    first = study(node.index, uid)
    assert first.version == 1 and first.image_count == 8
    assert first.completed_at is not None
    assert 2.0 <= first.completed_at - first.last_instance_at < 4.0
    (job,) = node.index.jobs_of(uid)
    assert job.job_id == f"{uid}/v1/ct-hemorrhage" and job.state == "queued"
    (outbox,) = rows(node.settings.node.index_path, "SELECT created_at, published_at FROM jobs")
    assert outbox["created_at"] == first.completed_at <= outbox["published_at"]  # complete, then queued
    assert queued_task_ids(client, "pacsnode.ct-hemorrhage") == [job.job_id]

    # A late instance after dispatch: version 2, receiving again, dispatched again.
    f.send(images[8:], tmp_path / "late", node.dicom_port)
    reopened = study(node.index, uid)
    assert (reopened.version, reopened.state, reopened.image_count) == (2, "receiving", 9)
    assert wait_until(lambda: state_of(node.index, uid) == "queued", timeout=10)
    jobs = {j.version: j for j in node.index.jobs_of(uid)}
    assert set(jobs) == {1, 2}
    assert jobs[2].job_id == f"{uid}/v2/ct-hemorrhage" and jobs[2].state == "queued"
    assert jobs[1].state == "queued"  # already in the broker: it cannot be taken back
    message = DispatchMessage.model_validate_json(jobs[2].payload)
    assert message.version == 2 and sum(len(s.instances) for s in message.series) == 9
    assert sorted(queued_task_ids(client, "pacsnode.ct-hemorrhage")) == sorted([jobs[1].job_id, jobs[2].job_id])
    versions = rows(node.settings.node.index_path, "SELECT version, COUNT(*) AS n FROM instances"
                    " WHERE study_uid=? GROUP BY version", (uid,))
    assert {r["version"]: r["n"] for r in versions} == {1: 8, 2: 1}


def test_reopening_supersedes_the_pending_jobs_of_the_old_version(start_node, tmp_path: Path) -> None:
    node = start_node(broker=dead_broker())
    images = f.ct_head(9)
    uid = images[0].StudyInstanceUID
    f.send(images[:8], tmp_path / "first", node.dicom_port)
    assert state_of(node.index, uid) == "receiving"
    assert wait_until(lambda: state_of(node.index, uid) == "complete", timeout=10)
    time.sleep(1.0)  # the broker is down: it stays complete, its job pending in the outbox
    assert state_of(node.index, uid) == "complete"
    assert [(j.version, j.state) for j in node.index.jobs_of(uid)] == [(1, "pending")]

    f.send(images[8:], tmp_path / "late", node.dicom_port)
    assert (study(node.index, uid).version, state_of(node.index, uid)) == (2, "receiving")
    (old,) = node.index.jobs_of(uid)
    assert old.state == "superseded" and old.reason == "study re-opened as version 2"
    assert node.index.pending_jobs() == []  # nothing of version 1 will ever be published

    assert wait_until(lambda: state_of(node.index, uid) == "complete", timeout=10)
    assert [(j.job_id, j.state) for j in node.index.jobs_of(uid)] == [
        (f"{uid}/v1/ct-hemorrhage", "superseded"),
        (f"{uid}/v2/ct-hemorrhage", "pending"),
    ]
    assert [j.job_id for j in node.index.pending_jobs()] == [f"{uid}/v2/ct-hemorrhage"]


def test_a_non_image_object_arriving_before_the_images_does_not_version_the_study(
    start_node, tmp_path: Path
) -> None:
    node = start_node(broker=dead_broker())
    images = f.ct_head(8)
    uid = images[0].StudyInstanceUID
    f.send([f.key_object(uid)], tmp_path / "ko", node.dicom_port)
    assert state_of(node.index, uid) == "not_applicable"  # only a non-image so far: nothing to do
    f.send(images, tmp_path / "images", node.dicom_port)
    assert (study(node.index, uid).version, state_of(node.index, uid)) == (1, "receiving")
    assert wait_until(lambda: state_of(node.index, uid) == "complete", timeout=10)
    assert [j.job_id for j in node.index.jobs_of(uid)] == [f"{uid}/v1/ct-hemorrhage"]


def test_routing_expectations_complete_a_study_before_the_quiet_period(start_node, tmp_path: Path) -> None:
    rules = [
        {"name": "chest", "pipeline": "cxr-abnormality",
         "match": {"all": [{"attribute": "Modality", "in": ["DX", "CR"]},
                           {"attribute": "BodyPartExamined", "equals": "CHEST"}]},
         "expect": {"min_instances": 1}},
        {"name": "brain-mr", "pipeline": "mr-metastasis",
         "match": {"attribute": "Modality", "equals": "MR"},
         "expect": {"series_descriptions": ["(?i)^T1", "(?i)^T2"]}},
        {"name": "head-ct", "pipeline": "ct-hemorrhage", "priority": "urgent",
         "match": {"attribute": "Modality", "equals": "CT"}},  # no expectation: waits the quiet period
    ]
    node = start_node(node={"quiet_period_s": 60.0}, broker=dead_broker(), routing={"rules": rules})
    chest = f.cxr()
    ct = f.ct_head(8)
    mr_uid = f.mr_brain(1)[0].StudyInstanceUID
    t1_series, t2_series = generate_uid(), generate_uid()
    t1 = [f.image(mr_uid, t1_series, sop_class=f.MR_IMAGE, modality="MR", body_part="BRAIN",
                  instance_number=i + 1, series_description="T1 POST") for i in range(3)]
    t2 = [f.image(mr_uid, t2_series, sop_class=f.MR_IMAGE, modality="MR", body_part="BRAIN",
                  instance_number=i + 1, series_number=2, series_description="T2 FLAIR") for i in range(3)]
    start = time.monotonic()
    f.send(chest + ct + t1, tmp_path / "a", node.dicom_port)
    chest_uid, ct_uid = chest[0].StudyInstanceUID, ct[0].StudyInstanceUID
    assert wait_until(lambda: state_of(node.index, chest_uid) == "complete", timeout=5)
    assert time.monotonic() - start < 5  # long before the 60 s quiet period
    time.sleep(1.0)
    assert state_of(node.index, ct_uid) == "receiving"  # no expectation: still waiting
    assert state_of(node.index, mr_uid) == "receiving"  # T1 arrived, T2 still expected
    for number, ds in enumerate(t2):  # the T2 series arrives image by image: one job, on all of it
        f.send([ds], tmp_path / f"b{number}", node.dicom_port)
        time.sleep(0.4)
    assert wait_until(lambda: state_of(node.index, mr_uid) == "complete", timeout=5)
    assert [j.pipeline for j in node.index.jobs_of(mr_uid)] == ["mr-metastasis"]
    assert state_of(node.index, ct_uid) == "receiving"


def test_mpps_completed_completes_the_study_once_the_listed_instances_arrived(
    start_node, tmp_path: Path
) -> None:
    node = start_node(node={"quiet_period_s": 60.0}, broker=dead_broker())
    images = f.ct_head(8)
    uid = images[0].StudyInstanceUID
    mpps_uid = generate_uid()
    assoc = mpps_association(node.dicom_port)
    try:
        status, _ = assoc.send_n_create(mpps_in_progress(uid), f.MPPS_SOP_CLASS, mpps_uid)
        assert status.Status == 0x0000
        f.send(images[:7], tmp_path / "a", node.dicom_port)
        status, _ = assoc.send_n_set(mpps_completed(images), f.MPPS_SOP_CLASS, mpps_uid)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    mpps = rows(node.settings.node.index_path, "SELECT * FROM mpps WHERE mpps_uid=?", (mpps_uid,))
    assert mpps[0]["study_uid"] == uid and mpps[0]["status"] == "COMPLETED"
    assert len(json.loads(mpps[0]["expected"])) == 8
    time.sleep(1.0)
    assert state_of(node.index, uid) == "receiving"  # one listed instance is still missing
    start = time.monotonic()
    f.send(images[7:], tmp_path / "b", node.dicom_port)
    assert wait_until(lambda: state_of(node.index, uid) == "complete", timeout=5)
    assert time.monotonic() - start < 5  # the 60 s quiet period did not have to pass
    assert [j.job_id for j in node.index.jobs_of(uid)] == [f"{uid}/v1/ct-hemorrhage"]


def test_images_not_listed_by_the_mpps_wait_for_the_quiet_period(start_node, tmp_path: Path) -> None:
    node = start_node(node={"quiet_period_s": 2.0}, broker=dead_broker())
    images = f.ct_head(11)
    uid = images[0].StudyInstanceUID
    listed, late = images[:8], images[8:]
    mpps_uid = generate_uid()
    assoc = mpps_association(node.dicom_port)
    try:
        assert assoc.send_n_create(mpps_in_progress(uid), f.MPPS_SOP_CLASS, mpps_uid)[0].Status == 0
        assert assoc.send_n_set(mpps_completed(listed), f.MPPS_SOP_CLASS, mpps_uid)[0].Status == 0
    finally:
        assoc.release()
    f.send(listed, tmp_path / "listed", node.dicom_port)
    assert wait_until(lambda: state_of(node.index, uid) == "complete", timeout=1.5)  # by the MPPS

    # Reconstructions trickling in after the procedure step ended: the MPPS does not vouch for
    # them, so each does not complete (and version) the study on its own.
    for n, ds in enumerate(late):
        f.send([ds], tmp_path / f"late-{n}", node.dicom_port)
        time.sleep(0.5)
        assert (study(node.index, uid).version, state_of(node.index, uid)) == (2, "receiving")
    assert wait_until(lambda: state_of(node.index, uid) == "complete", timeout=5)
    assert [(j.version, j.state) for j in node.index.jobs_of(uid)] == [(1, "superseded"), (2, "pending")]
    assert study(node.index, uid).image_count == 11
