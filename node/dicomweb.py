"""DICOMweb (PS3.18) on the node's HTTP server, at ``/dicomweb``: STOW-RS, QIDO-RS and WADO-RS.

- **STOW-RS** ``POST /dicomweb/studies[/{study}]``, ``multipart/related; type="application/dicom"``:
  each part goes through ``StorageSCP.store_encoded``, the C-STORE path (validation, fsync before
  the answer, de-duplication, recognition of our own results), so the stored file is the part's
  bytes. A part that fails is listed with its reason in the FailedSOPSequence; the others are
  stored. 200 when all were stored, 202 when some failed, 409 when none was.
- **QIDO-RS** ``GET /dicomweb/studies``, ``/studies/{study}/series``, ``/studies/{study}/series/
  {series}/instances`` (and ``/series``, ``/instances`` across studies): matching on UIDs (lists),
  StudyDate (ranges), Modality / ModalitiesInStudy, descriptions (``*`` and ``?`` wildcards);
  ``limit`` and ``offset``. Study and series attributes come from the index; patient attributes
  and the accession number from the study's first instance (the index keeps no PHI).
- **WADO-RS** studies, series and instances as ``multipart/related; type="application/dicom"`` (the
  stored files, byte for byte, in their stored transfer syntax) and their ``/metadata`` as
  ``application/dicom+json`` (bulk data left out).

The same authentication and audit log as every other path apply (``node.http.Guard``).
"""

from __future__ import annotations

import asyncio
import io
import re
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from node.index import StudyIndex
from node.scp import DATASET_MISMATCH, SUCCESS, StorageSCP
from node.store import StudyStore
from node.worklist import snapshot

DICOM_JSON = "application/dicom+json"
UNSUPPORTED_PART = 0xC000  # a part that is not application/dicom: "cannot understand"
PROCESSING_FAILURE = 0x0110
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                    "ReferringPhysicianName", "StudyTime", "StudyID")


class MultipartError(ValueError):
    """A body that is not the multipart/related it claims to be; the message says why."""


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related`` content type (quoted or not)."""
    if not content_type.lower().startswith("multipart/related"):
        raise MultipartError(f"Content-Type {content_type!r}: expected multipart/related")
    match = re.search(r'boundary="?([^";]+)"?', content_type, flags=re.IGNORECASE)
    if match is None:
        raise MultipartError("multipart/related without a boundary")
    return match[1].encode()


def split_parts(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body (RFC 2046): their headers (lower-case names) and exact bytes."""
    delimiter = b"--" + boundary
    start = body.find(delimiter)
    if start < 0:
        raise MultipartError("no part starts with the boundary")
    parts = []
    position = start + len(delimiter)
    while not body.startswith(b"--", position):  # "--boundary--" closes the body
        if not body.startswith(b"\r\n", position):
            raise MultipartError("a boundary is not followed by CRLF")
        end = body.find(b"\r\n" + delimiter, position)
        if end < 0:
            raise MultipartError("the body ends inside a part (no closing boundary)")
        head_end = body.find(b"\r\n\r\n", position + 2, end + 2)
        if head_end < 0:
            headers, content = {}, body[position + 2:end]
        else:
            raw = body[position + 2:head_end].decode("latin-1")
            headers = {name.strip().lower(): value.strip() for name, _, value in
                       (line.partition(":") for line in raw.split("\r\n") if line)}
            content = body[head_end + 4:end]
        parts.append((headers, content))
        position = end + 2 + len(delimiter)
    return parts


def _json_dataset(ds: Dataset) -> dict[str, Any]:
    return ds.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda element: "")


def _tag(keyword: str) -> str:
    return f"{pydicom.datadict.tag_for_keyword(keyword):08X}"


@dataclass(frozen=True)
class PartResult:
    """One STOW-RS part: what it was (where its header could be read) and why it failed, if it did."""

    sop_class_uid: str = ""
    sop_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    failure: int | None = None


@dataclass(frozen=True)
class Match:
    """One QIDO-RS matching key as SQL: a WHERE clause fragment and its parameters."""

    clause: str
    params: tuple[object, ...]


def _uids(column: str, value: str) -> Match:
    values = [v.strip() for v in value.replace("\\", ",").split(",") if v.strip()]
    return Match(f"{column} IN ({', '.join('?' * len(values))})", tuple(values))


def _wildcard(column: str, value: str) -> Match:
    if "*" in value or "?" in value:
        escaped = value.replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_")
        return Match(f"{column} LIKE ? ESCAPE '\\'", (escaped,))
    return Match(f"{column} = ?", (value,))


