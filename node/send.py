"""A C-STORE SCU for files and folders, sending each file's bytes as they are (no transcoding).

Files are grouped by (SOP class, transfer syntax) into presentation contexts; more than 128
distinct pairs are sent over several associations. Used by ``pacsnode send`` and by the
node's export outbox (``node.exports``), which records each file's failure reason as is.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, Association, evt
from pynetdicom.events import Event
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

from config.settings import TLSSettings

MAX_CONTEXTS = 128
SENT_STATUSES = (0x0000, 0xB000, 0xB006, 0xB007)  # success, and the storage warnings (stored, coerced)


@dataclass
class SendReport:
    sent: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason, e.g. "0xA700 Refused: Out of Resources"
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)  # path -> warning status of a file that was sent


def status_text(code: int) -> str:
    """A C-STORE status as operators read it: the code and, where DICOM names it, its meaning."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    return f"0x{code:04X} {meaning[1]}" if meaning else f"0x{code:04X}"


def client_tls_args(tls: TLSSettings, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom ``tls_args`` for calling a peer: verify it against ``ca_file`` (or the system
    CAs) and present our certificate; the same TLS 1.2 floor as the SCP (``node.scp.tls_context``)."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context, host


def _no_association(assoc: Association, connected: bool) -> str:
    """Why an association did not come up: the export outbox shows this to operators."""
    if assoc.is_rejected:
        reason = getattr(assoc.acceptor.primitive, "reason_str", "")
        return f"association rejected ({reason})" if reason else "association rejected"
    return "association aborted" if connected else "connection failed (refused or unreachable)"


@dataclass(frozen=True)
class Outgoing:
    path: Path
    sop_class: str
    transfer_syntax: str


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def scan(paths: Iterable[Path], report: SendReport) -> list[Outgoing]:
    outgoing = []
    for path in iter_files(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            outgoing.append(Outgoing(path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            report.skipped[str(path)] = f"not a DICOM file ({type(exc).__name__})"
    return outgoing


def _batches(outgoing: list[Outgoing]) -> Iterator[list[Outgoing]]:
    batch: list[Outgoing] = []
    pairs: set[tuple[str, str]] = set()
    for item in outgoing:
        pair = (item.sop_class, item.transfer_syntax)
        if pair not in pairs and len(pairs) == MAX_CONTEXTS:
            yield batch
            batch, pairs = [], set()
        pairs.add(pair)
        batch.append(item)
    if batch:
        yield batch


def _store(assoc: Association, item: Outgoing, report: SendReport) -> None:
    """C-STORE one file and record its outcome in ``report``."""
    try:
        status = assoc.send_c_store(item.path)
    except (ValueError, AttributeError, InvalidDicomError, OSError) as exc:
        # e.g. the peer accepted no presentation context for this SOP class: only this file
        # fails, the association goes on with the others.
        report.failed[str(item.path)] = f"not sent: {exc}"
        return
    code = int(status.Status) if status and "Status" in status else None
    if code in SENT_STATUSES:
        report.sent += 1
        if code:
            report.warnings[str(item.path)] = status_text(code)
    else:
        report.failed[str(item.path)] = "no response" if code is None else status_text(code)


def send_files(
    outgoing: list[Outgoing], host: str, port: int, called_ae: str, calling_ae: str = "PACSNODE-SCU",
    progress: Callable[[Outgoing], None] = lambda item: None, tls_args: tuple[object, str] | None = None,
) -> SendReport:
    report = SendReport()
    for batch in _batches(outgoing):
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for pair in sorted({(o.sop_class, o.transfer_syntax) for o in batch}):
            ae.add_requested_context(pair[0], [pair[1]])
        connected: list[Event] = []
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args,  # type: ignore[arg-type]
                             evt_handlers=[(evt.EVT_CONN_OPEN, connected.append)])
        if not assoc.is_established:
            reason = _no_association(assoc, bool(connected))
            for item in batch:
                report.failed[str(item.path)] = reason
            continue
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        done = 0
        try:
            for item in batch:
                if not assoc.is_established:
                    break
                _store(assoc, item, report)
                done += 1
                progress(item)
        finally:
            if assoc.is_established:
                assoc.release()
        for item in batch[done:]:
            report.failed[str(item.path)] = "association lost"
    return report
