"""STOW-RS client side: result files to a ``dicomweb`` destination (dicomweb-client over requests).

The export outbox calls ``stow_files`` where a DIMSE destination gets ``node.send.send_files``,
and reads the same ``SendReport``: a file the server listed in its FailedSOPSequence, or every
file of a request that failed as a whole (refused connection, HTTP 4xx/5xx, timeout), is failed
with its reason and retried by the outbox's schedule; the rest were sent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from config.settings import DicomWebDestination
from node.send import SendReport

FILES_PER_REQUEST = 32
TIMEOUT_S = 60.0


class _Session(requests.Session):
    """A session whose requests time out by default: a hung server must not hold the outbox."""

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT_S)
        return super().request(*args, **kwargs)


def _session(dest: DicomWebDestination) -> requests.Session:
    session = _Session()
    if dest.token is not None:
        session.headers["Authorization"] = f"Bearer {dest.token.get_secret_value()}"
    if dest.username is not None and dest.password is not None:
        session.auth = (dest.username, dest.password.get_secret_value())
    if dest.ca_file is not None:
        session.verify = str(dest.ca_file)
    return session


def _batches(paths: Sequence[Path]) -> Iterator[Sequence[Path]]:
    for start in range(0, len(paths), FILES_PER_REQUEST):
        yield paths[start:start + FILES_PER_REQUEST]


def _request_failure(error: requests.RequestException) -> str:
    response = error.response
    if response is not None:
        return f"STOW-RS HTTP {response.status_code} {response.reason}"
    if isinstance(error, requests.ConnectionError):
        return "STOW-RS connection failed (refused or unreachable)"
    return f"STOW-RS {type(error).__name__}"


def stow_files(paths: Sequence[Path], dest: DicomWebDestination) -> SendReport:
    """STOW-RS ``paths`` to ``dest`` in requests of a few files; the outcome per file."""
    report = SendReport()
    client = DICOMwebClient(url=dest.url.rstrip("/"), session=_session(dest))
    for batch in _batches(paths):
        datasets = [pydicom.dcmread(path) for path in batch]
        by_uid = {str(ds.SOPInstanceUID): str(path) for ds, path in zip(datasets, batch, strict=True)}
        try:
            answer: Dataset = client.store_instances(datasets)
        except requests.RequestException as error:
            reason = _request_failure(error)
            report.failed.update({path: reason for path in by_uid.values()})
            continue
        failed = {str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", 0))
                  for item in answer.get("FailedSOPSequence", [])}
        for uid, path in by_uid.items():
            if uid in failed:
                report.failed[path] = f"STOW-RS failure reason 0x{failed[uid]:04X}"
            else:
                report.sent += 1
    return report

