"""``pacsnode archive pull``: the archive, fetched from a PACS for pretraining.

C-FIND at study level (date range, modalities), then at series level for each study that is not
complete in the ledger; each series is fetched with C-MOVE to our own storage SCP or with C-GET
on the retrieving association, a few at a time. Every instance is de-identified in the C-STORE
handler, before it is written (``node.archive.writer``). A failure (a refused association, a
C-MOVE status, sub-operations that failed) is counted by reason and the run goes on; the series
stays unrecorded, so the next run fetches it again.

The pulled archive has its own SCP, AE title and folder: nothing here touches the node's study
store or index, and nothing pulled is routed to a pipeline.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    StoragePresentationContexts,
    build_role,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import time
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

from node.archive.deid import Deidentifier
from node.archive.ledger import PullLedger
from node.archive.pacing import RateCap, TimeWindow
from node.archive.writer import ArchiveWriter

PEER = re.compile(r"^([^@]{1,16})@(.+):(\d{1,5})$")
PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
# What a C-GET asks the PACS to send in: the archive keeps what the PACS holds, compressed or not.
GET_TRANSFER_SYNTAXES: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                         JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, JPEG2000, RLELossless,
                         JPEGBaseline8Bit, JPEGExtended12Bit]
DIMSE_TIMEOUT_S = 300.0  # a retrieval's responses come one per image; five minutes of silence is a hang
WINDOW_POLL_S = 30.0
Retrieve = Literal["move", "get"]


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity as ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        match = PEER.match(text.strip())
        if match is None or not 0 < int(match[3]) < 65536:
            raise ValueError(f"--from {text!r}: expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
        return cls(match[1], match[2], int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class PullOptions:
    """What to pull and how gently; the CLI's flags."""

    source: Peer
    out: Path
    ae_title: str = "PACSNODE-ARCH"
    port: int = 11113
    retrieve: Retrieve = "move"
    since: date | None = None
    until: date | None = None
    modalities: tuple[str, ...] = ()
    max_studies: int | None = None
    concurrency: int = 2
    window: TimeWindow | None = None

    def date_range(self) -> str:
        """The StudyDate matching key: ``since-until``, open on either side, or universal."""
        if self.since is None and self.until is None:
            return ""
        start = "" if self.since is None else f"{self.since:%Y%m%d}"
        end = "" if self.until is None else f"{self.until:%Y%m%d}"
        return f"{start}-{end}"


@dataclass
class PullReport:
    """What a run did: found, skipped as complete, fetched, and what failed, by reason."""

    studies_found: int = 0
    studies_complete: int = 0
    studies_pulled: int = 0
    series_pulled: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    stopped: bool = False


@dataclass(frozen=True)
class SeriesHit:
    study_uid: str
    series_uid: str
    modality: str
    instances: int | None


@dataclass(frozen=True)
class StudyHit:
    study_uid: str
    instances: int | None


@dataclass
class Progress:
    """Callbacks the CLI's progress bar listens to (all optional)."""

    on_total: Callable[[int], None] = lambda total: None
    on_study: Callable[[], None] = lambda: None
    on_pause: Callable[[str], None] = lambda note: None


class AssociationFailed(Exception):
    """An association did not come up; its message is the reason counted."""


