"""The study index: studies, series, instances, dispatch jobs (the outbox), result exports (the
export outbox) and MPPS, in SQLite.

The node and its receiver processes open it (workers report through the broker). Every thread
gets its own connection; WAL with ``synchronous=FULL`` makes each commit durable, and the
ingest path batches many instances into one commit (see ``node.ingest``). Writers take turns
through a file lock beside the index (:class:`WriterTurns`).
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from config.settings import AnyDestination, UrgentFinding
from node.headers import InstanceHeader, InstanceKind
from node.messages import JobState, ReportMessage, ResultKind

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
    study_description TEXT NOT NULL DEFAULT '',
    image_count INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    completed_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state, last_instance_at);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    body_part TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    image_type TEXT NOT NULL,
    series_description TEXT NOT NULL,
    study_description TEXT NOT NULL,
    series_number INTEGER,
    rows INTEGER,
    columns INTEGER,
    slice_thickness REAL,
    kind TEXT NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    kind TEXT NOT NULL,
    version INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    rule TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL,
    results TEXT NOT NULL DEFAULT '[]',
    findings TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    published_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs(state, priority DESC, created_at);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid, version);
CREATE TABLE IF NOT EXISTS produced (
    sop_uid TEXT PRIMARY KEY,
    job_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS exports (
    job_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    PRIMARY KEY (job_id, destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS exports_due ON exports(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS exports_study ON exports(study_uid, state);
CREATE TABLE IF NOT EXISTS notifications (
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    target TEXT NOT NULL,
    urgent INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    PRIMARY KEY (study_uid, version, target)
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications(state, urgent DESC, next_attempt_at);
CREATE TABLE IF NOT EXISTS mpps (
    mpps_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    status TEXT NOT NULL,
    expected TEXT NOT NULL DEFAULT '[]',
    updated_at REAL NOT NULL
);
"""
# Columns added after the first release: created on new indexes and added to older ones at start
# (SQLite's ALTER TABLE ADD COLUMN is instant and keeps every row).
ADDED_COLUMNS = (
    ("studies", "urgent", "INTEGER NOT NULL DEFAULT 0"),  # a triage.urgent finding was called present
    ("jobs", "model", "TEXT NOT NULL DEFAULT '{}'"),  # the reporting model's ModelSummary
    ("jobs", "key_images", "TEXT NOT NULL DEFAULT '[]'"),  # its KeyImage list, for the worklist page
)


