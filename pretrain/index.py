"""``pacsnode pretrain index``: what an archive of DICOM files holds, one SQLite row per frame.

The archive is walked with ``os.scandir`` generators (memory bounded by folder depth, not by the
number of files) and only headers are read: pixel data is deferred, never loaded, yet its
presence and its length are known, so files without pixel data and files cut short are caught
here rather than in ``prepare``. Headers are parsed in worker processes with a bounded number of
chunks in flight; one writer (this process) owns the SQLite file.

Incremental: the ``files`` table remembers every file seen with its size and mtime, so a second
run over a grown archive reads only new or changed files (a changed file's frames are replaced),
and files gone from a walked folder are dropped. Skipped files are counted by reason and kept
in ``files`` (with ``status = 'skipped'``), so a skipped file is not re-read either. Files
without the Part 10 preamble and ``DICM`` prefix count as ``not-dicom``: without it, any file
would parse as something. Nothing here
logs paths or patient attributes: archive paths can carry names; the table is the place to look.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self, TypeVar

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pretrain.decode import DECODE_ERRORS, has_pixel_data, number_of_frames
from pretrain.geometry import frame_spacing, slice_position
from pretrain.progress import rate_progress

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Values above this size stay on disk while a header is read (pixel data above all, also overlays).
DEFER_BYTES = 4096
# The only elements a header read parses (the rest is skipped by seeking): about twice as fast.
HEADER_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "ImageType",
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "BodyPartExamined",
    "SliceThickness",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "BitsStored",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
)
LOOKUP_BATCH = 512  # paths looked up in ``files`` per query
CHUNK_FILES = 32  # files per task sent to a worker
IN_FLIGHT_PER_WORKER = 4
COMMIT_EVERY_S = 2.0

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,            -- absolute
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL,             -- 'image' or 'skipped'
    reason TEXT NOT NULL DEFAULT '',  -- why skipped: not-dicom, non-image:SR, no-pixel-data, ...
    frames INTEGER NOT NULL DEFAULT 0,
    run INTEGER NOT NULL              -- the last run that saw the file (drops vanished files)
);
CREATE TABLE IF NOT EXISTS images (
    path TEXT NOT NULL,
    frame INTEGER NOT NULL,           -- 0-based frame of a multi-frame object
    number_of_frames INTEGER NOT NULL,
    modality TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    rows INTEGER NOT NULL,
    columns INTEGER NOT NULL,
    spacing_row REAL,                 -- mm; PixelSpacing, ImagerPixelSpacing or functional groups
    spacing_col REAL,
    slice_thickness REAL,
    photometric TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    samples_per_pixel INTEGER NOT NULL,
    bits_stored INTEGER NOT NULL,
    body_part TEXT NOT NULL,
    instance_number INTEGER,
    slice_position REAL,              -- ImagePositionPatient projected on the slice normal (mm)
    image_type TEXT NOT NULL,         -- values joined with '\\'
    PRIMARY KEY (path, frame)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS images_series
    ON images (study_uid, series_uid, slice_position, instance_number, frame, path);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}'), ('runs', '0');
"""

IMAGE_COLUMNS: tuple[str, ...] = (
    "path",
    "frame",
    "number_of_frames",
    "modality",
    "sop_class_uid",
    "sop_uid",
    "study_uid",
    "series_uid",
    "rows",
    "columns",
    "spacing_row",
    "spacing_col",
    "slice_thickness",
    "photometric",
    "transfer_syntax",
    "samples_per_pixel",
    "bits_stored",
    "body_part",
    "instance_number",
    "slice_position",
    "image_type",
)

