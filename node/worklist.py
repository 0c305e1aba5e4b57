"""The worklist: studies with their state, findings, timings and export status, read from the index.

One query module for every view of it (the HTTP JSON API, the web page and ``pacsnode status``),
so that they agree on what a filter means and how a finding or an export reads.

Dates filter on when the node *received* a study (its first instance, ``studies.created_at``),
as whole days in the node's local time zone, both ends inclusive. The study date (0008,0020)
is shown but not filtered on: it is often empty or the modality's clock, while the receive
date is what an operator reconciling "what came in today" needs, and it is never missing.

Triage: studies where a model called a ``triage.urgent`` finding present come first, whatever
the chosen sort, and are marked; the rest follow in the chosen order (newest received first by
default). The flag is set when a study version finishes and kept while a newer version is
processed: a bleed found stays on top until a newer result says otherwise.

Reads use their own short-lived connection with ``PRAGMA query_only``, in one read transaction
per call, so a listing is one consistent snapshot even while the node writes (WAL). The index has
no patient identity; where a store is given, the accession number (and, where allowed, the
patient name) is read from each study's first instance for display only, never logged.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from node.index import ExportRow, ExportState, NotificationRow, StudyIndex, StudyState
from node.messages import DisplayWindow, JobState, KeyImage, ModelSummary, OutputSummary, ResultKind
from node.store import StudyStore
from node.study_facts import read_study_facts

DATE_BASIS = "received"
DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
TERMINAL_JOB_STATES = frozenset({JobState.DONE.value, JobState.FAILED.value, JobState.NOT_APPLICABLE.value})
# What a worklist may be sorted by (the query's ``sort``), and the index column behind each.
SORT_COLUMNS = {"received": "created_at", "state": "state", "study_date": "study_date",
                "description": "study_description", "images": "image_count", "updated": "updated_at"}
DEFAULT_SORT = "received"


class QueryError(ValueError):
    """A filter the caller got wrong; the message names the parameter."""


def _date(name: str, text: str | None) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise QueryError(f"{name}: expected a date YYYY-MM-DD, got {text!r}") from exc


@dataclass(frozen=True)
class StudyQuery:
    """Which studies to list: state, received-date range (inclusive), how many, and in what order
    after the urgent ones (``sort`` a key of :data:`SORT_COLUMNS`, descending unless ``ascending``)."""

    state: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    limit: int = DEFAULT_LIMIT
    sort: str = DEFAULT_SORT
    ascending: bool = False

    @classmethod
    def parse(cls, state: str | None = None, date_from: str | None = None, date_to: str | None = None,
              limit: str | int | None = None, sort: str | None = None, order: str | None = None) -> StudyQuery:
        """Validate filters given as text (query string, command line); empty means unset."""
        states = [s.value for s in StudyState]
        if state and state not in states:
            raise QueryError(f"state: expected one of {', '.join(states)}, got {state!r}")
        start, end = _date("from", date_from), _date("to", date_to)
        if start and end and start > end:
            raise QueryError(f"from: {start} is after to: {end}")
        if limit in (None, ""):
            count = DEFAULT_LIMIT
        else:
            try:
                count = int(limit)
            except ValueError as exc:
                raise QueryError(f"limit: expected a whole number, got {limit!r}") from exc
            if not 1 <= count <= MAX_LIMIT:
                raise QueryError(f"limit: expected 1-{MAX_LIMIT}, got {count}")
        if sort and sort not in SORT_COLUMNS:
            raise QueryError(f"sort: expected one of {', '.join(SORT_COLUMNS)}, got {sort!r}")
        if order and order not in ("asc", "desc"):
            raise QueryError(f"order: expected asc or desc, got {order!r}")
        return cls(state or None, start, end, count, sort or DEFAULT_SORT, order == "asc")

    @classmethod
    def from_params(cls, params: Mapping[str, Sequence[str]]) -> StudyQuery:
        """From ``urllib.parse.parse_qs`` output (the first value of each parameter counts)."""
        def first(name: str) -> str | None:
            values = params.get(name)
            return values[0].strip() if values else None

        return cls.parse(first("state"), first("from"), first("to"), first("limit"), first("sort"), first("order"))

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "from": self.date_from.isoformat() if self.date_from else None,
                "to": self.date_to.isoformat() if self.date_to else None, "limit": self.limit,
                "sort": self.sort, "order": "asc" if self.ascending else "desc", "urgent_first": True,
                "date_basis": DATE_BASIS}

    def params(self, **changes: object) -> dict[str, str]:
        """This query as query-string parameters (unset ones left out), with ``changes`` applied:
        what the page's sort links and refresh keep."""
        values: dict[str, object] = {"state": self.state, "from": self.date_from, "to": self.date_to,
                                     "limit": self.limit, "sort": self.sort,
                                     "order": "asc" if self.ascending else "desc"} | changes
        return {key: str(value) for key, value in values.items() if value not in (None, "")}


