"""Results to the RIS: an HL7 v2.5 ORU^R01 per finished study, built with hl7apy, sent over MLLP.

The message carries what a RIS files a result by and what a radiologist needs from it:
- PID: the patient's identifier (with its issuer), name, birth date and sex, from the study;
- OBR: the accession number as the filler order number, the pipeline as the service, STAT
  priority when the study is urgent (``triage.urgent``), result status F;
- one OBX per reported finding: the calibrated probability (NM), the call as the abnormal flag
  (A present, N absent) and result status F, or X where the model makes no call on it;
- an OBX "URGENT" (Y/N), and an RP OBX pointing at each SR (Study and SOP Instance UID).

MLLP framing is ``0x0B message 0x1C 0x0D``; the RIS must answer an ACK whose MSA-1 is AA (or CA);
anything else, or silence within the timeout, is a failed attempt the outbox retries. The control
ID is derived from study, version and target, so a retried message is recognisably the same one.
"""

from __future__ import annotations

import hashlib
import socket
from datetime import datetime
from typing import Any

from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from config.settings import Hl7Notification
from node.index import PipelineOutcome
from node.study_facts import StudyFacts

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
ACCEPTED = ("AA", "CA")
MAX_ACK_BYTES = 1 << 20


class DeliveryFailed(Exception):
    """An attempt that did not end in an accepting ACK; the message says why (for the outbox)."""


def control_id(study_uid: str, version: int, target: str) -> str:
    return hashlib.sha256(f"{study_uid}/{version}/{target}".encode()).hexdigest()[:20]


def _observation(order: Any, number: int, kind: str, code: str, text: str, value: str, flag: str = "",
                 status: str = "F") -> None:
    group = order.add_group("ORU_R01_OBSERVATION")
    obx = group.obx
    obx.obx_1 = str(number)
    obx.obx_2 = kind
    obx.obx_3 = f"{code}^{text}^L"
    obx.obx_5 = value
    if flag:
        obx.obx_8 = flag
    obx.obx_11 = status


def build_oru(facts: StudyFacts, outcomes: list[PipelineOutcome], urgent: bool, target: Hl7Notification,
              now: datetime) -> Message:
    """The ORU^R01 for one finished study version (validated by hl7apy against v2.5)."""
    message = Message("ORU_R01", version="2.5")
    msh = message.msh
    msh.msh_3, msh.msh_4 = target.sending_application, target.sending_facility
    msh.msh_5, msh.msh_6 = target.receiving_application, target.receiving_facility
    msh.msh_7 = now.strftime("%Y%m%d%H%M%S")
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id(facts.study_uid, facts.version, target.name)
    msh.msh_11 = "P"
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    pid.pid_3 = f"{facts.patient_id}^^^{facts.issuer}" if facts.issuer else facts.patient_id
    pid.pid_5 = facts.patient_name
    if facts.birth_date:
        pid.pid_7 = facts.birth_date
    if facts.sex:
        pid.pid_8 = facts.sex
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.obr
    obr.obr_1 = "1"
    obr.obr_3 = facts.accession
    pipelines = "+".join(o.pipeline for o in outcomes) or "ai"
    obr.obr_4 = f"{pipelines}^AI result: {facts.description or pipelines}^L"
    if urgent:
        obr.obr_5 = "S"
    obr.obr_7 = now.strftime("%Y%m%d%H%M%S")
    obr.obr_25 = "F"
    number = 1
    _observation(order, number, "ST", "URGENT", "Urgent finding", "Y" if urgent else "N", "A" if urgent else "N")
    for outcome in outcomes:
        for name, finding in sorted(outcome.findings.items()):
            number += 1
            _finding(order, number, outcome.pipeline, name, finding)
        for item in outcome.results:
            if item.get("kind") == "sr":
                number += 1
                _observation(order, number, "RP", "SR", "AI structured report (DICOM)",
                             f"{facts.study_uid}&{item.get('sop_uid', '')}^DICOM^application^dicom")
    message.validate()
    return message


def _finding(order: Any, number: int, pipeline: str, name: str, finding: object) -> None:
    if isinstance(finding, dict):
        probability, present = finding.get("probability"), finding.get("present")
        assessed = finding.get("assessed", True)
    else:
        probability, present, assessed = finding, None, True
    value = "" if probability is None else f"{float(str(probability)):.3f}"
    flag = "" if present is None else ("A" if present else "N")
    _observation(order, number, "NM", f"{pipeline}.{name}", f"{pipeline} {name} probability", value, flag,
                 "F" if assessed and present is not None else "X")


def send_mllp(message: Message, target: Hl7Notification) -> str:
    """Send one message and wait for its ACK; returns the ACK's MSA-1 (AA or CA), else raises."""
    payload = START_BLOCK + message.to_er7().encode() + END_BLOCK
    try:
        with socket.create_connection((target.host, target.port), timeout=target.timeout_s) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(payload)
            answer = b""
            while END_BLOCK not in answer:
                chunk = conn.recv(65536)
                if not chunk:
                    raise DeliveryFailed("connection closed before an ACK")
                answer += chunk
                if len(answer) > MAX_ACK_BYTES:
                    raise DeliveryFailed("ACK too large")
    except TimeoutError as exc:
        raise DeliveryFailed(f"no ACK within {target.timeout_s:g} s") from exc
    except OSError as exc:
        raise DeliveryFailed(f"connection failed ({exc.strerror or type(exc).__name__})") from exc
    text = answer.split(START_BLOCK, 1)[-1].split(END_BLOCK, 1)[0].decode(errors="replace")
    try:
        ack = parse_message(text.replace("\n", "\r"), find_groups=False)
        code = str(ack.msa.msa_1.value)
        detail = str(ack.msa.msa_3.value) if ack.msa.msa_3 else ""
    except (HL7apyException, AttributeError, IndexError) as exc:
        raise DeliveryFailed(f"answer is not an HL7 ACK ({type(exc).__name__})") from exc
    if code not in ACCEPTED:
        raise DeliveryFailed(f"NAK {code}" + (f": {detail}" if detail else ""))
    return code