# SOP classes that are not images, by UID or UID prefix (a prefix ends with '.'), with the short
# name the skip reason carries. RT Image (481.1) is an image; the other RT objects are not.
_NON_IMAGE_EXACT: MappingProxyType[str, str] = MappingProxyType(
    {
        "1.2.840.10008.1.3.10": "DICOMDIR",
        "1.2.840.10008.5.1.4.1.1.66": "RAW",
        "1.2.840.10008.5.1.4.1.1.66.1": "REG",
        "1.2.840.10008.5.1.4.1.1.66.2": "FID",
        "1.2.840.10008.5.1.4.1.1.66.3": "REG",
        "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
        "1.2.840.10008.5.1.4.1.1.66.5": "SEG",
        "1.2.840.10008.5.1.4.1.1.66.6": "TRACT",
        "1.2.840.10008.5.1.4.1.1.66.7": "SEG",
        "1.2.840.10008.5.1.4.1.1.66.8": "SEG",
        "1.2.840.10008.5.1.4.1.1.4.2": "SPECTROSCOPY",
        "1.2.840.10008.5.1.4.1.1.30": "PMAP",
        "1.2.840.10008.5.1.4.1.1.67": "RWV",
        "1.2.840.10008.5.1.4.1.1.88.59": "KO",
        "1.2.840.10008.5.1.4.1.1.104.1": "PDF",
        "1.2.840.10008.5.1.4.1.1.104.2": "CDA",
        "1.2.840.10008.5.1.4.1.1.481.1": "",  # RT Image: an image
        "1.2.840.10008.5.1.4.1.1.481.2": "RTDOSE",
        "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
        "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",
        "1.2.840.10008.5.1.4.1.1.90.1": "ASSESSMENT",
        "1.2.840.10008.5.1.4.1.1.91.1": "ANN",
    }
)
_NON_IMAGE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.", "SR"),
    ("1.2.840.10008.5.1.4.1.1.11.", "PR"),
    ("1.2.840.10008.5.1.4.1.1.9.", "WAVEFORM"),
    ("1.2.840.10008.5.1.4.1.1.104.", "DOC"),
    ("1.2.840.10008.5.1.4.1.1.481.", "RT"),
    ("1.2.840.10008.5.1.4.1.1.68.", "SURFACE"),
    ("1.2.840.10008.5.1.4.1.1.200.", "PROTOCOL"),
    ("1.2.840.10008.5.1.4.34.", "RT"),
    ("1.2.840.10008.5.1.4.38.", "HANGING"),
    ("1.2.840.10008.5.1.4.39.", "PALETTE"),
    ("1.2.840.10008.5.1.4.43.", "IMPLANT"),
    ("1.2.840.10008.5.1.4.44.", "IMPLANT"),
    ("1.2.840.10008.5.1.4.45.", "IMPLANT"),
)

T = TypeVar("T")


def non_image_name(sop_class_uid: str) -> str | None:
    """The short name of a non-image SOP class (``SR``, ``SEG``, ...), ``None`` for an image class."""
    if sop_class_uid in _NON_IMAGE_EXACT:
        return _NON_IMAGE_EXACT[sop_class_uid] or None
    for prefix, name in _NON_IMAGE_PREFIXES:
        if sop_class_uid.startswith(prefix):
            return name
    return None


@dataclass(frozen=True)
class IndexSummary:
    """What one ``build_index`` run did (counts are of this run; ``total_frames`` is the index's)."""

    files_seen: int  # files found by the walk
    files_read: int  # new or changed: headers read this run
    files_unchanged: int  # indexed before with the same size and mtime: not read again
    files_removed: int  # indexed before, gone from the walked folders
    images: int  # image files recorded this run
    frames: int  # frame rows recorded this run
    total_frames: int  # frame rows in the index after the run
    skipped: dict[str, int]  # files read this run and skipped, by reason
    seconds: float

    @property
    def files_per_s(self) -> float:
        """Files walked per second (unchanged files included: that is what a re-run costs)."""
        return self.files_seen / self.seconds if self.seconds > 0 else 0.0

    @property
    def read_per_s(self) -> float:
        """Headers read per second (new or changed files only)."""
        return self.files_read / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "skipped": dict(self.skipped),
            "files_per_s": round(self.files_per_s, 1),
            "read_per_s": round(self.read_per_s, 1),
        }


@dataclass(frozen=True)
class _Candidate:
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Outcome:
    """What a worker made of one file: a skip reason, or the frame rows (IMAGE_COLUMNS order)."""

    candidate: _Candidate
    reason: str = ""
    rows: list[tuple[Any, ...]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading one header (runs in worker processes)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(item).strip() for item in value)
    return str(value).strip()