def _count(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _status_text(service: str, code: int) -> str:
    table = QR_MOVE_SERVICE_CLASS_STATUS if service == "C-MOVE" else QR_GET_SERVICE_CLASS_STATUS
    meaning = table.get(code)
    return f"{service} 0x{code:04X}" + (f" ({meaning[1]})" if meaning else "")


def _no_association(assoc: Association) -> str:
    if assoc.is_rejected:
        reason = getattr(assoc.acceptor.primitive, "reason_str", "") if assoc.acceptor.primitive else ""
        return f"association rejected ({reason})" if reason else "association rejected"
    if assoc.is_aborted:
        return "association aborted"
    return "connection failed (refused or unreachable)"


class Puller:
    """One pull run. ``run`` returns when every study is fetched, counted as failed or the run is
    stopped (``stop`` set: Ctrl-C), whichever comes first."""

    def __init__(self, options: PullOptions, deid: Deidentifier, ledger: PullLedger, rate: RateCap | None = None,
                 stop: threading.Event | None = None, clock: Callable[[], datetime] = datetime.now) -> None:
        self.options = options
        self.ledger = ledger
        self.writer = ArchiveWriter(options.out, deid, rate)
        self.deid = deid
        self.stop = stop or threading.Event()
        self.clock = clock
        self.report = PullReport()
        self._progress = Progress()
        self._lock = threading.Lock()

    # -- the association side ---------------------------------------------------------------
    def _ae(self) -> AE:
        ae = AE(ae_title=self.options.ae_title)
        ae.acse_timeout = 30
        ae.dimse_timeout = DIMSE_TIMEOUT_S
        ae.network_timeout = 60
        return ae

    def _associate(self, contexts: list[tuple[str, list[str]]], **kwargs: Any) -> Association:
        ae = self._ae()
        for abstract_syntax, syntaxes in contexts:
            ae.add_requested_context(abstract_syntax, syntaxes)
        source = self.options.source
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, **kwargs)
        if not assoc.is_established:
            raise AssociationFailed(_no_association(assoc))
        return assoc

    def on_store(self, event: Event) -> int:
        """C-STORE handler of both retrieve modes: de-identify and write, or say why not."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except (InvalidDicomError, ValueError, KeyError, EOFError) as error:
            self._fail(f"instance not decodable ({type(error).__name__})")
            return CANNOT_UNDERSTAND
        try:
            self.writer.accept(ds)
        except OSError as error:
            self._fail(f"instance not written ({error.strerror or type(error).__name__})")
            return OUT_OF_RESOURCES
        return SUCCESS

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.report.failures[reason] += 1

    # -- queries ----------------------------------------------------------------------------
    def find_studies(self, assoc: Association) -> list[StudyHit]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.StudyDate = self.options.date_range()
        query.ModalitiesInStudy = list(self.options.modalities) if self.options.modalities else ""
        query.NumberOfStudyRelatedInstances = ""
        return [StudyHit(str(hit.StudyInstanceUID), _count(hit.get("NumberOfStudyRelatedInstances")))
                for hit in self._find(assoc, query) if hit.get("StudyInstanceUID")]

    def find_series(self, assoc: Association, study_uid: str) -> list[SeriesHit]:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        query.NumberOfSeriesRelatedInstances = ""
        hits = [SeriesHit(study_uid, str(hit.SeriesInstanceUID), str(hit.get("Modality", "")),
                          _count(hit.get("NumberOfSeriesRelatedInstances")))
                for hit in self._find(assoc, query) if hit.get("SeriesInstanceUID")]
        wanted = {m.upper() for m in self.options.modalities}
        return [hit for hit in hits if not wanted or hit.modality.upper() in wanted]

    def _find(self, assoc: Association, query: Dataset) -> Iterator[Dataset]:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                raise AssociationFailed("C-FIND: no response (association lost or timed out)")
            if status.Status in PENDING and identifier is not None:
                yield identifier
            elif status.Status not in PENDING and status.Status != SUCCESS:
                raise AssociationFailed(f"C-FIND 0x{status.Status:04X}")

    # -- retrieval --------------------------------------------------------------------------
    def retrieve(self, series: SeriesHit) -> bool:
        """Fetch one series; record it in the ledger when every sub-operation succeeded."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = series.study_uid
        query.SeriesInstanceUID = series.series_uid
        service = "C-MOVE" if self.options.retrieve == "move" else "C-GET"
        try:
            if self.options.retrieve == "move":
                assoc = self._associate([(StudyRootQueryRetrieveInformationModelMove, [ExplicitVRLittleEndian,
                                                                                        ImplicitVRLittleEndian])])
                responses = assoc.send_c_move(query, self.options.ae_title, StudyRootQueryRetrieveInformationModelMove)
            else:
                storage = [(str(cx.abstract_syntax), GET_TRANSFER_SYNTAXES) for cx in StoragePresentationContexts]
                assoc = self._associate(
                    [(StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
                     *storage],
                    ext_neg=[build_role(syntax, scp_role=True) for syntax, _ in storage],
                    evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
                responses = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
        except AssociationFailed as failure:
            self._fail(str(failure))
            return False
        try:
            return self._finish(series, service, responses, assoc)
        finally:
            if assoc.is_established:
                assoc.release()

    def _finish(self, series: SeriesHit, service: str, responses: Iterator[tuple[Dataset, Dataset | None]],
                assoc: Association) -> bool:
        final: Dataset | None = None
        for status, _identifier in responses:
            if self.stop.is_set():
                assoc.abort()
                return False
            if not status:
                self._fail(f"{service}: no response (association lost or timed out)")
                return False
            if status.Status not in PENDING:
                final = status
        if final is None:
            self._fail(f"{service}: no final response")
            return False
        failed = _count(final.get("NumberOfFailedSuboperations")) or 0
        if final.Status != SUCCESS or failed:
            self._fail(_status_text(service, final.Status) + (f": {failed} sub-operations failed" if failed else ""))
            return False
        completed = _count(final.get("NumberOfCompletedSuboperations")) or 0
        warned = _count(final.get("NumberOfWarningSuboperations")) or 0
        self.ledger.record_series(self.deid.ledger_key(series.series_uid), self.deid.ledger_key(series.study_uid),
                                  completed + warned)
        with self._lock:
            self.report.series_pulled += 1
        return True

    # -- the run ----------------------------------------------------------------------------
    def _wait_for_window(self) -> bool:
        """Block while outside the time window; False if stopped meanwhile."""
        window = self.options.window
        while window is not None and not self.stop.is_set():
            wait_s = window.opens_in(self.clock())
            if wait_s <= 0:
                return True
            self._progress.on_pause(f"paused: outside {window}")
            self.stop.wait(min(wait_s, WINDOW_POLL_S))
        self._progress.on_pause("")
        return not self.stop.is_set()

    def _is_complete(self, study: StudyHit) -> bool:
        return study.instances is not None and study.instances > 0 and \
            self.ledger.study_instances(self.deid.ledger_key(study.study_uid)) >= study.instances

    def _pending_series(self, assoc: Association, study: StudyHit) -> list[SeriesHit]:
        return [s for s in self.find_series(assoc, study.study_uid)
                if not self.ledger.has_series(self.deid.ledger_key(s.series_uid))]

    def run(self, progress: Progress | None = None) -> PullReport:
        self._progress = progress or self._progress
        server = None
        if self.options.retrieve == "move":
            ae = self._ae()
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
            ae.require_called_aet = True
            server = ae.start_server(("", self.options.port), block=False, ae_title=self.options.ae_title,
                                     evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        try:
            self._run()
        finally:
            if server is not None:
                server.shutdown()
        self.report.stopped = self.stop.is_set()
        return self.report

    def _run(self) -> None:
        try:
            finder = self._associate([(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian,
                                                                                     ImplicitVRLittleEndian])])
        except AssociationFailed as failure:
            self._fail(f"query: {failure}")
            return
        try:
            studies = self.find_studies(finder)
            self.report.studies_found = len(studies)
            todo = [s for s in studies if not self._is_complete(s)]
            self.report.studies_complete = len(studies) - len(todo)
            if self.options.max_studies is not None:
                todo = todo[: self.options.max_studies]
            self._progress.on_total(len(todo))
            self._retrieve_all(finder, todo)
        except AssociationFailed as failure:
            self._fail(f"query: {failure}")
        finally:
            if finder.is_established:
                finder.release()

    def _retrieve_all(self, finder: Association, studies: list[StudyHit]) -> None:
        """Series of each study to the pool, ``concurrency`` at a time; a study counts as pulled
        when all its series were fetched."""
        with ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="retrieve") as pool:
            running: dict[Future[bool], StudyHit] = {}
            open_series: Counter[str] = Counter()
            ok: dict[str, bool] = {}
            for study in studies:
                if self.stop.is_set():
                    break
                series = self._pending_series(finder, study)
                if not series:
                    self._progress.on_study()
                    continue
                open_series[study.study_uid] = len(series)
                ok[study.study_uid] = True
                for hit in series:
                    while len(running) >= self.options.concurrency:
                        self._collect(running, open_series, ok, wait(running, return_when=FIRST_COMPLETED).done)
                    if not self._wait_for_window():
                        break
                    running[pool.submit(self.retrieve, hit)] = study
            self._collect(running, open_series, ok, wait(running).done)

    def _collect(self, running: dict[Future[bool], StudyHit], open_series: Counter[str], ok: dict[str, bool],
                 done: set[Future[bool]]) -> None:
        for future in done:
            study = running.pop(future)
            ok[study.study_uid] &= future.result()
            open_series[study.study_uid] -= 1
            if open_series[study.study_uid] == 0:
                if ok[study.study_uid]:
                    self.report.studies_pulled += 1
                self._progress.on_study()
