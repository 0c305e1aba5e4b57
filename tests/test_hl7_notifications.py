"""Results to the RIS: one HL7 ORU^R01 per finished study over MLLP, to a real listener (hl7apy's
MLLPServer) that ACKs, NAKs, or is down for a while; urgent studies are notified first, and
nothing is lost."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dicom_factory as f
import pytest
from conftest import free_port, wait_until
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from lifecycle_support import state_of

from node.broker import connection
from node.index import StudyIndex
from node.messages import JobState, ReportMessage, ResultFile, ResultKind
from node.service import Node
from node.worklist import Worklist
from workers.reporting import publish_report


@dataclass
class Ris:
    """What the RIS listener received, and how it answers: ``naks`` NAKs (AE) before it ACKs."""

    port: int
    naks: int = 0
    received: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: MLLPServer | None = None

    def start(self) -> None:
        handlers = {kind: (RisHandler, self) for kind in ("ORU^R01", "ORU^R01^ORU_R01")}
        self.server = MLLPServer("127.0.0.1", self.port, handlers)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def messages_for(self, accession: str) -> list[Message]:
        with self.lock:
            return [m for m in self.received if _field(m, "OBR", 3) == accession]


class RisHandler(AbstractHandler):
    def __init__(self, message: str, ris: Ris) -> None:
        super().__init__(message)
        self.ris = ris

    def reply(self) -> str:
        incoming = parse_message(self.incoming_message, find_groups=False)
        with self.ris.lock:
            self.ris.received.append(incoming)
            code = "AE" if self.ris.naks > 0 else "AA"
            self.ris.naks = max(0, self.ris.naks - 1)
        ack = Message("ACK", version="2.5")
        ack.msh.msh_3, ack.msh.msh_5 = "RIS", "PACSNODE"
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = "ack-" + str(incoming.msh.msh_10.value)
        ack.msh.msh_11 = "P"
        ack.msa.msa_1 = code
        ack.msa.msa_2 = str(incoming.msh.msh_10.value)
        if code == "AE":
            ack.msa.msa_3 = "try again later"
        return str(ack.to_mllp())


def _segments(message: Message, name: str) -> list[Any]:
    return [segment for segment in message.children if segment.name == name]


def _field(message: Message, segment: str, number: int) -> str:
    (found,) = _segments(message, segment)[:1] or [None]
    return "" if found is None else str(getattr(found, f"{segment.lower()}_{number}").value)


def _finish(node: Node, study_uid: str, findings: dict[str, Any], sr_uid: str) -> None:
    """The worker's DONE report for the study's job (as a worker publishes it)."""
    (job,) = node.index.jobs_of(study_uid)
    with connection(node.settings) as conn:
        publish_report(conn, node.settings, ReportMessage(
            job_id=job.job_id, state=JobState.DONE, findings=findings,
            results=[ResultFile(path=f"{study_uid}/results/{sr_uid}.dcm", sop_uid=sr_uid,
                                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", kind=ResultKind.SR)]))


@pytest.fixture
def ris() -> Iterator[Ris]:
    listener = Ris(port=free_port())
    yield listener
    listener.stop()


@pytest.fixture
def node(start_node: Callable[..., Node], ris: Ris) -> Node:
    return start_node(notifications=[{"name": "ris", "host": "127.0.0.1", "port": ris.port, "timeout_s": 2,
                                      "sending_facility": "RADIOLOGY", "receiving_facility": "HOSPITAL"}],
                      exports={"poll_s": 0.2, "base_backoff_s": 0.3, "max_backoff_s": 1.0})


def _queued(node: Node, *datasets: list[Any]) -> list[str]:
    uids = [str(d[0].StudyInstanceUID) for d in datasets]
    f.send([ds for d in datasets for ds in d], node.settings.node.data_dir.parent / "sent", node.dicom_port)
    assert wait_until(lambda: all(state_of(node.index, u) == "queued" for u in uids), timeout=20)
    return uids


def _notified(index: StudyIndex, study_uid: str) -> bool:
    rows = index.notifications_of(study_uid)
    return bool(rows) and all(r.state == "sent" for r in rows)


def test_one_oru_per_finished_study_urgent_first_after_the_ris_was_down(node: Node, ris: Ris) -> None:
    chest, head = f.cxr(), f.ct_head(8)
    for datasets, accession in ((chest, "ACC-CHEST"), (head, "ACC-HEAD")):
        for ds in datasets:
            ds.AccessionNumber = accession
    chest_uid, head_uid = _queued(node, chest, head)
    _finish(node, chest_uid, {"abnormal": {"probability": 0.12, "present": False, "threshold": 0.5}}, "2.25.1001")
    _finish(node, head_uid, {"any": {"probability": 0.93, "present": True, "threshold": 0.5},
                             "epidural": {"probability": 0.2, "present": None, "assessed": False,
                                          "reason": "too few validation cases"}}, "2.25.1002")
    # The RIS is down: both are attempted, refused, and wait; nothing is lost.
    def attempted(uid: str) -> bool:
        rows = node.index.notifications_of(uid)
        return len(rows) == 1 and rows[0].attempts >= 1

    assert wait_until(lambda: attempted(chest_uid) and attempted(head_uid), timeout=20)
    assert "connection failed" in node.index.notifications_of(head_uid)[0].last_status
    ris.start()
    assert wait_until(lambda: _notified(node.index, chest_uid) and _notified(node.index, head_uid), timeout=20)
    with ris.lock:
        accessions = [_field(m, "OBR", 3) for m in ris.received]
    head_accession, chest_accession = str(head[0].AccessionNumber), str(chest[0].AccessionNumber)
    assert accessions[0] == head_accession  # the urgent study first, though it finished second
    assert len(ris.messages_for(head_accession)) == len(ris.messages_for(chest_accession)) == 1
    (oru,) = ris.messages_for(head_accession)
    assert _field(oru, "MSH", 9).startswith("ORU^R01") and _field(oru, "MSH", 12) == "2.5"
    assert _field(oru, "MSH", 4) == "RADIOLOGY" and _field(oru, "MSH", 6) == "HOSPITAL"
    assert _field(oru, "PID", 3).startswith(str(head[0].PatientID)) and _field(oru, "OBR", 5) == "S"
    observations = {str(o.obx_3.value).split("^")[0]: o for o in _segments(oru, "OBX")}
    assert str(observations["URGENT"].obx_5.value) == "Y"
    assert str(observations["ct-hemorrhage.any"].obx_5.value) == "0.930"
    assert str(observations["ct-hemorrhage.any"].obx_8.value) == "A"
    assert str(observations["ct-hemorrhage.epidural"].obx_11.value) == "X"  # not assessed: no call
    assert "2.25.1002" in str(observations["SR"].obx_5.value)
    (chest_oru,) = ris.messages_for(chest_accession)
    assert _field(chest_oru, "OBR", 5) == "" and str(
        {str(o.obx_3.value).split("^")[0]: o for o in _segments(chest_oru, "OBX")}["URGENT"].obx_5.value) == "N"


def test_a_nak_is_retried_until_acknowledged_and_shown(node: Node, ris: Ris) -> None:
    ris.naks = 2
    ris.start()
    (uid,) = _queued(node, f.cxr())
    _finish(node, uid, {"abnormal": {"probability": 0.7, "present": True, "threshold": 0.5}}, "2.25.2001")
    assert wait_until(lambda: _notified(node.index, uid), timeout=20), node.index.notifications_of(uid)
    (row,) = node.index.notifications_of(uid)
    assert row.attempts == 3 and row.last_status == "ACK AA"
    with ris.lock:
        control_ids = {str(m.msh.msh_10.value) for m in ris.received}
    assert len(ris.received) == 3 and len(control_ids) == 1  # the same message, sent again
    detail = Worklist(node.index).study(uid)
    assert detail is not None
    (shown,) = detail.to_json()["notifications"]
    assert shown["state"] == "sent" and shown["attempts"] == 3 and shown["sent_at"]