def _int(value: Any) -> int | None:
    """An integer header value, ``None`` when absent or unusable; bounded so SQLite can store it."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if -(2**63) <= number < 2**63 else None


def _truncated(ds: Dataset, size: int) -> bool:
    """Whether the file ends inside the value of its last element (pixel data, usually).

    pydicom stops quietly at the end of a file, so a file cut short would otherwise pass as one
    without pixel data, or as an image whose pixels are missing.
    """
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return False  # offsets are into the inflated stream, not the file
    tags = list(ds.keys())
    if not tags:
        return False
    last = ds.get_item(max(tags), keep_deferred=True)
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
        return False
    return last.value_tell + last.length > size


def _transfer_syntax_supported(ds: Dataset) -> bool:
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    if not transfer_syntax:
        return False
    try:
        return bool(get_decoder(transfer_syntax).is_available)
    except NotImplementedError:
        return False


def _frame_rows(ds: Dataset, path: str) -> list[tuple[Any, ...]]:
    frames = number_of_frames(ds)
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    common = {
        "modality": _text(ds, "Modality").upper(),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "sop_uid": _text(ds, "SOPInstanceUID"),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "rows": _int(ds.get("Rows")) or 0,
        "columns": _int(ds.get("Columns")) or 0,
        "photometric": _text(ds, "PhotometricInterpretation").upper(),
        "samples_per_pixel": _int(ds.get("SamplesPerPixel")) or 1,
        "bits_stored": _int(ds.get("BitsStored")) or 0,
        "body_part": _text(ds, "BodyPartExamined").upper(),
        "instance_number": _int(ds.get("InstanceNumber")),
        "image_type": _text(ds, "ImageType"),
    }
    rows = []
    for frame in range(frames):
        spacing_row, spacing_col, thickness = frame_spacing(ds, frame)
        values = {
            **common,
            "path": path,
            "frame": frame,
            "number_of_frames": frames,
            "spacing_row": spacing_row,
            "spacing_col": spacing_col,
            "slice_thickness": thickness,
            "transfer_syntax": transfer_syntax,
            "slice_position": slice_position(ds, frame),
        }
        rows.append(tuple(values[column] for column in IMAGE_COLUMNS))
    return rows


def read_header(candidate: _Candidate) -> _Outcome:
    """Classify one file: a skip reason, or one row per frame. Never raises for a bad file."""
    try:
        ds = pydicom.dcmread(candidate.path, defer_size=DEFER_BYTES, specific_tags=list(HEADER_KEYWORDS))
    except InvalidDicomError:
        return _Outcome(candidate, "not-dicom")
    except FileNotFoundError:
        return _Outcome(candidate, "vanished")
    except DECODE_ERRORS:
        return _Outcome(candidate, "unreadable")
    try:
        if _truncated(ds, candidate.size):
            return _Outcome(candidate, "truncated")
        name = non_image_name(_text(ds, "SOPClassUID"))
        if name is not None:
            return _Outcome(candidate, f"non-image:{name}")
        if not has_pixel_data(ds):
            return _Outcome(candidate, "no-pixel-data")
        if not all(_text(ds, keyword) for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")):
            return _Outcome(candidate, "missing-uid")
        if not (_int(ds.get("Rows")) and _int(ds.get("Columns"))):
            return _Outcome(candidate, "bad-header")
        if not _transfer_syntax_supported(ds):
            return _Outcome(candidate, "unsupported-transfer-syntax")
        return _Outcome(candidate, rows=_frame_rows(ds, candidate.path))
    except DECODE_ERRORS:  # a value that parses lazily and badly (a broken sequence, a bad DS)
        return _Outcome(candidate, "unreadable")


def _read_chunk(candidates: list[_Candidate]) -> list[_Outcome]:
    """Worker task: headers of a chunk of files, with pydicom's warnings about odd values muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [read_header(candidate) for candidate in candidates]


# ---------------------------------------------------------------------------------------------
# Walking and writing (this process)


def _walk(folder: str) -> Iterator[os.DirEntry[str]]:
    """Regular files under ``folder``, depth first; hidden entries (``.incoming``...) left out.

    Symbolic links to folders are not followed (no cycles); the scandir iterators on the
    recursion stack are the only state, so memory grows with depth, not with the archive.
    """
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        yield from _walk(entry.path)
                    elif entry.is_file():
                        yield entry
                except OSError:
                    continue
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        return


def _candidates(roots: Sequence[Path]) -> Iterator[_Candidate]:
    for root in roots:
        for entry in _walk(str(root)):
            try:
                stat = entry.stat()
                entry.path.encode("utf-8")  # SQLite stores UTF-8 text; undecodable names cannot be keys
            except (OSError, UnicodeEncodeError):
                continue
            yield _Candidate(entry.path, stat.st_size, stat.st_mtime_ns)


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) an index file for writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    if int(version) != SCHEMA_VERSION:
        conn.close()
        raise ValueError(f"{path}: index schema {version}, this version writes {SCHEMA_VERSION}")
    return conn


@dataclass
class _Tally:
    files_seen: int = 0
    files_read: int = 0
    files_unchanged: int = 0
    images: int = 0
    frames: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


