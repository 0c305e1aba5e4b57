"""Orthanc as the hospital PACS: it auto-routes stable studies to pacsnode, gets the SR/SEG back,
and forwarding those results again (Orthanc's routing sees the study change) starts no second round.

Everything is real: an Orthanc process with its own configuration and Lua auto-routing script,
the node in this process on a private Redis, a ``pacsnode worker`` process, untrained registered
models (``workers_support``) and phantom studies uploaded through Orthanc's REST API.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import PrivateRedis, make_settings, wait_until
from lifecycle_support import worker_process
from orthanc_support import ORTHANC_AET, Orthanc, requires_orthanc, run_orthanc
from workers_support import phantoms, study_files

from models.untrained import install_untrained_models
from node.index import StudyIndex
from node.service import Node

STABLE_AGE_S = 2
# Orthanc's auto-routing, as a site would configure it for an AI node: every stable study goes to it.
# Not ``SendToModality(studyId, 'pacsnode')``: in a Lua callback Orthanc 1.10 runs that as an
# instance-level operation and fails on a study ("Unable to read attachment dicom of instance
# <study id>"); its REST route takes any resource and sends it as one job (listed in /jobs).
ROUTING_LUA = """
function OnStableStudy(studyId, tags, metadata)
  RestApiPost('/modalities/pacsnode/store', DumpJson({Resources = {studyId}, Asynchronous = true}, true))
end
"""
FINISHED = ("done", "failed", "not_applicable", "unmatched")

pytestmark = requires_orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports, routing every stable study to the node's (reserved) port."""
    folder = tmp_path_factory.mktemp("orthanc")
    (folder / "route.lua").write_text(ROUTING_LUA)
    # Orthanc 1.10's defaults already accept a store from an unlisted caller with any called AE
    # title; stated here because the round trip depends on them (pacsnode is listed anyway).
    with run_orthanc(folder, {"pacsnode": "PACSNODE"}, DicomCheckCalledAet=False, DicomAlwaysAllowStore=True,
                     StableAge=STABLE_AGE_S, LuaScripts=[str(folder / "route.lua")]) as server:
        yield server


def _dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part 10 file without preamble and file meta: the bytes a C-STORE carries.

    Each receiver writes a file meta group of its own (implementation UID and name, source AE), so
    two faithful copies of one instance are compared on what follows it.
    """
    assert part10[128:132] == b"DICM" and part10[132:136] == b"\x02\x00\x00\x00", "no group length first"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length:]


def _snapshot(index: StudyIndex, study_uid: str) -> tuple[Any, ...]:
    """What a second round would change: the study's version and state, its jobs, its exports."""
    study = index.study(study_uid)
    assert study is not None
    jobs = [(j.job_id, j.state, j.attempts) for j in index.jobs_of(study_uid)]
    exports = [(e.destination, e.sop_uid, e.kind, e.state, e.attempts) for e in index.exports_of(study_uid)]
    return study.version, study.state, study.completed_at, jobs, exports


def _delivered(index: StudyIndex, study_uid: str) -> bool:
    study = index.study(study_uid)
    exports = index.exports_of(study_uid)
    return (study is not None and study.state in FINISHED and bool(exports)
            and all(e.state == "sent" for e in exports))


@dataclass
class RoundTrip:
    """The node and Orthanc after the whole round trip, with what the node held before the results
    came back from Orthanc (``before``) and Orthanc's forwarding jobs."""

    node: Node
    orthanc: Orthanc
    studies: dict[str, str]  # StudyInstanceUID -> synth kind
    before: dict[str, tuple[Any, ...]]
    forwards: list[dict[str, Any]]