def iso_time(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in local time with its offset, for JSON."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def short_time(ts: float | None, now: float | None = None) -> str:
    """Epoch seconds for a table: ``HH:MM:SS`` today, ``YYYY-MM-DD HH:MM`` on other days."""
    if ts is None:
        return ""
    moment = datetime.fromtimestamp(ts)
    today = datetime.fromtimestamp(time.time() if now is None else now).date()
    return moment.strftime("%H:%M:%S" if moment.date() == today else "%Y-%m-%d %H:%M")


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass(frozen=True)
class Finding:
    """One model output: its probability, and the call at the model's threshold where reported.

    Workers report ``{name: probability}``; a report of ``{name: {"probability": p, "present":
    bool, "threshold": t}}`` also carries the call and what it was made at. ``present`` is None
    where the call is not known; ``not_assessed`` holds the reason where the model makes no call on
    this finding (reported as ``"assessed": false``), which the text then shows instead of a call.
    """

    name: str
    probability: float | None
    present: bool | None
    lesions: int | None = None
    volume_mm3: float | None = None
    threshold: float | None = None
    not_assessed: str | None = None

    def text(self) -> str:
        """``any 0.82 (threshold 0.41) PRESENT``, or ``epidural 0.07 not assessed (why)``."""
        parts = [self.name]
        if self.probability is not None:
            parts.append(f"{self.probability:.2f}")
        if self.not_assessed is not None:
            parts.append(f"not assessed ({self.not_assessed})" if self.not_assessed else "not assessed")
        elif self.present is not None:
            if self.threshold is not None:
                parts.append(f"(threshold {self.threshold:.2f})")
            parts.append("PRESENT" if self.present else "ABSENT")
        if self.lesions:
            parts.append(f"({self.lesions} lesion{'s' if self.lesions > 1 else ''}, "
                         f"{(self.volume_mm3 or 0.0) / 1000:.2f} mL)")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "probability": self.probability, "present": self.present}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.not_assessed is not None:
            out |= {"assessed": False, "reason": self.not_assessed}
        if self.lesions is not None:  # segmentation models only
            out |= {"lesions": self.lesions, "volume_mm3": self.volume_mm3}
        return out


def as_number(value: object) -> float | None:
    """A JSON number as float; None for anything else (booleans included)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_findings(raw: str) -> tuple[Finding, ...]:
    """The job's findings column; entries of a shape this node does not know are left out."""
    try:
        data = json.loads(raw or "{}")
    except json.JSONDecodeError:
        return ()
    if not isinstance(data, dict):
        return ()
    findings = []
    for name, value in sorted(data.items()):
        if isinstance(value, bool):
            findings.append(Finding(name, None, value))
        elif isinstance(value, int | float):
            findings.append(Finding(name, float(value), None))
        elif isinstance(value, dict):
            lesions = value.get("lesions")
            present = value.get("present")
            reason = value.get("reason")
            findings.append(Finding(
                name, as_number(value.get("probability")), present if isinstance(present, bool) else None,
                lesions if isinstance(lesions, int) and not isinstance(lesions, bool) else None,
                as_number(value.get("volume_mm3")), as_number(value.get("threshold")),
                (reason if isinstance(reason, str) else "") if value.get("assessed") is False else None,
            ))
    return tuple(findings)