class _Writer:
    """The single writer of the index: applies outcomes, commits every few seconds."""

    def __init__(self, conn: sqlite3.Connection, run: int, tally: _Tally) -> None:
        self.conn = conn
        self.run = run
        self.tally = tally
        self.last_commit = time.monotonic()
        self.insert_image = (
            f"INSERT OR REPLACE INTO images ({', '.join(IMAGE_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in IMAGE_COLUMNS)})"
        )
        conn.execute("BEGIN")

    def known(self, candidates: list[_Candidate]) -> dict[str, tuple[int, int]]:
        marks = ", ".join("?" for _ in candidates)
        rows = self.conn.execute(
            f"SELECT path, size, mtime_ns FROM files WHERE path IN ({marks})", [c.path for c in candidates]
        )
        return {path: (size, mtime_ns) for path, size, mtime_ns in rows}

    def touch(self, paths: list[str]) -> None:
        self.conn.executemany("UPDATE files SET run = ? WHERE path = ?", [(self.run, path) for path in paths])

    def apply(self, outcomes: list[_Outcome]) -> None:
        for outcome in outcomes:
            candidate = outcome.candidate
            self.conn.execute("DELETE FROM images WHERE path = ?", (candidate.path,))
            if outcome.reason == "vanished":
                self.conn.execute("DELETE FROM files WHERE path = ?", (candidate.path,))
                continue
            self.tally.files_read += 1
            if outcome.reason:
                self.tally.skipped[outcome.reason] = self.tally.skipped.get(outcome.reason, 0) + 1
            else:
                self.tally.images += 1
                self.tally.frames += len(outcome.rows)
                self.conn.executemany(self.insert_image, outcome.rows)
            self.conn.execute(
                "INSERT OR REPLACE INTO files (path, size, mtime_ns, status, reason, frames, run) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    candidate.path,
                    candidate.size,
                    candidate.mtime_ns,
                    "skipped" if outcome.reason else "image",
                    outcome.reason,
                    len(outcome.rows),
                    self.run,
                ),
            )
        self.maybe_commit()

    def maybe_commit(self) -> None:
        if time.monotonic() - self.last_commit >= COMMIT_EVERY_S:
            self.conn.execute("COMMIT")
            self.conn.execute("BEGIN")
            self.last_commit = time.monotonic()

    def remove_vanished(self, roots: Sequence[Path]) -> int:
        """Drop files under ``roots`` that this run did not see (deleted or moved away)."""
        removed = 0
        for root in roots:
            # A path range instead of LIKE: no escaping of '%' and '_'; '0' sorts right after '/'.
            bounds = (str(root) + os.sep, str(root) + chr(ord(os.sep) + 1), self.run)
            where = "path >= ? AND path < ? AND run < ?"
            self.conn.execute(
                f"DELETE FROM images WHERE path IN (SELECT path FROM files WHERE {where})", bounds
            )
            removed += self.conn.execute(f"DELETE FROM files WHERE {where}", bounds).rowcount
        return removed

    def finish(self) -> None:
        self.conn.execute("COMMIT")
        # Leave a single self-contained file (no -wal/-shm beside it): readers may open it read-only.
        self.conn.execute("PRAGMA journal_mode=DELETE")


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def build_index(
    archives: Sequence[Path],
    out: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> IndexSummary:
    """Index the DICOM files under ``archives`` into the SQLite file ``out`` (created or updated).

    ``workers`` header-reading processes (default: one per CPU; 1 reads in this process). Returns
    what this run did. Raises ``FileNotFoundError`` for an archive folder that does not exist.
    """
    roots = [Path(archive).resolve() for archive in archives]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"archive folder {root} does not exist or is not a folder")
    workers = default_workers() if workers is None else max(1, workers)
    started = time.monotonic()
    conn = connect(out)
    try:
        run = int(conn.execute("SELECT value FROM meta WHERE key = 'runs'").fetchone()[0]) + 1
        conn.execute("UPDATE meta SET value = ? WHERE key = 'runs'", (str(run),))
        tally = _Tally()
        writer = _Writer(conn, run, tally)
        with rate_progress("files", progress) as bar:
            task = bar.add_task("indexing", total=None, note="") if bar is not None else None

            def report() -> None:
                if bar is not None and task is not None:
                    note = f"read {tally.files_read:,}, unchanged {tally.files_unchanged:,}"
                    bar.update(task, completed=tally.files_seen, note=note)

            _index_files(roots, writer, tally, workers, report)
            removed = writer.remove_vanished(roots)
            writer.finish()
            report()
        total = int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    finally:
        conn.close()
    seconds = time.monotonic() - started
    summary = IndexSummary(
        files_seen=tally.files_seen,
        files_read=tally.files_read,
        files_unchanged=tally.files_unchanged,
        files_removed=removed,
        images=tally.images,
        frames=tally.frames,
        total_frames=total,
        skipped=dict(sorted(tally.skipped.items())),
        seconds=seconds,
    )
    log.info(
        "index: %d files seen, %d read, %d unchanged, %d removed, %d frames recorded, skipped %s (%.0f files/s)",
        summary.files_seen,
        summary.files_read,
        summary.files_unchanged,
        summary.files_removed,
        summary.frames,
        summary.skipped,
        summary.files_per_s,
    )
    return summary


