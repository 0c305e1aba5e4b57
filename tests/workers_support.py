"""Helpers of the worker tests: registered (untrained) models, phantom studies, a destination SCP.

The models are untrained on purpose: the worker tests check the flow (selection, inference, DICOM
results, delivery), not accuracy; their outputs are still deterministic functions of the weights.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from models.untrained import install_untrained_models
from node.synth import generate
from node.synth.manifest import Manifest

TASKS = ("cxr-abnormality", "ct-hemorrhage", "mr-metastasis")
KIND_OF_TASK = {"cxr-abnormality": "cxr", "ct-hemorrhage": "ct-head", "mr-metastasis": "mr-brain"}
# install_untrained_models lives in models.untrained (the benchmarks use it too); the tests take it from here.
__all__ = ["KIND_OF_TASK", "TASKS", "Destination", "dciodvfy_errors", "destination_scp", "install_untrained_models",
           "phantoms", "study_files"]


def phantoms(out: Path, kinds: tuple[str, ...], studies: int = 1, slices: int = 10, size: int = 64,
             seed: int = 7) -> Manifest:
    """Small phantom studies of the given synth kinds (``cxr``, ``ct-head``, ``mr-brain``)."""
    return generate(out, studies, list(kinds), seed, ct_slices=slices, mr_slices=slices, ct_size=size,
                    mr_size=size, cxr_size=size * 2)


def study_files(out: Path, study_uid: str) -> list[Path]:
    """The image files of one generated study (SEG ground truth excluded)."""
    files = []
    for path in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "Modality"])
        if ds.StudyInstanceUID == study_uid and ds.Modality != "SEG":
            files.append(path)
    return files


@dataclass
class Destination:
    """A storage SCP that keeps what it received: SOP Instance UID -> Part 10 bytes, and every C-STORE."""

    port: int
    received: dict[str, bytes] = field(default_factory=dict)
    stores: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def datasets(self) -> list[Dataset]:
        with self.lock:
            blobs = list(self.received.values())
        return [pydicom.dcmread(pydicom.filebase.DicomBytesIO(b)) for b in blobs]

    def of_study(self, study_uid: str) -> list[Dataset]:
        return [ds for ds in self.datasets() if ds.StudyInstanceUID == study_uid]


@contextmanager
def destination_scp(port: int, ae_title: str = "DEST") -> Iterator[Destination]:
    dest = Destination(port)

    def on_store(event: Event) -> int:
        ds = event.dataset
        with dest.lock:
            dest.received[str(ds.SOPInstanceUID)] = bytes(event.encoded_dataset())
            dest.stores += 1
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield dest
    finally:
        server.shutdown()


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy (dicom3tools) reports for a file."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