@dataclass(frozen=True)
class PipelineResult:
    """One job: a pipeline run on one version of a study, and what it found."""

    job_id: str
    pipeline: str
    version: int
    state: str
    reason: str
    attempts: int
    findings: tuple[Finding, ...]
    result_objects: int
    created_at: float
    published_at: float | None
    result_at: float | None  # when its outcome was reported; None while it is not finished
    model: ModelSummary | None = None
    key_images: tuple[KeyImage, ...] = ()
    seg_paths: tuple[str, ...] = ()  # its SEG results, relative to the store: outlines on the key images

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> PipelineResult:
        try:
            results = json.loads(row["results"] or "[]")
        except json.JSONDecodeError:
            results = []
        if not isinstance(results, list):
            results = []
        try:  # written by this node from validated reports; an unknown shape shows nothing
            model = ModelSummary.model_validate_json(row["model"]) if row["model"] not in ("", "{}") else None
            key_images = tuple(KeyImage.model_validate(k) for k in json.loads(row["key_images"] or "[]"))
        except (ValidationError, json.JSONDecodeError, TypeError):
            model, key_images = None, ()
        return cls(
            job_id=row["job_id"], pipeline=row["pipeline"], version=int(row["version"]), state=row["state"],
            reason=row["reason"], attempts=int(row["attempts"]), findings=parse_findings(row["findings"]),
            result_objects=len(results), created_at=float(row["created_at"]),
            published_at=row["published_at"],
            result_at=float(row["updated_at"]) if row["state"] in TERMINAL_JOB_STATES else None,
            model=model, key_images=key_images,
            seg_paths=tuple(str(r["path"]) for r in results
                            if isinstance(r, dict) and r.get("kind") == ResultKind.SEG.value and "path" in r),
        )

    def output(self, name: str) -> OutputSummary | None:
        """The model card's validation figures of one finding, where the report carried them."""
        return next((o for o in self.model.outputs if o.name == name), None) if self.model is not None else None

    def findings_text(self) -> str:
        """Compact, for a table cell: ``pipeline: name 0.91 PRESENT, ...``."""
        if not self.findings:
            return ""
        return f"{self.pipeline}: " + ", ".join(f.text() for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "pipeline": self.pipeline, "version": self.version, "state": self.state,
            "reason": self.reason, "attempts": self.attempts, "findings": [f.to_json() for f in self.findings],
            "result_objects": self.result_objects, "created_at": iso_time(self.created_at),
            "published_at": iso_time(self.published_at), "result_at": iso_time(self.result_at),
            "model": self.model.model_dump(mode="json") if self.model is not None else None,
            "key_images": [k.model_dump(mode="json") for k in self.key_images],
        }


@dataclass(frozen=True)
class ExportSummary:
    """The export of a study's results to one destination, over all its objects."""

    destination: str
    objects: int
    sent: int
    state: str  # "sent" when every object is; else the state of the objects still to go (failed first)
    last_status: str  # of that object's last attempt, as the exporter recorded it
    next_attempt_at: float | None  # a retry's time; None before the first attempt and once failed
    sent_at: float | None  # the latest object that went

    def text(self) -> str:
        """``pacs: 3/3 sent`` or ``pacs: 1/3 sent, pending (0xA700, retry 12:01)``."""
        if self.state == ExportState.SENT.value:
            return f"{self.destination}: {self.sent}/{self.objects} sent"
        details = [d for d in (self.last_status,
                               f"retry {short_time(self.next_attempt_at)}" if self.next_attempt_at else "") if d]
        head = f"{self.destination}: " + (f"{self.sent}/{self.objects} sent, " if self.sent else "")
        return head + self.state + (f" ({', '.join(details)})" if details else "")

    def to_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "objects": self.objects, "sent": self.sent, "state": self.state,
                "last_status": self.last_status or None, "next_attempt_at": iso_time(self.next_attempt_at),
                "sent_at": iso_time(self.sent_at), "text": self.text()}


