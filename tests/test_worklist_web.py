"""The worklist over HTTP (JSON API and web page, checked in headless Chromium), its authentication
and audit log, and ``pacsnode status`` showing the same findings and export status.

One real node serves the read-only tests: a chest radiograph whose worker reported findings and
whose result went to two destinations (another real node, which took it, and a closed port, which
is retried), a head CT still processing, and a spine radiograph no rule matched, received
(as the index says) on an earlier day.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import dicom_factory as f
import pytest
from conftest import free_port, make_settings, wait_until
from lifecycle_support import cli_env, run_cli, state_of
from pydantic import ValidationError
from web_support import basic, dump_dom, get, get_json

from config.settings import Destination, load_settings
from node.audit import AuditLog
from node.auth import hash_password
from node.broker import connection
from node.index import ExportRow
from node.messages import JobState, ReportMessage, ResultFile, ResultKind
from node.service import Node
from node.worklist import Finding, parse_findings, summarise_exports
from workers.reporting import publish_report

EARLIER_DAY = date(2024, 6, 1)


@dataclass(frozen=True)
class Scenario:
    node: Node
    chest: str
    head: str
    spine: str

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.node.http_port}{path}"


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("worklist")
    receiver = Node(make_settings(tmp / "receiver", http={"enabled": False}), with_worker=False)
    receiver.start()
    settings = make_settings(tmp / "node", exports={"poll_s": 0.2, "base_backoff_s": 600})
    settings = settings.model_copy(update={"destinations": [
        Destination(name="pacs", host="127.0.0.1", port=receiver.dicom_port, ae_title="PACSNODE"),
        Destination(name="down", host="127.0.0.1", port=free_port(), ae_title="NOBODY"),
    ]})
    node = Node(settings, with_worker=False)
    node.start()
    try:
        chest, head, spine = f.cxr(), f.ct_head(8), f.cxr(body_part="SPINE")
        f.send(chest + head + spine, tmp / "sent", node.dicom_port)
        uids = [str(s[0].StudyInstanceUID) for s in (chest, head, spine)]
        expected = dict(zip(uids, ("queued", "queued", "unmatched"), strict=True))
        assert wait_until(lambda: all(state_of(node.index, u) == s for u, s in expected.items()), timeout=15)
        with sqlite3.connect(settings.node.index_path, timeout=30) as db:  # the spine came in on an earlier day
            db.execute("UPDATE studies SET created_at=? WHERE study_uid=?",
                       (datetime(2024, 6, 1, 12).timestamp(), uids[2]))

        sr = f.sr_result(uids[0])
        sr_path = f"{uids[0]}/results/{sr.SOPInstanceUID}.dcm"
        f.write([sr], node.store.root / uids[0] / "results")
        jobs = {u: node.index.jobs_of(u)[0].job_id for u in uids[:2]}
        with connection(settings) as conn:
            publish_report(conn, settings, ReportMessage(job_id=jobs[uids[1]], state=JobState.PROCESSING))
            publish_report(conn, settings, ReportMessage(
                job_id=jobs[uids[0]], state=JobState.DONE, findings={"abnormal": 0.91},
                results=[ResultFile(path=sr_path, sop_uid=sr.SOPInstanceUID, sop_class_uid=sr.SOPClassUID,
                                    kind=ResultKind.SR)]))

        def settled() -> bool:
            exports = {e.destination: e for e in node.index.exports_of(uids[0])}
            return (state_of(node.index, uids[0]) == "done" and state_of(node.index, uids[1]) == "processing"
                    and exports.get("pacs") is not None and exports["pacs"].state == "sent"
                    and exports.get("down") is not None and exports["down"].attempts >= 1)

        assert wait_until(settled, timeout=20)
        yield Scenario(node, *uids)
    finally:
        node.stop()
        receiver.stop()


def test_api_lists_studies_with_findings_timings_and_export_status(scenario: Scenario) -> None:
    status, listing = get_json(scenario.url("/api/studies"))
    assert status == 200
    order = [s["study_uid"] for s in listing["studies"]]
    assert set(order[:2]) == {scenario.chest, scenario.head} and order[2] == scenario.spine  # newest received first
    assert listing["states"] == {"done": 1, "processing": 1, "unmatched": 1}
    assert listing["exports"]["sent"] == 1 and listing["exports"]["pending"] == 1
    by_uid = {s["study_uid"]: s for s in listing["studies"]}

    chest = by_uid[scenario.chest]
    assert chest["state"] == "done" and chest["image_count"] == 1
    (pipeline,) = chest["pipelines"]
    assert pipeline["pipeline"] == "cxr-abnormality" and pipeline["state"] == "done"
    assert pipeline["findings"] == [{"name": "abnormal", "probability": 0.91, "present": None}]
    assert pipeline["result_objects"] == 1
    received, completed, result = (datetime.fromisoformat(chest[k]) for k in ("received_at", "completed_at",
                                                                            "result_at"))
    assert received <= completed <= result and chest["processing_s"] >= 0
    exports = {e["destination"]: e for e in chest["exports"]}
    assert exports["pacs"]["text"] == "pacs: 1/1 sent" and exports["pacs"]["sent_at"]
    down = exports["down"]
    assert (down["state"], down["sent"], down["objects"]) == ("pending", 0, 1)
    assert down["last_status"] and down["next_attempt_at"]
    assert re.fullmatch(r"down: pending \(.+, retry \d\d:\d\d:\d\d\)", down["text"]), down["text"]

    head = by_uid[scenario.head]
    assert head["state"] == "processing" and head["result_at"] is None and head["processing_s"] is None
    assert [p["state"] for p in head["pipelines"]] == ["processing"] and head["exports"] == []
    spine = by_uid[scenario.spine]
    assert spine["state"] == "unmatched" and spine["pipelines"] == [] and spine["reason"] == "no routing rule matched"
    assert "PatientName" not in json.dumps(listing) and "PHANTOM" not in json.dumps(listing)


def test_api_filters_by_state_and_received_day(scenario: Scenario) -> None:
    today = date.today()

    def uids(query: str) -> list[str]:
        status, listing = get_json(scenario.url(f"/api/studies?{query}"))
        assert status == 200, listing
        return [s["study_uid"] for s in listing["studies"]]

    assert uids("state=done") == [scenario.chest]
    assert uids("state=unmatched") == [scenario.spine]
    assert uids("state=failed") == []
    assert uids(f"from={EARLIER_DAY}&to={EARLIER_DAY}") == [scenario.spine]
    assert set(uids(f"from={today}")) == {scenario.chest, scenario.head}
    assert uids(f"to={today - timedelta(days=1)}") == [scenario.spine]
    assert uids(f"from={today + timedelta(days=1)}") == []
    assert uids(f"state=done&from={EARLIER_DAY}&to={today}") == [scenario.chest]
    assert len(uids("limit=1")) == 1
    assert uids("state=&from=&to=")  # an empty form field means no filter

    for query, names in [("state=bogus", "state"), ("from=June", "from"), ("to=2024-13-01", "to"),
                         (f"from={today}&to={EARLIER_DAY}", "from"), ("limit=0", "limit"), ("limit=x", "limit")]:
        status, answer = get_json(scenario.url(f"/api/studies?{query}"))
        assert status == 400 and answer["error"].startswith(names), (query, answer)


def test_api_study_detail_and_unknown_study(scenario: Scenario) -> None:
    status, detail = get_json(scenario.url(f"/api/studies/{scenario.chest}"))
    assert status == 200
    assert detail["study_uid"] == scenario.chest and detail["state"] == "done"
    (series,) = detail["series"]
    assert (series["modality"], series["body_part"], series["kind"], series["instance_count"]) == (
        "DX", "CHEST", "image", 1)
    (job,) = detail["jobs"]
    assert job["job_id"] == f"{scenario.chest}/v1/cxr-abnormality" and job["findings"][0]["probability"] == 0.91
    objects = {e["destination"]: e for e in detail["export_objects"]}
    assert objects["pacs"]["state"] == "sent" and objects["pacs"]["kind"] == "sr"
    assert objects["down"]["state"] == "pending" and objects["down"]["attempts"] >= 1

    status, missing = get_json(scenario.url("/api/studies/1.2.3.4.5"))
    assert status == 404 and missing == {"error": "study not found", "study_uid": "1.2.3.4.5"}
    status, headers, page = get(scenario.url(f"/studies/{scenario.chest}"))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert scenario.chest in page.decode() and "abnormal 0.91" in page.decode()
    assert get(scenario.url("/studies/1.2.3"))[0] == 404 and get(scenario.url("/api/nothing"))[0] == 404


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (.ci/install installs it)")
def test_the_page_in_headless_chromium_lists_studies_and_filters(scenario: Scenario, tmp_path: Path) -> None:
    dom = dump_dom(scenario.url("/"), tmp_path / "profile")
    rows = dict(re.findall(r'<tr data-study-uid="([0-9.]+)" data-state="([a-z_]+)"', dom))
    assert rows == {scenario.chest: "done", scenario.head: "processing", scenario.spine: "unmatched"}
    assert '<span class="muted">cxr-abnormality:</span> <span class="call na">abnormal 0.91</span>' in dom
    assert "pacs: 1/1 sent" in dom and "down: pending (" in dom
    assert '<form method="get" action="/">' in dom and "PHANTOM" not in dom

    filtered = dump_dom(scenario.url(f"/?state=unmatched&from={EARLIER_DAY}&to={EARLIER_DAY}"),
                         tmp_path / "profile")
    assert dict(re.findall(r'<tr data-study-uid="([0-9.]+)" data-state="([a-z_]+)"', filtered)) == {
        scenario.spine: "unmatched"}
    assert '<option value="unmatched" selected="">' in filtered


def test_status_shows_findings_and_export_status_with_the_api_filters(scenario: Scenario) -> None:
    env = cli_env(scenario.node.settings)
    result = run_cli("status", env=env)
    assert result.returncode == 0, result.stderr
    assert "Studies by state: done=1, processing=1, unmatched=1" in result.stdout
    assert "Exports by state: pending=1, sent=1" in result.stdout
    (chest,) = [line for line in result.stdout.splitlines() if scenario.chest in line]
    assert "cxr-abnormality: abnormal 0.91" in chest and "pacs: 1/1 sent" in chest
    assert re.search(r"down: pending \(.+, retry \d\d:\d\d:\d\d\)", chest), chest

    only = run_cli("status", "--from", str(EARLIER_DAY), "--to", str(EARLIER_DAY), env=env)
    assert scenario.spine in only.stdout and scenario.chest not in only.stdout
    bad = run_cli("status", "--from", "yesterday", env=env)
    assert bad.returncode == 2 and "--from" in bad.stderr and "Traceback" not in bad.stderr


def test_exposed_worklist_needs_basic_credentials_and_audits_every_view(start_node, tmp_path: Path) -> None:
    audit = tmp_path / "audit" / "views.log"
    node = start_node(http={"auth": "basic", "audit_log": audit, "users": {
        "reader": "correct horse battery", "hashed": hash_password("staple", iterations=1000)}})
    chest = f.cxr()
    f.send(chest, tmp_path / "chest", node.dicom_port)
    uid = str(chest[0].StudyInstanceUID)
    base = f"http://127.0.0.1:{node.http_port}"

    status, headers, _ = get(f"{base}/")
    assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="pacsnode"')
    assert get(f"{base}/api/studies", basic("reader", "wrong"))[0] == 401
    assert get(f"{base}/api/studies", basic("nobody", "correct horse battery"))[0] == 401
    assert get(f"{base}/api/studies", {"Authorization": "Basic !!!"})[0] == 401
    assert get(f"{base}/metrics")[0] == 401
    assert get(f"{base}/health")[0] == 200  # probes need no credentials
    status, listing = get_json(f"{base}/api/studies?state=", basic("reader", "correct horse battery"))
    assert status == 200 and [s["study_uid"] for s in listing["studies"]] == [uid]
    assert get(f"{base}/api/studies/{uid}", basic("hashed", "staple"))[0] == 200
    assert get(f"{base}/", basic("hashed", "staple"))[0] == 200
    assert get(f"{base}/metrics", basic("reader", "correct horse battery"))[0] == 200

    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["user"], e["path"], e["status"]) for e in entries] == [
        ("anonymous", "/", 401),
        ("anonymous", "/api/studies", 401),
        ("anonymous", "/api/studies", 401),
        ("anonymous", "/api/studies", 401),
        ("reader", "/api/studies?state=", 200),
        ("hashed", f"/api/studies/{uid}", 200),
        ("hashed", "/", 200),
    ]
    assert all(e["client"] == "127.0.0.1" and e["method"] == "GET" and e["time"] for e in entries)
    text = audit.read_text()
    assert "wrong" not in text and "correct horse" not in text and "nobody" not in text and "PHANTOM" not in text


def test_token_auth_refuses_missing_and_bad_tokens(start_node, tmp_path: Path) -> None:
    token = "a-long-random-token-0123456789"
    node = start_node(http={"auth": "token", "token": token})
    base = f"http://127.0.0.1:{node.http_port}"
    status, headers, _ = get(f"{base}/api/studies")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert get(f"{base}/api/studies", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    assert get(f"{base}/api/studies", basic("token", token))[0] == 401
    assert get(f"{base}/api/studies", {"Authorization": f"Bearer {token}"})[0] == 200
    entries = [json.loads(line) for line in (node.settings.node.data_dir / "audit.log").read_text().splitlines()]
    assert [(e["user"], e["status"]) for e in entries] == [
        ("anonymous", 401), ("anonymous", 401), ("anonymous", 401), ("token", 200)]
    assert token not in (node.settings.node.data_dir / "audit.log").read_text()


def test_nothing_is_shown_when_the_audit_log_cannot_be_written(start_node, tmp_path: Path) -> None:
    node = start_node(http={"audit_log": tmp_path})  # a folder: every append fails
    base = f"http://127.0.0.1:{node.http_port}"
    status, answer = get_json(f"{base}/api/studies")
    assert status == 503 and answer == {"error": "audit log not writable"}
    assert get(f"{base}/")[0] == 503 and get(f"{base}/health")[0] == 200


@pytest.mark.parametrize("http", [
    {"host": "0.0.0.0"}, {"host": "::"}, {"host": "10.1.2.3"}, {"host": "node.example.org"},
    {"host": "0.0.0.0", "auth": "token", "token": "short"},
    {"host": "0.0.0.0", "auth": "basic"},
], ids=lambda h: "-".join(str(v) for v in h.values()))
def test_settings_refuse_an_exposed_worklist_without_auth(http: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(None, http=http)
    (error,) = caught.value.errors()
    assert error["loc"] == ("http",) and "http." in error["msg"]


@pytest.mark.parametrize("http", [
    {"host": "127.0.0.1"}, {"host": "localhost"}, {"host": "::1"}, {"host": "0.0.0.0", "enabled": False},
    {"host": "0.0.0.0", "auth": "token", "token": "0123456789abcdef"},
    {"host": "0.0.0.0", "auth": "basic", "users": {"reader": "pw"}},
])
def test_settings_accept_loopback_or_authenticated_hosts(http: dict[str, Any]) -> None:
    assert load_settings(None, http=http).http.host == http["host"]


def test_audit_log_lines_never_interleave(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "sub" / "audit.log")

    def views(n: int) -> None:
        for i in range(50):
            log.record(client="127.0.0.1", user=f"u{n}", method="GET", path=f"/api/studies?limit={i}" + "x" * 500,
                       status=200)

    threads = [threading.Thread(target=views, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert len(entries) == 400 and {e["user"] for e in entries} == {f"u{n}" for n in range(8)}


def test_findings_and_export_summaries_read_compactly() -> None:
    findings = parse_findings(json.dumps({"any": {"probability": 0.91, "present": True}, "bleed": 0.12,
                                          "edema": {"present": False}, "odd": "text"}))
    assert findings == (Finding("any", 0.91, True), Finding("bleed", 0.12, None), Finding("edema", None, False))
    assert [x.text() for x in findings] == ["any 0.91 PRESENT", "bleed 0.12", "edema ABSENT"]
    assert parse_findings("not json") == () and parse_findings("[1]") == ()
    (metastasis,) = parse_findings(json.dumps({"metastasis": {"probability": 0.97, "present": True, "lesions": 2,
                                                              "volume_mm3": 1234.5}}))
    assert metastasis.text() == "metastasis 0.97 PRESENT (2 lesions, 1.23 mL)"

    def row(destination: str, state: str, attempts: int = 1, status: str = "0x0000 Success") -> ExportRow:
        return ExportRow(job_id="j", destination=destination, sop_uid=f"1.{attempts}.{state}", kind="sr",
                         state=state, attempts=attempts, last_status=status,
                         next_attempt_at=datetime(2030, 1, 1, 12, 1).timestamp(), sent_at=None, updated_at=1.0)

    summaries = {s.destination: s.text() for s in summarise_exports([
        row("pacs", "sent"), row("pacs", "sent", 2), row("pacs", "sent", 3),
        row("viewer", "sent"), row("viewer", "pending", 2, "0xA700 Out of resources"),
        row("archive", "pending", 3, "0xA700"), row("archive", "failed", 4, "file missing"),
        row("new", "pending", 0, ""),
    ])}
    assert summaries == {
        "pacs": "pacs: 3/3 sent",
        "viewer": "viewer: 1/2 sent, pending (0xA700 Out of resources, retry 2030-01-01 12:01)",
        "archive": "archive: failed (file missing)",
        "new": "new: pending",
    }