class StudyState(str, enum.Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"  # assembled and routed; dispatch committed, not yet published
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"
    UNMATCHED = "unmatched"  # no routing rule: kept and listed, never dispatched


IN_FLIGHT = (StudyState.RECEIVING, StudyState.COMPLETE, StudyState.QUEUED, StudyState.PROCESSING)
PRIORITY_VALUE = {"urgent": 9, "routine": 0}
PRIORITY_NAME = {value: name for name, value in PRIORITY_VALUE.items()}


class ExportState(str, enum.Enum):
    PENDING = "pending"  # to be sent at next_attempt_at
    SENT = "sent"  # the destination answered success or a warning
    FAILED = "failed"  # permanent: max attempts reached, or the file can never be sent


# What each kind of destination gets: SR and SEG where they can be shown, else KO and SC.
KINDS_FOR_SR_SEG = {True: (ResultKind.SR, ResultKind.SEG), False: (ResultKind.KO, ResultKind.SC)}


class IngestChange(enum.Enum):
    NEW = "new"  # a new instance was indexed
    KNOWN = "known"  # already indexed: nothing changed
    VANISHED = "vanished"  # its file was purged before it was indexed: the peer must resend
    MISPLACED = "misplaced"  # its SOP Instance UID is indexed under another study/series


@dataclass(frozen=True)
class Received:
    """One instance made durable in the store, ready to be indexed."""

    header: InstanceHeader
    path: str  # relative to the store
    size: int
    absolute: Path


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str
    body_part: str
    sop_class_uid: str
    image_type: str
    series_description: str
    study_description: str
    series_number: int | None
    rows: int | None
    columns: int | None
    slice_thickness: float | None
    kind: str
    instance_count: int


@dataclass(frozen=True)
class JobSpec:
    """A dispatch decided by routing, to be committed in the outbox."""

    pipeline: str
    rule: str
    priority: int
    payload: str  # a DispatchMessage as JSON


@dataclass(frozen=True)
class JobRow:
    job_id: str
    study_uid: str
    version: int
    pipeline: str
    priority: int
    state: str
    reason: str
    attempts: int
    payload: str
    created_at: float


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    version: int
    state: str
    reason: str
    study_date: str
    study_description: str
    image_count: int
    bytes: int
    created_at: float
    last_instance_at: float
    completed_at: float | None
    updated_at: float
    urgent: int = 0


@dataclass(frozen=True)
class ExportKey:
    """Identifies one export row: one result file for one destination."""

    job_id: str
    destination: str
    sop_uid: str


@dataclass(frozen=True)
class ExportRow:
    """One result file's export to one destination, as operators and the web page see it."""

    job_id: str
    destination: str
    sop_uid: str
    kind: str
    state: str
    attempts: int
    last_status: str
    next_attempt_at: float
    sent_at: float | None
    updated_at: float


@dataclass(frozen=True)
class DueExport:
    """A pending export whose time has come: what the exporter needs to send it."""

    key: ExportKey
    study_uid: str
    path: str  # relative to the store
    sop_class_uid: str
    attempts: int


@dataclass(frozen=True)
class PipelineOutcome:
    """One pipeline's report for a study version, as stored: findings by name, result files."""

    pipeline: str
    findings: dict[str, object]
    results: list[dict[str, object]]


@dataclass(frozen=True)
class NotificationRow:
    """One study version's notification to one RIS target (the outbox row)."""

    study_uid: str
    version: int
    target: str
    urgent: bool
    state: str
    attempts: int
    last_status: str
    next_attempt_at: float
    sent_at: float | None


@dataclass(frozen=True)
class ExportFailure:
    """A failed attempt; ``retry_at`` None makes the failure permanent."""

    key: ExportKey
    status: str
    retry_at: float | None


def job_id_for(study_uid: str, version: int, pipeline: str) -> str:
    """Deterministic: the same dispatch always has the same id (idempotent publishing)."""
    return f"{study_uid}/v{version}/{pipeline}"


class WriterTurns:
    """One writer at a time over all the node's processes, queued by ``flock(2)`` on
    ``<index>.writer`` (and a thread lock, since flock is held per open file, not per thread).
    Re-entrant in the thread that holds the turn.

    SQLite alone would do it with its busy handler, which sleeps 1, 2, 5, 10... ms between tries:
    with two receivers committing a few hundred times a second, a writer slept several ms past a
    3 ms commit. Here the next writer is woken as the lock is released."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._lock = threading.RLock()
        self._depth = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)


class StudyIndex:
    """SQLite-backed state of the node. Thread-safe: one connection per thread.

    ``destinations`` decide which result files a DONE report queues for export (and where);
    tools that only read the index or purge it (``pacsnode status``, ``purge``) pass none.
    """

    def __init__(self, path: Path, destinations: Sequence[AnyDestination] = (), notify: Sequence[str] = (),
                 urgent: Sequence[UrgentFinding] = ()) -> None:
        self.path = path
        self._destinations = tuple(destinations)
        self._notify = tuple(notify)
        self._urgent = tuple(urgent)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.turns = WriterTurns(path.with_name(path.name + ".writer"))
        conn = self._connection()
        conn.executescript(SCHEMA)
        for table, column, definition in ADDED_COLUMNS:
            present = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time, durable on return."""
        conn = self._connection()
        with self.turns.turn():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, params: Iterable[object] = ()) -> list[sqlite3.Row]:
        return self._connection().execute(sql, tuple(params)).fetchall()

    # --- ingest -------------------------------------------------------------------------

    def record_instances(self, batch: list[Received], now: float) -> list[IngestChange]:
        """Index a batch of durable instances in one transaction (group commit).

        An image instance opens its study, or re-opens a study that was already complete or
        dispatched as a new version (pending dispatches of the old version are superseded).
        Non-image objects and results are indexed but never touch the study's state.
        """
        changes: list[IngestChange] = []
        with self.transaction() as conn:
            for item in batch:
                changes.append(self._record_one(conn, item, now))
        return changes

    def _record_one(self, conn: sqlite3.Connection, item: Received, now: float) -> IngestChange:
        header = item.header
        key = header.key
        known = conn.execute("SELECT path FROM instances WHERE sop_uid=?", (key.sop_uid,)).fetchone()
        if known is not None:
            return IngestChange.KNOWN if known["path"] == item.path else IngestChange.MISPLACED
        if not item.absolute.exists():
            return IngestChange.VANISHED
        is_image = header.kind is InstanceKind.IMAGE
        study = conn.execute(
            "SELECT version, state, image_count FROM studies WHERE study_uid=?", (key.study_uid,)
        ).fetchone()
        if study is None:
            version = 1
            state = StudyState.RECEIVING if is_image else StudyState.NOT_APPLICABLE
            conn.execute(
                "INSERT INTO studies(study_uid, version, state, reason, study_date, study_description,"
                " created_at, last_instance_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (key.study_uid, version, state.value, "" if is_image else "no images received",
                 header.study_date, header.study_description, now, now, now),
            )
        else:
            version = int(study["version"])
            if is_image and study["state"] != StudyState.RECEIVING.value and not study["image_count"]:
                # Known so far only from non-image objects (a KO or report sent ahead of the
                # images): nothing was ever assembled or dispatched, so this opens version 1.
                conn.execute(
                    "UPDATE studies SET state=?, reason='' WHERE study_uid=?",
                    (StudyState.RECEIVING.value, key.study_uid),
                )
            elif is_image and study["state"] != StudyState.RECEIVING.value:
                version += 1
                conn.execute(
                    "UPDATE jobs SET state=?, reason=?, updated_at=? WHERE study_uid=? AND state=?",
                    (JobState.SUPERSEDED.value, f"study re-opened as version {version}", now,
                     key.study_uid, JobState.PENDING.value),
                )
                conn.execute(
                    "UPDATE studies SET version=?, state=?, reason='', completed_at=NULL WHERE study_uid=?",
                    (version, StudyState.RECEIVING.value, key.study_uid),
                )
        if is_image:
            conn.execute(
                "UPDATE studies SET image_count=image_count+1, bytes=bytes+?, last_instance_at=?, updated_at=?"
                " WHERE study_uid=?",
                (item.size, now, now, key.study_uid),
            )
        else:
            conn.execute(
                "UPDATE studies SET bytes=bytes+?, updated_at=? WHERE study_uid=?",
                (item.size, now, key.study_uid),
            )
        conn.execute(
            "INSERT INTO series(series_uid, study_uid, modality, body_part, sop_class_uid, image_type,"
            " series_description, study_description, series_number, rows, columns, slice_thickness, kind,"
            " instance_count) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1)"
            " ON CONFLICT(series_uid) DO UPDATE SET instance_count=instance_count+1",
            (key.series_uid, key.study_uid, header.modality, header.body_part, header.sop_class_uid,
             header.image_type, header.series_description, header.study_description, header.series_number,
             header.rows, header.columns, header.slice_thickness, header.kind.value),
        )
        conn.execute(
            "INSERT INTO instances(sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax_uid, path,"
            " size, kind, version, received_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (key.sop_uid, key.series_uid, key.study_uid, header.sop_class_uid, header.transfer_syntax_uid,
             item.path, item.size, header.kind.value, version, now),
        )
        return IngestChange.NEW

    def is_produced(self, sop_uid: str) -> bool:
        """True for a SOP Instance UID that one of our workers produced."""
        return bool(self._read("SELECT 1 FROM produced WHERE sop_uid=?", (sop_uid,)))

    # --- assembly -----------------------------------------------------------------------

    def receiving_studies(self) -> list[StudyRow]:
        rows = self._read("SELECT * FROM studies WHERE state=?", (StudyState.RECEIVING.value,))
        return [StudyRow(**dict(row)) for row in rows]

    def study(self, study_uid: str) -> StudyRow | None:
        rows = self._read("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return StudyRow(**dict(rows[0])) if rows else None

    def image_series(self, study_uid: str) -> list[SeriesRow]:
        rows = self._read(
            "SELECT * FROM series WHERE study_uid=? AND kind=? ORDER BY series_number, series_uid",
            (study_uid, InstanceKind.IMAGE.value),
        )
        return [SeriesRow(**dict(row)) for row in rows]

    def first_instance_path(self, study_uid: str) -> str | None:
        """A stored image of the study (its oldest), relative to the store; None if none is left."""
        row = self._read("SELECT path FROM instances WHERE study_uid=? AND kind=? ORDER BY received_at LIMIT 1",
                         (study_uid, InstanceKind.IMAGE.value))
        return str(row[0]["path"]) if row else None

    def series_instances(self, series_uid: str) -> list[str]:
        rows = self._read(
            "SELECT path FROM instances WHERE series_uid=? ORDER BY path", (series_uid,)
        )
        return [str(row["path"]) for row in rows]

    def received_sop_uids(self, study_uid: str, kind: InstanceKind | None = None) -> set[str]:
        if kind is None:
            rows = self._read("SELECT sop_uid FROM instances WHERE study_uid=?", (study_uid,))
        else:
            rows = self._read("SELECT sop_uid FROM instances WHERE study_uid=? AND kind=?", (study_uid, kind.value))
        return {str(row["sop_uid"]) for row in rows}

    def complete_study(self, study_uid: str, version: int, jobs: list[JobSpec], now: float) -> bool:
        """Close a study version: commit its dispatches (the outbox) or mark it unmatched.

        Returns False when the study changed meanwhile (a new instance, another version), in
        which case nothing is written and the assembler looks again later.
        """
        with self.transaction() as conn:
            current = conn.execute(
                "SELECT version, state FROM studies WHERE study_uid=?", (study_uid,)
            ).fetchone()
            if current is None or current["version"] != version or current["state"] != StudyState.RECEIVING.value:
                return False
            if not jobs:
                conn.execute(
                    "UPDATE studies SET state=?, reason=?, completed_at=?, updated_at=? WHERE study_uid=?",
                    (StudyState.UNMATCHED.value, "no routing rule matched", now, now, study_uid),
                )
                return True
            for job in jobs:
                conn.execute(
                    "INSERT OR IGNORE INTO jobs(job_id, study_uid, version, pipeline, rule, priority, state,"
                    " payload, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (job_id_for(study_uid, version, job.pipeline), study_uid, version, job.pipeline, job.rule,
                     job.priority, JobState.PENDING.value, job.payload, now, now),
                )
            conn.execute(
                "UPDATE studies SET state=?, completed_at=?, updated_at=? WHERE study_uid=?",
                (StudyState.COMPLETE.value, now, now, study_uid),
            )
        return True

    # --- MPPS ---------------------------------------------------------------------------

    def record_mpps(self, mpps_uid: str, study_uid: str | None, status: str, expected: list[str] | None,
                    now: float) -> None:
        with self.transaction() as conn:
            row = conn.execute("SELECT study_uid, expected FROM mpps WHERE mpps_uid=?", (mpps_uid,)).fetchone()
            study = study_uid or (row["study_uid"] if row else "")
            expected_json = json.dumps(expected) if expected is not None else (row["expected"] if row else "[]")
            conn.execute(
                "INSERT INTO mpps(mpps_uid, study_uid, status, expected, updated_at) VALUES (?,?,?,?,?)"
                " ON CONFLICT(mpps_uid) DO UPDATE SET study_uid=excluded.study_uid, status=excluded.status,"
                " expected=excluded.expected, updated_at=excluded.updated_at",
                (mpps_uid, study, status, expected_json, now),
            )

    def mpps_expected(self, study_uid: str) -> set[str] | None:
        """SOP Instance UIDs that COMPLETED MPPS steps of this study list; None if none completed."""
        rows = self._read(
            "SELECT expected FROM mpps WHERE study_uid=? AND status='COMPLETED'", (study_uid,)
        )
        if not rows:
            return None
        expected: set[str] = set()
        for row in rows:
            expected.update(json.loads(row["expected"]))
        return expected

    # --- dispatch outbox ----------------------------------------------------------------

    def pending_jobs(self, limit: int = 100) -> list[JobRow]:
        """Pending dispatches, urgent first, then oldest first."""
        rows = self._read(
            "SELECT job_id, study_uid, version, pipeline, priority, state, reason, attempts, payload, created_at"
            " FROM jobs WHERE state=? ORDER BY priority DESC, created_at LIMIT ?",
            (JobState.PENDING.value, limit),
        )
        return [JobRow(**dict(row)) for row in rows]

    def mark_published(self, job_id: str, now: float) -> None:
        with self.transaction() as conn:
            updated = conn.execute(
                "UPDATE jobs SET state=?, published_at=?, updated_at=? WHERE job_id=? AND state=?",
                (JobState.QUEUED.value, now, now, job_id, JobState.PENDING.value),
            ).rowcount
            if updated:
                study_uid, version = conn.execute(
                    "SELECT study_uid, version FROM jobs WHERE job_id=?", (job_id,)
                ).fetchone()
                self._refresh_study(conn, study_uid, version, now)

    def jobs_of(self, study_uid: str) -> list[JobRow]:
        rows = self._read(
            "SELECT job_id, study_uid, version, pipeline, priority, state, reason, attempts, payload, created_at"
            " FROM jobs WHERE study_uid=? ORDER BY version, pipeline",
            (study_uid,),
        )
        return [JobRow(**dict(row)) for row in rows]

    def apply_report(self, report: ReportMessage, now: float) -> bool:
        """Apply a worker's report; returns False for an unknown job (kept out of the index).

        A DONE report queues its result files for export in the same transaction, so a report
        is never acknowledged without its exports. Results of a superseded version (the study
        was re-opened meanwhile) are not exported: the newer version's results replace them
        (its SR names the older one as predecessor) and sending both only adds noise.
        """
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT study_uid, version, state FROM jobs WHERE job_id=?", (report.job_id,)
            ).fetchone()
            if row is None:
                return False
            terminal = {JobState.DONE.value, JobState.FAILED.value, JobState.NOT_APPLICABLE.value}
            if row["state"] in terminal and report.state is JobState.PROCESSING:
                return True  # a late "processing" from a redelivery must not undo an outcome
            conn.execute(
                "UPDATE jobs SET state=?, reason=?, attempts=MAX(attempts, ?), results=?, findings=?, model=?,"
                " key_images=?, updated_at=? WHERE job_id=?",
                (report.state.value, report.reason, report.attempt,
                 json.dumps([r.model_dump(mode="json") for r in report.results]),
                 json.dumps(report.model_dump(mode="json")["findings"]),
                 json.dumps(report.model.model_dump(mode="json") if report.model is not None else {}),
                 json.dumps([k.model_dump(mode="json") for k in report.key_images]), now, report.job_id),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO produced(sop_uid, job_id) VALUES (?,?)",
                [(r.sop_uid, report.job_id) for r in report.results],
            )
            if report.state is JobState.DONE and report.results:
                self._queue_exports(conn, report, row["study_uid"], row["version"], now)
            self._refresh_study(conn, row["study_uid"], row["version"], now)
        return True

    def _queue_exports(self, conn: sqlite3.Connection, report: ReportMessage, study_uid: str, version: int,
                       now: float) -> None:
        """One pending export per (destination, fitting result file); duplicates add nothing."""
        current = conn.execute("SELECT version FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        if current is None or current["version"] != version:
            return
        conn.executemany(
            "INSERT OR IGNORE INTO exports(job_id, destination, sop_uid, study_uid, path, sop_class_uid, kind,"
            " state, next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(report.job_id, dest.name, result.sop_uid, study_uid, result.path, result.sop_class_uid,
              result.kind.value, ExportState.PENDING.value, now, now, now)
             for dest in self._destinations for result in report.results
             if result.kind in KINDS_FOR_SR_SEG[dest.accepts_sr_seg]],
        )

    # --- export outbox ------------------------------------------------------------------

    def due_exports(self, now: float, limit: int = 500) -> list[DueExport]:
        """Pending exports whose next attempt is due, oldest due first."""
        rows = self._read(
            "SELECT job_id, destination, sop_uid, study_uid, path, sop_class_uid, attempts FROM exports"
            " WHERE state=? AND next_attempt_at<=? ORDER BY next_attempt_at, created_at LIMIT ?",
            (ExportState.PENDING.value, now, limit),
        )
        return [DueExport(ExportKey(row["job_id"], row["destination"], row["sop_uid"]), row["study_uid"],
                          row["path"], row["sop_class_uid"], int(row["attempts"])) for row in rows]

    def record_export_outcomes(self, sent: Mapping[ExportKey, str], failures: Iterable[ExportFailure],
                               now: float) -> None:
        """Record one round of attempts in one transaction: ``sent`` maps each sent export to its
        status (success or a warning); a failure is retried at its ``retry_at``, or, without
        one, failed for good."""
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE exports SET state=?, attempts=attempts+1, last_status=?, sent_at=?, updated_at=?"
                " WHERE job_id=? AND destination=? AND sop_uid=? AND state=?",
                [(ExportState.SENT.value, status, now, now, k.job_id, k.destination, k.sop_uid,
                  ExportState.PENDING.value) for k, status in sent.items()],
            )
            conn.executemany(
                "UPDATE exports SET state=?, attempts=attempts+1, last_status=?, next_attempt_at=?, updated_at=?"
                " WHERE job_id=? AND destination=? AND sop_uid=? AND state=?",
                [(ExportState.PENDING.value if f.retry_at is not None else ExportState.FAILED.value, f.status,
                  f.retry_at if f.retry_at is not None else now, now, f.key.job_id, f.key.destination,
                  f.key.sop_uid, ExportState.PENDING.value) for f in failures],
            )

    def exports_of(self, study_uid: str) -> list[ExportRow]:
        rows = self._read(
            "SELECT job_id, destination, sop_uid, kind, state, attempts, last_status, next_attempt_at, sent_at,"
            " updated_at FROM exports WHERE study_uid=? ORDER BY job_id, destination, kind, sop_uid",
            (study_uid,),
        )
        return [ExportRow(**dict(row)) for row in rows]

    def export_counts(self) -> dict[str, int]:
        """Exports by state (every state present, zero included, so a gauge never goes stale)."""
        counts = {state.value: 0 for state in ExportState}
        for row in self._read("SELECT state, COUNT(*) AS n FROM exports GROUP BY state"):
            counts[str(row["state"])] = int(row["n"])
        return counts

    def _refresh_study(self, conn: sqlite3.Connection, study_uid: str, version: int, now: float) -> None:
        """Derive the study's state from the jobs of its current version."""
        study = conn.execute("SELECT version, state FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        if study is None or study["version"] != version or study["state"] == StudyState.RECEIVING.value:
            return
        states = [
            r["state"] for r in conn.execute(
                "SELECT state FROM jobs WHERE study_uid=? AND version=?", (study_uid, version)
            )
        ]
        reasons = [
            r["reason"] for r in conn.execute(
                "SELECT reason FROM jobs WHERE study_uid=? AND version=? AND reason!=''", (study_uid, version)
            )
        ]
        if not states:
            return
        if any(s == JobState.PENDING.value for s in states):
            new = StudyState.COMPLETE
        elif any(s == JobState.PROCESSING.value for s in states):
            new = StudyState.PROCESSING
        elif any(s == JobState.QUEUED.value for s in states):
            new = StudyState.QUEUED
        elif any(s == JobState.FAILED.value for s in states):
            new = StudyState.FAILED
        elif any(s == JobState.DONE.value for s in states):
            new = StudyState.DONE
        else:
            new = StudyState.NOT_APPLICABLE
        conn.execute(
            "UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_uid=?",
            (new.value, "; ".join(reasons), now, study_uid),
        )
        if new is StudyState.DONE and study["state"] != StudyState.DONE.value:
            # Urgency (triage.urgent) is decided once, as the version finishes: the worklist sorts by
            # it and the RIS notifications carry it.
            urgent = self.is_urgent({o.pipeline: o.findings for o in self._version_outcomes(conn, study_uid, version)})
            conn.execute("UPDATE studies SET urgent=? WHERE study_uid=?", (int(urgent), study_uid))
            self._queue_notifications(conn, study_uid, version, urgent, now)

    def is_urgent(self, findings_by_pipeline: Mapping[str, Mapping[str, object]]) -> bool:
        """Whether any model called one of the ``triage.urgent`` findings present."""
        for rule in self._urgent:
            finding = findings_by_pipeline.get(rule.pipeline, {}).get(rule.finding)
            if isinstance(finding, Mapping) and finding.get("present") is True:
                return True
        return False

    @staticmethod
    def _version_outcomes(conn: sqlite3.Connection, study_uid: str, version: int) -> list[PipelineOutcome]:
        rows = conn.execute("SELECT pipeline, findings, results FROM jobs WHERE study_uid=? AND version=?"
                            " ORDER BY pipeline", (study_uid, version))
        return [PipelineOutcome(row["pipeline"], json.loads(row["findings"]), json.loads(row["results"]))
                for row in rows]

    def _queue_notifications(self, conn: sqlite3.Connection, study_uid: str, version: int, urgent: bool,
                             now: float) -> None:
        """One pending notification per RIS target, in the transaction that finished the study."""
        conn.executemany(
            "INSERT OR IGNORE INTO notifications(study_uid, version, target, urgent, state, next_attempt_at,"
            " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            [(study_uid, version, target, int(urgent), ExportState.PENDING.value, now, now, now)
             for target in self._notify])

    # --- notification outbox ------------------------------------------------------------

    def due_notifications(self, now: float, limit: int = 100) -> list[NotificationRow]:
        """Pending notifications whose attempt is due: urgent studies first, then oldest due."""
        rows = self._read(
            "SELECT study_uid, version, target, urgent, state, attempts, last_status, next_attempt_at, sent_at"
            " FROM notifications WHERE state=? AND next_attempt_at<=? ORDER BY urgent DESC, next_attempt_at LIMIT ?",
            (ExportState.PENDING.value, now, limit))
        return [NotificationRow(**{**dict(row), "urgent": bool(row["urgent"])}) for row in rows]

    def record_notification(self, row: NotificationRow, status: str, sent: bool, retry_at: float | None,
                            now: float) -> None:
        """One attempt's outcome: sent, retried at ``retry_at``, or (neither) failed for good."""
        state = ExportState.SENT if sent else ExportState.PENDING if retry_at is not None else ExportState.FAILED
        with self.transaction() as conn:
            conn.execute(
                "UPDATE notifications SET state=?, attempts=attempts+1, last_status=?, next_attempt_at=?,"
                " sent_at=?, updated_at=? WHERE study_uid=? AND version=? AND target=? AND state=?",
                (state.value, status, retry_at if retry_at is not None else now, now if sent else None, now,
                 row.study_uid, row.version, row.target, ExportState.PENDING.value))

    def notifications_of(self, study_uid: str) -> list[NotificationRow]:
        rows = self._read(
            "SELECT study_uid, version, target, urgent, state, attempts, last_status, next_attempt_at, sent_at"
            " FROM notifications WHERE study_uid=? ORDER BY version, target", (study_uid,))
        return [NotificationRow(**{**dict(row), "urgent": bool(row["urgent"])}) for row in rows]

    def version_outcomes(self, study_uid: str, version: int) -> list[PipelineOutcome]:
        """What each pipeline reported for one version of a study: findings and result files."""
        return self._version_outcomes(self._connection(), study_uid, version)

    # --- listing and retention ----------------------------------------------------------

    def studies(self, state: str | None = None, limit: int = 200) -> list[StudyRow]:
        if state:
            rows = self._read(
                "SELECT * FROM studies WHERE state=? ORDER BY updated_at DESC LIMIT ?", (state, limit)
            )
        else:
            rows = self._read("SELECT * FROM studies ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [StudyRow(**dict(row)) for row in rows]

    def counts_by_state(self) -> dict[str, int]:
        rows = self._read("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")
        return {str(row["state"]): int(row["n"]) for row in rows}

    def finished_studies_oldest_first(self) -> list[StudyRow]:
        """Studies retention may purge: not in flight, and no result or notification still waiting."""
        in_flight = tuple(s.value for s in IN_FLIGHT)
        rows = self._read(
            f"SELECT * FROM studies WHERE state NOT IN ({','.join('?' * len(in_flight))})"
            " AND NOT EXISTS (SELECT 1 FROM exports WHERE exports.study_uid=studies.study_uid AND exports.state=?)"
            " AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.study_uid=studies.study_uid AND n.state=?)"
            " ORDER BY updated_at",
            (*in_flight, ExportState.PENDING.value, ExportState.PENDING.value),
        )
        return [StudyRow(**dict(row)) for row in rows]

    def forget_study(self, study_uid: str, expected_updated_at: float, retire_files: Callable[[], object]) -> bool:
        """Remove a finished study from the index, unless it changed since it was chosen.

        ``retire_files`` (moving the study's folder out of the store) runs inside the same
        transaction, so an instance arriving meanwhile is either indexed first (and the study
        is kept) or finds its file gone and is refused, to be re-sent. A study with exports or
        notifications still pending is kept: they read its files.
        """
        in_flight = tuple(s.value for s in IN_FLIGHT)
        with self.transaction() as conn:
            deleted = conn.execute(
                f"DELETE FROM studies WHERE study_uid=? AND updated_at=? AND state NOT IN"
                f" ({','.join('?' * len(in_flight))})"
                " AND NOT EXISTS (SELECT 1 FROM exports WHERE study_uid=? AND state=?)"
                " AND NOT EXISTS (SELECT 1 FROM notifications WHERE study_uid=? AND state=?)",
                (study_uid, expected_updated_at, *in_flight, study_uid, ExportState.PENDING.value, study_uid,
                 ExportState.PENDING.value),
            ).rowcount
            if not deleted:
                return False
            # Our results' UIDs go with their jobs: a purged study's results are files no longer kept.
            conn.execute("DELETE FROM produced WHERE job_id IN (SELECT job_id FROM jobs WHERE study_uid=?)",
                         (study_uid,))
            for table in ("series", "instances", "jobs", "mpps", "exports", "notifications"):
                conn.execute(f"DELETE FROM {table} WHERE study_uid=?", (study_uid,))
            retire_files()
        return True