def summarise_exports(rows: Sequence[ExportRow]) -> tuple[ExportSummary, ...]:
    """Per destination, from ``StudyIndex.exports_of`` rows; a failed object outranks pending ones."""
    by_destination: dict[str, list[ExportRow]] = {}
    for row in rows:
        by_destination.setdefault(row.destination, []).append(row)
    summaries = []
    for destination, items in sorted(by_destination.items()):
        sent = [r for r in items if r.state == ExportState.SENT.value]
        unsent = sorted((r for r in items if r.state != ExportState.SENT.value),
                        key=lambda r: (r.state != ExportState.FAILED.value, -r.updated_at))
        worst = unsent[0] if unsent else None
        summaries.append(ExportSummary(
            destination=destination, objects=len(items), sent=len(sent),
            state=worst.state if worst is not None else ExportState.SENT.value,
            last_status=worst.last_status if worst is not None else "",
            next_attempt_at=retry_at(worst) if worst is not None else None,
            sent_at=max((r.sent_at for r in sent if r.sent_at is not None), default=None),
        ))
    return tuple(summaries)


def retry_at(row: ExportRow) -> float | None:
    """When a pending object is tried again, once it has been tried at all."""
    return row.next_attempt_at if row.state == ExportState.PENDING.value and row.attempts else None


@dataclass(frozen=True)
class StudyEntry:
    """One worklist row: the study's current version, its pipelines, their findings and exports."""

    study_uid: str
    version: int
    state: str
    reason: str
    study_date: str
    study_description: str
    image_count: int
    bytes: int
    received_at: float
    last_instance_at: float
    completed_at: float | None  # when the node closed the study version and dispatched it
    pipelines: tuple[PipelineResult, ...]
    exports: tuple[ExportSummary, ...]
    urgent: bool = False
    accession: str = ""
    patient_name: str | None = None  # None: not shown (no authentication, or the settings say no)
    notifications: tuple[NotificationRow, ...] = ()  # of the current version, to the RIS

    def notifications_text(self) -> str:
        """``ris: sent`` or ``ris: pending (NAK AE, retry 12:01)``."""
        parts = []
        for n in self.notifications:
            retry = f"retry {short_time(n.next_attempt_at)}" if n.state == "pending" and n.attempts else ""
            details = ", ".join(d for d in (n.last_status if n.state != "sent" else "", retry) if d)
            parts.append(f"{n.target}: {n.state}" + (f" ({details})" if details else ""))
        return "; ".join(parts)

    @property
    def result_at(self) -> float | None:
        """When the last pipeline of this version reported its outcome; None until all have."""
        if not self.pipelines or any(p.result_at is None for p in self.pipelines):
            return None
        return max(p.result_at for p in self.pipelines if p.result_at is not None)

    @property
    def processing_s(self) -> float | None:
        """From dispatch (study complete) to the last result: what the AI took, queueing included."""
        if self.result_at is None or self.completed_at is None:
            return None
        return max(0.0, self.result_at - self.completed_at)

    def findings_text(self) -> str:
        return "; ".join(p.findings_text() for p in self.pipelines if p.findings)

    def exports_text(self) -> str:
        return "; ".join(e.text() for e in self.exports)

    def to_json(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid, "version": self.version, "state": self.state, "reason": self.reason,
            "urgent": self.urgent, "accession_number": self.accession,
            **({"patient_name": self.patient_name} if self.patient_name is not None else {}),
            "study_date": self.study_date, "study_description": self.study_description,
            "image_count": self.image_count, "bytes": self.bytes,
            "received_at": iso_time(self.received_at), "last_instance_at": iso_time(self.last_instance_at),
            "completed_at": iso_time(self.completed_at), "result_at": iso_time(self.result_at),
            "processing_s": None if self.processing_s is None else round(self.processing_s, 3),
            "pipelines": [p.to_json() for p in self.pipelines],
            "exports": [e.to_json() for e in self.exports],
            "notifications": [notification_json(n) for n in self.notifications],
        }


