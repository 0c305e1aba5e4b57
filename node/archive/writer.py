"""Where pulled or exported instances land: de-identified, then written under pseudonymous names.

Layout: ``OUT/<pseudonymous PatientID>/<study UID>/<series UID>/<SOP UID>.dcm``, every component
a pseudonym, so the folder names identify no one either. Each file is written to a temporary
name, fsynced and renamed, so a file in the archive is always whole; writing the same instance
twice (a resumed series) replaces it with identical bytes.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

from pydicom.dataset import Dataset

from node.archive.deid import Deidentifier
from node.archive.pacing import RateCap


class ArchiveWriter:
    """De-identifies and writes one instance at a time; shared by concurrent C-STORE handlers."""

    def __init__(self, out: Path, deid: Deidentifier, rate: RateCap | None = None) -> None:
        self.out = out
        self.deid = deid
        self.rate = rate
        self.written = 0
        self.left_out: Counter[str] = Counter()
        self._lock = threading.Lock()

    def accept(self, ds: Dataset) -> Path | None:
        """De-identify ``ds`` (in place) and write it; ``None`` when the policy leaves it out."""
        reason = self.deid.policy.leave_out(ds)
        if reason is not None:
            with self._lock:
                self.left_out[reason] += 1
            return None
        if self.rate is not None:
            self.rate.take()
        self.deid.deidentify(ds)
        folder = self.out / str(ds.PatientID) / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        temporary = folder / f".{ds.SOPInstanceUID}.{threading.get_ident()}.tmp"
        with temporary.open("wb") as handle:
            ds.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        with self._lock:
            self.written += 1
        return path