def _dates(column: str, value: str) -> Match:
    start, dash, end = value.partition("-")
    if not dash:
        return Match(f"{column} = ?", (value,))
    clauses, params = [], []
    if start:
        clauses.append(f"{column} >= ?")
        params.append(start)
    if end:
        clauses.append(f"{column} <= ?")
        params.append(end)
    return Match(" AND ".join(clauses) or "1", tuple(params))


class QueryError(ValueError):
    """A QIDO-RS parameter we cannot honour (400)."""


def _paging(request: Request) -> tuple[int, int]:
    try:
        limit = int(request.query_params.get("limit", DEFAULT_LIMIT))
        offset = int(request.query_params.get("offset", 0))
    except ValueError as exc:
        raise QueryError("limit and offset must be integers") from exc
    if limit < 1 or offset < 0:
        raise QueryError("limit must be >= 1 and offset >= 0")
    return min(limit, MAX_LIMIT), offset


def _matches(request: Request, keys: dict[str, tuple[str, str]]) -> list[Match]:
    """Matching keys of the request: keyword (or tag) -> (column, kind of matching)."""
    matches = []
    by_tag = {_tag(keyword): keyword for keyword in keys}
    for name, value in request.query_params.items():
        keyword = by_tag.get(name.upper(), name)
        if keyword not in keys or not value:
            continue
        column, kind = keys[keyword]
        matches.append({"uid": _uids, "date": _dates, "text": _wildcard}[kind](column, value))
    return matches


def _where(matches: Sequence[Match]) -> tuple[str, tuple[object, ...]]:
    if not matches:
        return "", ()
    return " WHERE " + " AND ".join(f"({m.clause})" for m in matches), tuple(p for m in matches for p in m.params)


STUDY_KEYS = {"StudyInstanceUID": ("s.study_uid", "uid"), "StudyDate": ("s.study_date", "date"),
              "StudyDescription": ("s.study_description", "text")}
SERIES_KEYS = {"StudyInstanceUID": ("r.study_uid", "uid"), "SeriesInstanceUID": ("r.series_uid", "uid"),
               "Modality": ("r.modality", "text"), "SeriesDescription": ("r.series_description", "text")}
INSTANCE_KEYS = {"StudyInstanceUID": ("i.study_uid", "uid"), "SeriesInstanceUID": ("i.series_uid", "uid"),
                 "SOPInstanceUID": ("i.sop_uid", "uid"), "SOPClassUID": ("i.sop_class_uid", "uid")}


