"""Loop protection: the node's own results, and non-image objects from the PACS, come back into a
finished study without re-opening it; a genuine new image still does."""

from __future__ import annotations

import time
from pathlib import Path

import dicom_factory as f
from conftest import wait_until
from lifecycle_support import rows, state_of, study
from pydicom.uid import generate_uid

from node.broker import connection
from node.messages import JobState, ReportMessage, ResultFile, ResultKind
from workers.reporting import publish_report


def test_results_and_non_images_never_reopen_a_finished_study(
    start_node, clean_redis: str, tmp_path: Path
) -> None:
    node = start_node(broker={"url": clean_redis})
    chest = f.cxr()
    uid = chest[0].StudyInstanceUID
    f.send(chest, tmp_path / "study", node.dicom_port)
    assert wait_until(lambda: state_of(node.index, uid) == "queued", timeout=10)
    (job,) = node.index.jobs_of(uid)

    # What a worker reports over the report queue: processing, then done with the UIDs it made.
    sr, seg = f.sr_result(uid), f.seg_result(uid)
    produced_image_uid = generate_uid()  # e.g. a heat-map the worker sent back to the PACS
    with connection(node.settings) as conn:
        publish_report(conn, node.settings, ReportMessage(job_id=job.job_id, state=JobState.PROCESSING))
        publish_report(conn, node.settings, ReportMessage(
            job_id=job.job_id, state=JobState.DONE, findings={"abnormal": 0.91},
            results=[ResultFile(path=f"{uid}/x/{u}.dcm", sop_uid=u, sop_class_uid=c, kind=k) for u, c, k in (
                (sr.SOPInstanceUID, sr.SOPClassUID, ResultKind.SR), (seg.SOPInstanceUID, seg.SOPClassUID, ResultKind.SEG),
                (produced_image_uid, f.DX_IMAGE, ResultKind.SC))]))
    assert wait_until(lambda: state_of(node.index, uid) == "done", timeout=10)
    done = study(node.index, uid)
    assert done.version == 1

    # Each comes back (the PACS forwards everything it receives for the study).
    image_series = chest[0].SeriesInstanceUID
    produced_image = f.image(uid, generate_uid(), sop_class=f.DX_IMAGE, modality="DX", body_part="CHEST",
                             sop_uid=produced_image_uid, slice_thickness=None)
    our_derived_image = f.mark_as_result(  # ours by Contributing Equipment, not (yet) in `produced`
        f.image(uid, generate_uid(), sop_class=f.DX_IMAGE, modality="DX", body_part="CHEST",
                slice_thickness=None))
    other_ai_sr = f.sr_result(uid, manufacturer="OtherVendor AI")  # Processing Algorithm purpose code
    comeback = {
        "our SR": (sr, "result"),
        "our SEG": (seg, "result"),
        "image in produced": (produced_image, "result"),
        "our derived image": (our_derived_image, "result"),
        "another AI's SR": (other_ai_sr, "result"),
        "PACS key object": (f.key_object(uid), "non_image"),
        "PACS presentation state": (f.presentation_state(uid), "non_image"),
    }
    for n, (what, (ds, _)) in enumerate(comeback.items()):
        f.send([ds], tmp_path / f"back-{n}", node.dicom_port)
        after = study(node.index, uid)
        assert (after.version, after.state) == (1, "done"), what
    time.sleep(node.settings.node.quiet_period_s + 0.75)  # longer than a quiet period: nothing re-opens
    after = study(node.index, uid)
    assert (after.version, after.state, after.image_count) == (1, "done", 1)
    assert [j.job_id for j in node.index.jobs_of(uid)] == [job.job_id]
    assert node.index.pending_jobs() == []
    kinds = {r["sop_uid"]: (r["kind"], r["version"]) for r in rows(
        node.settings.node.index_path, "SELECT sop_uid, kind, version FROM instances WHERE study_uid=?", (uid,))}
    for what, (ds, kind) in comeback.items():
        assert kinds[ds.SOPInstanceUID] == (kind, 1), what  # stored and indexed, as what it is
        assert (node.store.root / uid / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm").is_file(), what
    assert kinds[chest[0].SOPInstanceUID] == ("image", 1)
    assert [s.series_uid for s in node.index.image_series(uid)] == [image_series]

    # Control: a genuine new image of the study does re-open it, through the same path.
    extra = f.image(uid, image_series, sop_class=f.DX_IMAGE, modality="DX", body_part="CHEST",
                    instance_number=2, slice_thickness=None)
    f.send([extra], tmp_path / "genuine", node.dicom_port)
    # version 2 at once; "receiving" only until the assembler sees the routing expectation met
    assert study(node.index, uid).version == 2
    assert wait_until(lambda: state_of(node.index, uid) == "queued", timeout=10)
    assert [j.job_id for j in node.index.jobs_of(uid)] == [job.job_id, f"{uid}/v2/cxr-abnormality"]


def test_a_study_known_only_from_non_images_is_never_dispatched(start_node, clean_redis: str,
                                                                 tmp_path: Path) -> None:
    node = start_node(broker={"url": clean_redis})
    uids = {make.__name__: generate_uid() for make in (f.sr_result, f.seg_result, f.key_object)}
    f.send([f.sr_result(uids["sr_result"]), f.seg_result(uids["seg_result"]), f.key_object(uids["key_object"])],
           tmp_path / "only", node.dicom_port)
    time.sleep(node.settings.node.quiet_period_s + 0.75)
    for what, uid in uids.items():
        only = study(node.index, uid)
        assert (only.state, only.reason, only.image_count, only.version) == (
            "not_applicable", "no images received", 0, 1), what
        assert node.index.jobs_of(uid) == [], what