@dataclass(frozen=True)
class SeriesEntry:
    series_uid: str
    modality: str
    body_part: str
    series_number: int | None
    series_description: str
    kind: str
    instance_count: int

    def to_json(self) -> dict[str, Any]:
        return {"series_uid": self.series_uid, "modality": self.modality, "body_part": self.body_part,
                "series_number": self.series_number, "series_description": self.series_description,
                "kind": self.kind, "instance_count": self.instance_count}


def export_json(row: ExportRow) -> dict[str, Any]:
    """One export object as the API shows it (the retry time only while it is pending)."""
    return {"job_id": row.job_id, "destination": row.destination, "sop_uid": row.sop_uid, "kind": row.kind,
            "state": row.state, "attempts": row.attempts, "last_status": row.last_status or None,
            "next_attempt_at": iso_time(retry_at(row)), "sent_at": iso_time(row.sent_at),
            "updated_at": iso_time(row.updated_at)}


def notification_json(row: NotificationRow) -> dict[str, Any]:
    return {"target": row.target, "version": row.version, "urgent": row.urgent, "state": row.state,
            "attempts": row.attempts, "last_status": row.last_status,
            "next_attempt_at": iso_time(row.next_attempt_at) if row.state == "pending" else None,
            "sent_at": iso_time(row.sent_at)}


@dataclass(frozen=True)
class StudyDetail:
    """A study with all its series, the jobs of every version, each export object and each RIS
    notification."""

    study: StudyEntry
    series: tuple[SeriesEntry, ...]
    jobs: tuple[PipelineResult, ...]
    exports: tuple[ExportRow, ...]
    notifications: tuple[NotificationRow, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**self.study.to_json(), "series": [s.to_json() for s in self.series],
                "jobs": [j.to_json() for j in self.jobs], "export_objects": [export_json(e) for e in self.exports],
                "notifications": [notification_json(n) for n in self.notifications]}


JOB_COLUMNS = ("j.job_id, j.study_uid, j.pipeline, j.version, j.state, j.reason, j.attempts, j.results,"
               " j.findings, j.model, j.key_images, j.created_at, j.published_at, j.updated_at")


@dataclass(frozen=True)
class KeyImageSource:
    """What the renderer needs for one key image: the stored file, the frame, the window, the SEGs."""

    path: str  # relative to the store
    frame: int
    window: DisplayWindow | None
    seg_paths: tuple[str, ...]