class DicomWeb:
    """The ``/dicomweb`` endpoints over the node's store, index and C-STORE path."""

    def __init__(self, scp: StorageSCP, store: StudyStore, index: StudyIndex, base: str = "/dicomweb") -> None:
        self._scp = scp
        self._store = store
        self._index = index
        self._base = base

    def routes(self) -> list[Route]:
        b = self._base
        return [
            Route(f"{b}/studies", self.stow, methods=["POST"]),
            Route(f"{b}/studies/{{study}}", self.stow, methods=["POST"]),
            Route(f"{b}/studies", self.search_studies),
            Route(f"{b}/series", self.search_series),
            Route(f"{b}/instances", self.search_instances),
            Route(f"{b}/studies/{{study}}/series", self.search_series),
            Route(f"{b}/studies/{{study}}/instances", self.search_instances),
            Route(f"{b}/studies/{{study}}/series/{{series}}/instances", self.search_instances),
            Route(f"{b}/studies/{{study}}", self.retrieve),
            Route(f"{b}/studies/{{study}}/metadata", self.metadata),
            Route(f"{b}/studies/{{study}}/series/{{series}}", self.retrieve),
            Route(f"{b}/studies/{{study}}/series/{{series}}/metadata", self.metadata),
            Route(f"{b}/studies/{{study}}/series/{{series}}/instances/{{sop}}", self.retrieve),
            Route(f"{b}/studies/{{study}}/series/{{series}}/instances/{{sop}}/metadata", self.metadata),
        ]

    def _url(self, request: Request, *parts: str) -> str:
        levels = ("studies", "series", "instances")
        path = "".join(f"/{level}/{uid}" for level, uid in zip(levels, parts, strict=False))
        return f"{str(request.base_url).rstrip('/')}{self._base}{path}"

    # -- STOW-RS ------------------------------------------------------------------------------
    async def stow(self, request: Request) -> Response:
        try:
            parts = split_parts(await request.body(), boundary_of(request.headers.get("content-type", "")))
        except MultipartError as exc:
            return JSONResponse({"error": str(exc)}, 415 if "multipart/related" in str(exc) else 400)
        study = request.path_params.get("study")
        peer = f"stow-rs {request.client.host if request.client else ''}"
        # Off the event loop (each part waits for its fsync and index commit), and the parts side by
        # side, so that they share folder fsyncs and SQLite commits (the SCP's group commit) as
        # concurrent associations do; answers stay in part order.
        results = await asyncio.gather(*(run_in_threadpool(self._store_part, headers, content, study, peer)
                                         for headers, content in parts))
        stored = [r for r in results if r.failure is None]
        failed = [r for r in results if r.failure is not None]
        response = Dataset()
        if study:
            response.RetrieveURL = self._url(request, study)
        response.ReferencedSOPSequence = [self._referenced(request, r) for r in stored]
        response.FailedSOPSequence = [self._failed(r) for r in failed]
        status = 200 if not failed else 409 if not stored else 202
        return JSONResponse(_json_dataset(response), status, media_type=DICOM_JSON)

    def _store_part(self, headers: dict[str, str], content: bytes, study: str | None, peer: str) -> PartResult:
        if not headers.get("content-type", "application/dicom").lower().startswith("application/dicom"):
            return PartResult(failure=UNSUPPORTED_PART)
        if study is not None:
            try:
                part_study = str(pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True,
                                                 specific_tags=["StudyInstanceUID"]).get("StudyInstanceUID", ""))
            except (InvalidDicomError, ValueError, EOFError, KeyError):
                part_study = None  # unreadable: store_encoded refuses it with its reason
            if part_study is not None and part_study != study:
                return PartResult(failure=DATASET_MISMATCH)
        outcome = self._scp.store_encoded(content, peer)
        header = outcome.header
        failure = None if outcome.status == SUCCESS else outcome.status
        if header is None:
            return PartResult(failure=failure)
        return PartResult(header.sop_class_uid, header.key.sop_uid, header.key.study_uid, header.key.series_uid,
                          failure)

    def _referenced(self, request: Request, result: PartResult) -> Dataset:
        out = Dataset()
        out.ReferencedSOPClassUID = result.sop_class_uid
        out.ReferencedSOPInstanceUID = result.sop_uid
        out.RetrieveURL = self._url(request, result.study_uid, result.series_uid, result.sop_uid)
        return out

    def _failed(self, result: PartResult) -> Dataset:
        out = Dataset()
        if result.sop_uid:
            out.ReferencedSOPClassUID = result.sop_class_uid
            out.ReferencedSOPInstanceUID = result.sop_uid
        out.FailureReason = result.failure
        return out

    # -- QIDO-RS ------------------------------------------------------------------------------
    def _search(self, request: Request, run: Any) -> Response:
        try:
            limit, offset = _paging(request)
            rows = run(limit, offset)
        except QueryError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        if not rows:
            return Response(status_code=204)
        return JSONResponse(rows, media_type=DICOM_JSON)

    def search_studies(self, request: Request) -> Response:
        def run(limit: int, offset: int) -> list[dict[str, Any]]:
            matches = _matches(request, STUDY_KEYS)
            modality = request.query_params.get("ModalitiesInStudy") or request.query_params.get(
                _tag("ModalitiesInStudy"))
            if modality:
                matches.append(Match("s.study_uid IN (SELECT study_uid FROM series WHERE modality = ?)", (modality,)))
            where, params = _where(matches)
            with snapshot(self._index) as conn:
                studies = conn.execute(
                    "SELECT s.study_uid, s.study_date, s.study_description FROM studies s" + where
                    + " ORDER BY s.last_instance_at DESC LIMIT ? OFFSET ?", (*params, limit, offset)).fetchall()
                return [self._study_json(request, conn, row) for row in studies]

        return self._search(request, run)

    def _study_json(self, request: Request, conn: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
        ds = Dataset()
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyDescription = row["study_uid"], row["study_date"], \
            row["study_description"]
        series = conn.execute("SELECT modality, instance_count FROM series WHERE study_uid = ?",
                              (row["study_uid"],)).fetchall()
        ds.ModalitiesInStudy = sorted({s["modality"] for s in series if s["modality"]})
        ds.NumberOfStudyRelatedSeries = len(series)
        ds.NumberOfStudyRelatedInstances = sum(s["instance_count"] for s in series)
        first = conn.execute("SELECT path FROM instances WHERE study_uid = ? LIMIT 1", (row["study_uid"],)).fetchone()
        if first is not None:
            header = self._header(first["path"], PATIENT_KEYWORDS)
            for keyword in PATIENT_KEYWORDS:
                if keyword in header:
                    setattr(ds, keyword, header.get(keyword))
        ds.RetrieveURL = self._url(request, row["study_uid"])
        return _json_dataset(ds)

    def search_series(self, request: Request) -> Response:
        def run(limit: int, offset: int) -> list[dict[str, Any]]:
            matches = _matches(request, SERIES_KEYS)
            if "study" in request.path_params:
                matches.append(Match("r.study_uid = ?", (request.path_params["study"],)))
            where, params = _where(matches)
            with snapshot(self._index) as conn:
                rows = conn.execute(
                    "SELECT r.study_uid, r.series_uid, r.modality, r.series_description, r.series_number, "
                    "r.instance_count FROM series r" + where + " ORDER BY r.study_uid, r.series_number LIMIT ? OFFSET ?",
                    (*params, limit, offset)).fetchall()
            out = []
            for row in rows:
                ds = Dataset()
                ds.StudyInstanceUID, ds.SeriesInstanceUID = row["study_uid"], row["series_uid"]
                ds.Modality, ds.SeriesDescription = row["modality"], row["series_description"]
                ds.SeriesNumber = row["series_number"]
                ds.NumberOfSeriesRelatedInstances = row["instance_count"]
                ds.RetrieveURL = self._url(request, row["study_uid"], row["series_uid"])
                out.append(_json_dataset(ds))
            return out

        return self._search(request, run)

    def search_instances(self, request: Request) -> Response:
        def run(limit: int, offset: int) -> list[dict[str, Any]]:
            matches = _matches(request, INSTANCE_KEYS)
            for key, column in (("study", "i.study_uid"), ("series", "i.series_uid")):
                if key in request.path_params:
                    matches.append(Match(f"{column} = ?", (request.path_params[key],)))
            where, params = _where(matches)
            with snapshot(self._index) as conn:
                rows = conn.execute(
                    "SELECT i.study_uid, i.series_uid, i.sop_uid, i.sop_class_uid FROM instances i" + where
                    + " ORDER BY i.received_at LIMIT ? OFFSET ?", (*params, limit, offset)).fetchall()
            out = []
            for row in rows:
                ds = Dataset()
                ds.StudyInstanceUID, ds.SeriesInstanceUID = row["study_uid"], row["series_uid"]
                ds.SOPInstanceUID, ds.SOPClassUID = row["sop_uid"], row["sop_class_uid"]
                ds.RetrieveURL = self._url(request, row["study_uid"], row["series_uid"], row["sop_uid"])
                out.append(_json_dataset(ds))
            return out

        return self._search(request, run)

    # -- WADO-RS ------------------------------------------------------------------------------
    def _instances(self, request: Request) -> list[sqlite3.Row]:
        matches = [Match(f"{column} = ?", (request.path_params[key],))
                   for key, column in (("study", "study_uid"), ("series", "series_uid"), ("sop", "sop_uid"))
                   if key in request.path_params]
        where, params = _where(matches)
        with snapshot(self._index) as conn:
            return conn.execute("SELECT path, transfer_syntax_uid FROM instances" + where + " ORDER BY received_at",
                                params).fetchall()

    def _header(self, path: str, keywords: Sequence[str] | None = None) -> Dataset:
        return pydicom.dcmread(self._store.resolve(path), stop_before_pixels=keywords is not None,
                               specific_tags=list(keywords) if keywords else None)

    def retrieve(self, request: Request) -> Response:
        rows = self._instances(request)
        if not rows:
            return JSONResponse({"error": "not found"}, 404)
        boundary = secrets.token_hex(16)

        def body() -> Iterator[bytes]:
            for row in rows:
                yield (f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax="
                       f"{row['transfer_syntax_uid']}\r\n\r\n").encode()
                yield Path(self._store.resolve(row["path"])).read_bytes()
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        return StreamingResponse(body(), media_type=f'multipart/related; type="application/dicom"; '
                                                    f"boundary={boundary}")

    def metadata(self, request: Request) -> Response:
        rows = self._instances(request)
        if not rows:
            return JSONResponse({"error": "not found"}, 404)
        return JSONResponse([_json_dataset(_without_bulk(self._header(row["path"]))) for row in rows],
                            media_type=DICOM_JSON)


def _without_bulk(ds: Dataset) -> Dataset:
    """Metadata: everything but pixel data and other bulk values."""
    for element in list(ds):
        if element.VR in BULK_VRS or element.tag == 0x7FE00010:
            del ds[element.tag]
    return ds
