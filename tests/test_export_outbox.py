"""The export outbox: results reach each destination once, in the kinds it accepts; a destination
that is down, or answers a failure status, gets them later with back-off that survives a node
restart; exports that can never succeed end failed, visibly.

Real associations over loopback: the destinations are pynetdicom storage SCPs of the test's own
that answer the statuses a test queues for them. Reports come over the (embedded) report queue,
with result files the test writes into the study store as a worker would.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dicom_factory as f
import pytest
from conftest import free_port, make_settings, wait_until
from lifecycle_support import queued_chest_study, rows, state_of, study
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer
from test_scp_tls import _ca, _leaf

from config.settings import Destination, RetentionSettings, Settings, TLSSettings
from node.broker import connection
from node.index import ExportRow
from node.messages import JobState, ReportMessage, ResultFile, ResultKind
from node.retention import apply_purge, plan_purge
from node.send import SENT_STATUSES
from node.service import Node
from workers.reporting import publish_report

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
OUT_OF_RESOURCES, CANNOT_UNDERSTAND, COERCED = 0xA700, 0xC000, 0xB000
PURGE_NOW = RetentionSettings(processed_max_age_days=1e-9, max_disk_used_percent=100.0)


class FakePacs:
    """A destination: stores nothing, records every C-STORE and answers the queued statuses."""

    def __init__(self, ae_title: str, port: int | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.ssl_context = ssl_context
        self.answers: dict[str, list[int]] = {}  # SOP Instance UID -> statuses to answer, in turn; then success
        self.tried: list[str] = []  # every C-STORE's SOP Instance UID
        self.stored: list[str] = []  # those answered with success or a warning
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def destination(self, name: str, accepts_sr_seg: bool = True) -> Destination:
        return Destination(name=name, host="127.0.0.1", port=self.port, ae_title=self.ae_title,
                           accepts_sr_seg=accepts_sr_seg)

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        for sop_class in (f.COMPREHENSIVE_3D_SR, f.SEGMENTATION, f.KEY_OBJECT_SELECTION, SECONDARY_CAPTURE):
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=self.ssl_context,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Event) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.tried.append(sop_uid)
            queued = self.answers.get(sop_uid, [])
            status = queued.pop(0) if queued else 0x0000
            if status in SENT_STATUSES:
                self.stored.append(sop_uid)
        return status


@pytest.fixture
def pacs_factory() -> Iterator[Callable[..., FakePacs]]:
    made: list[FakePacs] = []

    def _make(ae_title: str, port: int | None = None, started: bool = True,
              ssl_context: ssl.SSLContext | None = None) -> FakePacs:
        pacs = FakePacs(ae_title, port, ssl_context)
        if started:
            pacs.start()
        made.append(pacs)
        return pacs

    yield _make
    for pacs in made:
        pacs.stop()


def _settings(tmp_path: Path, destinations: list[Destination], **exports: Any) -> Settings:
    """Embedded broker (private to the test), ports chosen at start, quick export polling."""
    settings = make_settings(tmp_path, node={"port": 0}, http={"port": 0},
                             exports={"poll_s": 0.1, "base_backoff_s": 0.2, "max_backoff_s": 1.0, **exports})
    return settings.model_copy(update={"destinations": destinations})


def _result(node: Node, study_uid: str, kind: ResultKind, written: bool = True) -> tuple[ResultFile, Dataset]:
    """A result file in the store's layout, as a worker writes it (``written=False``: referenced only)."""
    makers: dict[ResultKind, Callable[[str], Dataset]] = {
        ResultKind.SR: f.sr_result,
        ResultKind.SEG: f.seg_result,
        ResultKind.KO: f.key_object,
        ResultKind.SC: lambda uid: f.mark_as_result(f.image(
            uid, generate_uid(), sop_class=SECONDARY_CAPTURE, modality="OT", body_part="CHEST",
            slice_thickness=None)),
    }
    ds = makers[kind](study_uid)
    if written:
        f.write([ds], node.store.root / study_uid / ds.SeriesInstanceUID)
    path = f"{study_uid}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    return ResultFile(path=path, sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, kind=kind), ds


