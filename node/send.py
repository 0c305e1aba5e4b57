"""A C-STORE SCU for files and folders, sending each file's bytes as they are (no transcoding).

Files are grouped by (SOP class, transfer syntax) into presentation contexts; more than 128
distinct pairs are sent over several associations.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

MAX_CONTEXTS = 128


@dataclass
class SendReport:
    sent: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason
    skipped: dict[str, str] = field(default_factory=dict)


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
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)  # type: ignore[arg-type]
        if not assoc.is_established:
            for item in batch:
                report.failed[str(item.path)] = "association rejected or aborted"
            continue
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        done = 0
        try:
            for item in batch:
                if not assoc.is_established:
                    break
                status = assoc.send_c_store(item.path)
                code = int(status.Status) if status and "Status" in status else None
                if code in (0x0000, 0xB000, 0xB006, 0xB007):
                    report.sent += 1
                else:
                    report.failed[str(item.path)] = "no response" if code is None else f"status 0x{code:04X}"
                done += 1
                progress(item)
        finally:
            if assoc.is_established:
                assoc.release()
        for item in batch[done:]:
            report.failed[str(item.path)] = "association lost"
    return report