def _index_files(
    roots: Sequence[Path],
    writer: _Writer,
    tally: _Tally,
    workers: int,
    report: Callable[[], None],
) -> None:
    """Walk, look up, and read what is new, keeping at most a few chunks per worker in flight."""
    pool = (
        ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        if workers > 1
        else None
    )
    pending: set[Future[list[_Outcome]]] = set()
    limit = workers * IN_FLIGHT_PER_WORKER
    try:
        for batch in _batched(_candidates(roots), LOOKUP_BATCH):
            tally.files_seen += len(batch)
            known = writer.known(batch)
            fresh = [c for c in batch if known.get(c.path) != (c.size, c.mtime_ns)]
            unchanged = [c.path for c in batch if known.get(c.path) == (c.size, c.mtime_ns)]
            tally.files_unchanged += len(unchanged)
            writer.touch(unchanged)
            for chunk in _batched(fresh, CHUNK_FILES):
                if pool is None:
                    writer.apply(_read_chunk(chunk))
                    continue
                pending.add(pool.submit(_read_chunk, chunk))
                while len(pending) >= limit:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        writer.apply(future.result())
            writer.maybe_commit()
            report()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                writer.apply(future.result())
            report()
    finally:
        if pool is not None:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Reading the index (prepare)


@dataclass(frozen=True, slots=True)
class ImageRow:
    """One indexed frame (the ``images`` table's columns)."""

    path: str
    frame: int
    number_of_frames: int
    modality: str
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    rows: int
    columns: int
    spacing_row: float | None
    spacing_col: float | None
    slice_thickness: float | None
    photometric: str
    transfer_syntax: str
    samples_per_pixel: int
    bits_stored: int
    body_part: str
    instance_number: int | None
    slice_position: float | None
    image_type: str


@dataclass(frozen=True)
class IndexCounts:
    files: int
    image_files: int
    frames: int
    series: int
    studies: int
    modalities: dict[str, int]  # frames per modality
    skipped: dict[str, int]  # files per skip reason


class ArchiveIndex:
    """Read access to an index file, for ``prepare``: series streamed in a fixed order."""

    def __init__(self, path: Path) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} is not an index file (run `pacsnode pretrain index` first)")
        self.path = Path(path)
        self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            version = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise ValueError(f"{path} is not an index file: {exc}") from exc
        if version is None or int(version[0]) != SCHEMA_VERSION:
            self._conn.close()
            raise ValueError(f"{path}: index schema {version and version[0]}, this version reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def counts(self) -> IndexCounts:
        one = self._conn.execute
        return IndexCounts(
            files=int(one("SELECT COUNT(*) FROM files").fetchone()[0]),
            image_files=int(one("SELECT COUNT(*) FROM files WHERE status = 'image'").fetchone()[0]),
            frames=len(self),
            series=int(one("SELECT COUNT(*) FROM (SELECT DISTINCT study_uid, series_uid FROM images)").fetchone()[0]),
            studies=int(one("SELECT COUNT(DISTINCT study_uid) FROM images").fetchone()[0]),
            modalities=dict(one("SELECT modality, COUNT(*) FROM images GROUP BY modality ORDER BY modality")),
            skipped=dict(
                one("SELECT reason, COUNT(*) FROM files WHERE status = 'skipped' GROUP BY reason ORDER BY reason")
            ),
        )

    def iter_series(self) -> Iterator[list[ImageRow]]:
        """The frames of each series, series by series (by study and series UID), each ordered by
        slice position, then instance number, frame and path. Streams from SQLite along the
        ``images_series`` index: memory holds one series."""
        cursor = self._conn.execute(
            f"SELECT {', '.join(IMAGE_COLUMNS)} FROM images "
            "ORDER BY study_uid, series_uid, slice_position, instance_number, frame, path"
        )
        series: list[ImageRow] = []
        key: tuple[str, str] | None = None
        for values in cursor:
            row = ImageRow(*values)
            if (row.study_uid, row.series_uid) != key and series:
                yield series
                series = []
            key = (row.study_uid, row.series_uid)
            series.append(row)
        if series:
            yield series


def open_index(path: Path) -> ArchiveIndex:
    """Open an index written by ``build_index`` for reading."""
    return ArchiveIndex(path)