def _report_done(node: Node, job_id: str, results: list[ResultFile]) -> None:
    with connection(node.settings) as conn:
        publish_report(conn, node.settings, ReportMessage(job_id=job_id, state=JobState.DONE, results=results))


def _exports(node: Node, study_uid: str) -> dict[str, ExportRow]:
    """The study's exports by SOP Instance UID (one destination per test where this is used)."""
    return {row.sop_uid: row for row in node.index.exports_of(study_uid)}


def _all_in(node: Node, study_uid: str, state: str, count: int) -> bool:
    found = node.index.exports_of(study_uid)
    return len(found) == count and all(row.state == state for row in found)


def _exported(node: Node, destination: str, outcome: str) -> float:
    value = node.metrics.registry.get_sample_value(
        "pacsnode_export_attempts_total", {"destination": destination, "outcome": outcome})
    return value or 0.0


def test_results_reach_each_destination_once_in_the_kinds_it_accepts(
    start_node: Callable[..., Node], pacs_factory: Callable[..., FakePacs], tmp_path: Path,
) -> None:
    pacs, viewer = pacs_factory("MAIN_PACS"), pacs_factory("VIEWER")
    node = start_node(_settings(tmp_path, [pacs.destination("pacs"), viewer.destination("viewer", False)]))
    uid = queued_chest_study(node, tmp_path / "study")
    (job,) = node.index.jobs_of(uid)
    made = {kind: _result(node, uid, kind) for kind in ResultKind}
    results = [result for result, _ in made.values()]

    _report_done(node, job.job_id, results)
    _report_done(node, job.job_id, results)  # redelivered, or the task ran twice: same deterministic UIDs
    assert wait_until(lambda: _all_in(node, uid, "sent", 4), timeout=10), node.index.exports_of(uid)
    assert state_of(node.index, uid) == "done"
    time.sleep(0.5)  # several export polls: nothing is sent again
    sop = {kind: result.sop_uid for kind, (result, _) in made.items()}
    assert sorted(pacs.tried) == sorted([sop[ResultKind.SR], sop[ResultKind.SEG]])
    assert sorted(viewer.tried) == sorted([sop[ResultKind.KO], sop[ResultKind.SC]])
    exports = node.index.exports_of(uid)
    assert {(row.destination, row.kind) for row in exports} == {
        ("pacs", "sr"), ("pacs", "seg"), ("viewer", "ko"), ("viewer", "sc")}
    for row in exports:
        assert (row.job_id, row.attempts, row.last_status) == (job.job_id, 1, "0x0000 Success"), row
        assert row.sent_at is not None and row.sent_at >= row.next_attempt_at
    assert node.index.export_counts() == {"pending": 0, "sent": 4, "failed": 0}
    assert _exported(node, "pacs", "sent") == 2 and _exported(node, "viewer", "sent") == 2
    assert node.metrics.registry.get_sample_value("pacsnode_exports", {"state": "sent"}) == 4

    # The study re-opens (a genuine new image): a late DONE of the superseded version exports nothing.
    chest_series = node.index.image_series(uid)[0].series_uid
    f.send([f.image(uid, chest_series, sop_class=f.DX_IMAGE, modality="DX", body_part="CHEST", instance_number=2,
                    slice_thickness=None)], tmp_path / "new-image", node.dicom_port)
    late, _ = _result(node, uid, ResultKind.SR)
    _report_done(node, job.job_id, [late])
    assert wait_until(lambda: late.sop_uid in {r["sop_uid"] for r in rows(
        node.settings.node.index_path, "SELECT sop_uid FROM produced")}, timeout=10)
    assert len(node.index.exports_of(uid)) == 4