@pytest.fixture(scope="module")
def roundtrip(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoundTrip]:
    """Upload a chest radiograph and a brain MR to Orthanc and run the round trip once: Orthanc
    routes them to the node, the worker's SR/SEG go back to Orthanc, Orthanc forwards the changed
    studies to the node again. The tests below check its outcome from each side."""
    tmp = tmp_path_factory.mktemp("roundtrip")
    # A threshold of 0 makes every voxel "lesion" for the untrained model: the MR always gets a SEG.
    install_untrained_models(tmp / "models", tasks=("cxr-abnormality", "mr-metastasis"), seg_threshold=0.0)
    data = tmp / "phantoms"
    manifest = phantoms(data, ("cxr", "mr-brain"), slices=10, size=64)
    studies = {record.study_uid: record.kind for record in manifest.studies}
    redis_server = PrivateRedis(tmp)  # private: other test files flush the shared Redis database
    redis_server.start()
    settings = make_settings(
        tmp, node={"port": orthanc.peers["pacsnode"]}, broker={"url": redis_server.url},
        destinations=[{"name": "orthanc", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": ORTHANC_AET}])
    node = Node(settings, with_worker=False)
    node.start()
    worker_log = tmp / "worker.log"

    def context() -> str:
        return f"worker log:\n{worker_log.read_text()[-2000:]}\northanc log:\n{orthanc.log_tail()}"

    try:
        with worker_process(settings, worker_log):
            # The modality's images reach the PACS; the PACS routes each study once it is stable.
            for uid in studies:
                for path in study_files(data, uid):
                    assert orthanc.upload(path)["Status"] == "Success"
            assert wait_until(lambda: all(_delivered(node.index, uid) for uid in studies), timeout=120), context()
            before = {uid: _snapshot(node.index, uid) for uid in studies}
            # The results changed the studies in Orthanc: each becomes stable again and is forwarded,
            # our SR/SEG included. Two stable events and two forwarding jobs per study, all finished.
            assert wait_until(lambda: orthanc.stable_events() >= 2 * len(studies), timeout=30), context()
            assert wait_until(lambda: len(orthanc.jobs()) >= 2 * len(studies)
                              and all(job["State"] == "Success" for job in orthanc.jobs()), timeout=60), \
                (orthanc.jobs(), context())
            time.sleep(settings.node.quiet_period_s + 2)  # room for a (wrong) re-open to be assembled and dispatched
        yield RoundTrip(node=node, orthanc=orthanc, studies=studies, before=before, forwards=orthanc.jobs())
    finally:
        node.stop()
        redis_server.stop()


def test_orthanc_routes_each_study_and_gets_its_results_back(roundtrip: RoundTrip) -> None:
    """One SR per study in Orthanc, a SEG for the MR, their data sets byte for byte what the worker
    stored (each receiver writes its own file meta, so that part is left out)."""
    store = roundtrip.node.settings.node.store_path
    for uid, kind in roundtrip.studies.items():
        study = roundtrip.node.index.study(uid)
        assert study is not None and study.state == "done", roundtrip.node.index.jobs_of(uid)
        held = roundtrip.orthanc.instances_by_modality(uid)
        assert len(held["SR"]) == 1
        assert len(held.get("SEG", [])) == (1 if kind == "mr-brain" else 0)
        for instance in held["SR"] + held.get("SEG", []):
            sop_uid = roundtrip.orthanc.get(f"/instances/{instance}")["MainDicomTags"]["SOPInstanceUID"]
            (ours,) = store.glob(f"{uid}/*/{sop_uid}.dcm")
            assert _dataset_bytes(roundtrip.orthanc.get(f"/instances/{instance}/file")) == \
                _dataset_bytes(ours.read_bytes())


def test_results_forwarded_back_by_orthanc_start_no_second_round(roundtrip: RoundTrip) -> None:
    index = roundtrip.node.index
    for uid in roundtrip.studies:
        # The second forward carried the whole study, results included, and the node took all of it.
        held = roundtrip.orthanc.instances_by_modality(uid)
        results = len(held["SR"]) + len(held.get("SEG", []))
        everything = sum(map(len, held.values()))
        orthanc_id = roundtrip.orthanc.study_id(uid)
        forwards = [job["Content"] for job in roundtrip.forwards if job["Content"]["ParentResources"] == [orthanc_id]]
        assert sorted(job["InstancesCount"] for job in forwards) == [everything - results, everything]
        assert all(job["FailedInstancesCount"] == 0 for job in forwards)
        # ... and nothing moved: same version, one job, the same exports (none sent again).
        assert _snapshot(index, uid) == roundtrip.before[uid], "the forwarded results re-opened the study"
        study = index.study(uid)
        assert study is not None and study.version == 1 and study.state == "done"
        assert len(index.jobs_of(uid)) == 1
        assert len(held["SR"]) == 1
    assert index.pending_jobs() == []
    # Had the node sent anything again, the study would have changed in Orthanc and become stable again.
    assert roundtrip.orthanc.stable_events() == 2 * len(roundtrip.studies)


def test_results_forwarded_back_are_recognised_as_the_same_instances(roundtrip: RoundTrip) -> None:
    """A result that comes back unchanged is the instance the node already holds: indexed as a
    result (never a conflict in quarantine, never a warning)."""
    store = roundtrip.node.settings.node.store_path
    conflicts = store / ".quarantine" / "conflicts"
    for uid in roundtrip.studies:
        produced = {path.stem for path in store.glob(f"{uid}/*/*.dcm") if roundtrip.node.index.is_produced(path.stem)}
        sent = {row.sop_uid for row in roundtrip.node.index.exports_of(uid)}
        assert sent <= produced
        assert sent <= roundtrip.node.index.received_sop_uids(uid)
        assert not list(conflicts.glob(f"{uid}/*.dcm"))