@contextmanager
def snapshot(index: StudyIndex) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the index, all its queries in one transaction (one consistent view)."""
    conn = sqlite3.connect(index.path, timeout=30, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA query_only=ON")
        conn.execute("BEGIN")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


class Worklist:
    """Read-only queries over a node's index, shared by the API, the web page and the CLI.

    With a ``store``, entries carry the accession number from each study's first instance, and the
    patient name where ``show_patient_name`` (the HTTP server passes it only behind authentication).
    """

    def __init__(self, index: StudyIndex, store: StudyStore | None = None, show_patient_name: bool = False) -> None:
        self._index = index
        self._store = store
        self._show_patient_name = show_patient_name

    def counts_by_state(self) -> dict[str, int]:
        return self._index.counts_by_state()

    def export_counts(self) -> dict[str, int]:
        return self._index.export_counts()

    def studies(self, query: StudyQuery) -> list[StudyEntry]:
        """Newest received first."""
        where: list[str] = []
        params: list[object] = []
        if query.state:
            where.append("state=?")
            params.append(query.state)
        if query.date_from:
            where.append("created_at>=?")
            params.append(datetime.combine(query.date_from, datetime.min.time()).timestamp())
        if query.date_to:
            where.append("created_at<?")
            params.append(datetime.combine(query.date_to + timedelta(days=1), datetime.min.time()).timestamp())
        sql = "SELECT * FROM studies" + (" WHERE " + " AND ".join(where) if where else "")
        direction = "ASC" if query.ascending else "DESC"
        order = f" ORDER BY urgent DESC, {SORT_COLUMNS[query.sort]} {direction}, created_at DESC, study_uid LIMIT ?"
        with snapshot(self._index) as conn:
            studies = conn.execute(sql + order, (*params, query.limit)).fetchall()
            uids = [row["study_uid"] for row in studies]
            jobs: dict[str, list[PipelineResult]] = {}
            if uids:
                job_rows = conn.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs j JOIN studies s ON s.study_uid=j.study_uid"
                    f" AND s.version=j.version WHERE j.study_uid IN ({','.join('?' * len(uids))})"
                    " ORDER BY j.pipeline", uids,
                ).fetchall()
                for row in job_rows:
                    jobs.setdefault(row["study_uid"], []).append(PipelineResult.from_row(row))
        return [self._entry(row, jobs.get(row["study_uid"], [])) for row in studies]

    def study(self, study_uid: str) -> StudyDetail | None:
        with snapshot(self._index) as conn:
            row = conn.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None:
                return None
            series = conn.execute(
                "SELECT series_uid, modality, body_part, series_number, series_description, kind, instance_count"
                " FROM series WHERE study_uid=? ORDER BY kind, series_number, series_uid", (study_uid,),
            ).fetchall()
            job_rows = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs j WHERE j.study_uid=? ORDER BY j.version, j.pipeline",
                (study_uid,),
            ).fetchall()
        jobs = tuple(PipelineResult.from_row(r) for r in job_rows)
        exports = self._index.exports_of(study_uid)
        entry = self._entry(row, [j for j in jobs if j.version == row["version"]], exports)
        return StudyDetail(
            study=entry,
            series=tuple(SeriesEntry(**dict(s)) for s in series),
            jobs=jobs,
            exports=tuple(exports),
            notifications=tuple(self._index.notifications_of(study_uid)),
        )

    def key_image(self, study_uid: str, pipeline: str, number: int) -> KeyImageSource | None:
        """Key image ``number`` (0-based) that ``pipeline`` reported for the study's current version;
        None where there is no such image (or its instance is no longer stored)."""
        with snapshot(self._index) as conn:
            row = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs j JOIN studies s ON s.study_uid=j.study_uid AND s.version=j.version"
                " WHERE j.study_uid=? AND j.pipeline=?", (study_uid, pipeline)).fetchone()
            job = PipelineResult.from_row(row) if row is not None else None
            if job is None or not 0 <= number < len(job.key_images):
                return None
            key = job.key_images[number]
            instance = conn.execute("SELECT path FROM instances WHERE sop_uid=? AND study_uid=?",
                                    (key.sop_uid, study_uid)).fetchone()
        if instance is None:
            return None
        return KeyImageSource(str(instance["path"]), key.frame, key.window, job.seg_paths)

    def _entry(self, row: sqlite3.Row, jobs: list[PipelineResult],
               exports: Sequence[ExportRow] | None = None) -> StudyEntry:
        if exports is None:
            exports = self._index.exports_of(row["study_uid"])
        accession, name = "", None
        if self._store is not None:
            facts = read_study_facts(self._index, self._store, row["study_uid"], int(row["version"]))
            accession = facts.accession
            name = facts.patient_name if self._show_patient_name else None
        return StudyEntry(
            study_uid=row["study_uid"], version=int(row["version"]), state=row["state"], reason=row["reason"],
            study_date=row["study_date"], study_description=row["study_description"],
            image_count=int(row["image_count"]), bytes=int(row["bytes"]), received_at=float(row["created_at"]),
            last_instance_at=float(row["last_instance_at"]), completed_at=row["completed_at"],
            pipelines=tuple(jobs), exports=summarise_exports(exports), urgent=bool(row["urgent"]),
            accession=accession, patient_name=name,
            notifications=tuple(n for n in self._index.notifications_of(row["study_uid"])
                                if n.version == row["version"]),
        )