def test_a_destination_down_at_first_gets_the_results_once_it_is_up(
    start_node: Callable[..., Node], pacs_factory: Callable[..., FakePacs], tmp_path: Path,
) -> None:
    pacs = pacs_factory("MAIN_PACS", started=False)
    node = start_node(_settings(tmp_path, [pacs.destination("pacs")], base_backoff_s=0.3, max_backoff_s=0.6))
    uid = queued_chest_study(node, tmp_path / "study")
    (job,) = node.index.jobs_of(uid)
    sr, _ = _result(node, uid, ResultKind.SR)
    _report_done(node, job.job_id, [sr])
    assert wait_until(lambda: node.index.exports_of(uid) != [] and node.index.exports_of(uid)[0].attempts >= 2)
    (row,) = node.index.exports_of(uid)
    assert row.state == "pending" and row.last_status == "connection failed (refused or unreachable)", row
    assert state_of(node.index, uid) == "done"
    # Finished, but its results wait for export: retention keeps it.
    assert plan_purge(node.index, node.store, PURGE_NOW, time.time()) == []
    assert not node.index.forget_study(uid, study(node.index, uid).updated_at, lambda: None)

    pacs.start()
    assert wait_until(lambda: _all_in(node, uid, "sent", 1), timeout=10), node.index.exports_of(uid)
    assert pacs.stored == [sr.sop_uid]
    assert _exported(node, "pacs", "retry") >= 2 and _exported(node, "pacs", "sent") == 1

    # Sent: now retention may purge the study, and its export rows go with it.
    planned = plan_purge(node.index, node.store, PURGE_NOW, time.time())
    assert [item.study_uid for item in planned] == [uid]
    assert apply_purge(node.index, node.store, planned)[0] == 1
    assert node.index.exports_of(uid) == []
    assert rows(node.settings.node.index_path, "SELECT * FROM exports") == []
    assert rows(node.settings.node.index_path, "SELECT * FROM produced") == []  # forgotten with their jobs


def test_back_off_survives_a_node_restart(
    start_node: Callable[..., Node], pacs_factory: Callable[..., FakePacs], tmp_path: Path,
) -> None:
    pacs = pacs_factory("MAIN_PACS", started=False)
    settings = _settings(tmp_path, [pacs.destination("pacs")], base_backoff_s=2.5, max_backoff_s=2.5)
    first = Node(settings, with_worker=False)
    first.start()
    try:
        uid = queued_chest_study(first, tmp_path / "study")
        (job,) = first.index.jobs_of(uid)
        sr, _ = _result(first, uid, ResultKind.SR)
        _report_done(first, job.job_id, [sr])
        assert wait_until(lambda: first.index.exports_of(uid) != [] and first.index.exports_of(uid)[0].attempts == 1)
    finally:
        first.stop()
    (failed_once,) = first.index.exports_of(uid)
    assert failed_once.state == "pending"
    assert failed_once.next_attempt_at == pytest.approx(failed_once.updated_at + 2.5)
    stored = rows(settings.node.index_path, "SELECT state, attempts, next_attempt_at FROM exports")
    assert [tuple(r) for r in stored] == [("pending", 1, failed_once.next_attempt_at)]  # on disk, as an operator sees it

    pacs.start()
    second = start_node(settings)  # same data folder
    assert wait_until(lambda: _all_in(second, uid, "sent", 1), timeout=10), second.index.exports_of(uid)
    (sent,) = second.index.exports_of(uid)
    assert sent.sent_at is not None and sent.sent_at >= failed_once.next_attempt_at  # the back-off was kept
    assert sent.attempts == 2
    assert pacs.stored == [sr.sop_uid]


def test_a_failure_status_is_recorded_and_retried_and_a_warning_counts_as_sent(
    start_node: Callable[..., Node], pacs_factory: Callable[..., FakePacs], tmp_path: Path,
) -> None:
    pacs = pacs_factory("MAIN_PACS")
    node = start_node(_settings(tmp_path, [pacs.destination("pacs")], base_backoff_s=1.5, max_backoff_s=1.5))
    uid = queued_chest_study(node, tmp_path / "study")
    (job,) = node.index.jobs_of(uid)
    (sr, _), (seg, _) = _result(node, uid, ResultKind.SR), _result(node, uid, ResultKind.SEG)
    pacs.answers = {sr.sop_uid: [OUT_OF_RESOURCES], seg.sop_uid: [COERCED]}
    _report_done(node, job.job_id, [sr, seg])

    assert wait_until(lambda: sr.sop_uid in _exports(node, uid) and _exports(node, uid)[sr.sop_uid].attempts == 1)
    first = _exports(node, uid)
    assert (first[sr.sop_uid].state, first[sr.sop_uid].last_status) == ("pending", "0xA700 Refused: Out of Resources")
    assert first[sr.sop_uid].next_attempt_at == pytest.approx(first[sr.sop_uid].updated_at + 1.5)
    assert first[seg.sop_uid].state == "sent" and first[seg.sop_uid].last_status.startswith("0xB000")

    assert wait_until(lambda: _all_in(node, uid, "sent", 2), timeout=10), node.index.exports_of(uid)
    retried = _exports(node, uid)[sr.sop_uid]
    assert (retried.attempts, retried.last_status) == (2, "0x0000 Success")
    assert pacs.tried.count(sr.sop_uid) == 2 and pacs.tried.count(seg.sop_uid) == 1
    assert sorted(pacs.stored) == sorted([sr.sop_uid, seg.sop_uid])


def test_exports_that_cannot_succeed_end_failed_and_visible(
    start_node: Callable[..., Node], pacs_factory: Callable[..., FakePacs], tmp_path: Path,
) -> None:
    pacs = pacs_factory("MAIN_PACS")
    node = start_node(_settings(tmp_path, [pacs.destination("pacs")], base_backoff_s=0.1, max_backoff_s=0.2,
                                max_attempts=3))
    uid = queued_chest_study(node, tmp_path / "study")
    (job,) = node.index.jobs_of(uid)
    sr, _ = _result(node, uid, ResultKind.SR)
    purged, _ = _result(node, uid, ResultKind.SEG, written=False)  # its file is gone
    pacs.answers = {sr.sop_uid: [CANNOT_UNDERSTAND] * 5}
    _report_done(node, job.job_id, [sr, purged])

    assert wait_until(lambda: _all_in(node, uid, "failed", 2), timeout=10), node.index.exports_of(uid)
    exports = _exports(node, uid)
    assert exports[sr.sop_uid].attempts == 3
    assert exports[sr.sop_uid].last_status == "0xC000 Cannot Understand (gave up after 3 attempts)"
    assert (exports[purged.sop_uid].attempts, exports[purged.sop_uid].last_status) == (
        1, "result file missing (purged?)")
    assert pacs.tried == [sr.sop_uid] * 3 and pacs.stored == []
    assert node.index.export_counts() == {"pending": 0, "sent": 0, "failed": 2}
    assert _exported(node, "pacs", "failed") == 2 and _exported(node, "pacs", "retry") == 2
    assert node.metrics.registry.get_sample_value("pacsnode_exports", {"state": "failed"}) == 2
    time.sleep(0.5)
    assert len(pacs.tried) == 3  # failed for good: never tried again
    assert [item.study_uid for item in plan_purge(node.index, node.store, PURGE_NOW, time.time())] == [uid]


def test_a_tls_destination_that_requires_our_certificate_gets_the_results(
    start_node: Callable[..., Node], pacs_factory: Callable[..., FakePacs], tmp_path: Path,
) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _ca(pki, "ca")
    _leaf(pki, "pacs", "ca", "serverAuth")
    _leaf(pki, "node", "ca", "clientAuth")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    server.load_cert_chain(str(pki / "pacs.crt"), str(pki / "pacs.key"))
    server.verify_mode = ssl.CERT_REQUIRED
    pacs = pacs_factory("MAIN_PACS", ssl_context=server)
    tls = TLSSettings(enabled=True, cert_file=pki / "node.crt", key_file=pki / "node.key", ca_file=pki / "ca.crt")
    node = start_node(_settings(tmp_path, [pacs.destination("pacs").model_copy(update={"tls": tls})]))
    uid = queued_chest_study(node, tmp_path / "study")
    (job,) = node.index.jobs_of(uid)
    sr, _ = _result(node, uid, ResultKind.SR)
    _report_done(node, job.job_id, [sr])
    assert wait_until(lambda: _all_in(node, uid, "sent", 1), timeout=10), node.index.exports_of(uid)
    assert pacs.stored == [sr.sop_uid]
