"""Orthanc (Debian package ``orthanc``) as the hospital PACS of the tests: started on free loopback
ports with a configuration of the test's own, fed through its REST API, stopped at the end."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_until
from lifecycle_support import stop_process

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
ORTHANC_AET = "ORTHANC"
requires_orthanc = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (Debian package 'orthanc'; "
                                                               ".ci/install installs it)")


@dataclass
class Orthanc:
    """A private Orthanc: its ports, the ports reserved for the peers it knows (by name) and its log."""

    http_port: int
    dicom_port: int
    peers: dict[str, int]
    log: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            body = response.read()
        return body if path.endswith("/file") else json.loads(body)

    def upload(self, path: Path) -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/instances", data=path.read_bytes(),
                                         headers={"Content-Type": "application/dicom"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
        return answer

    def study_id(self, study_uid: str) -> str:
        """Orthanc's own identifier of a study, from its StudyInstanceUID."""
        (match,) = self.post_json("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        return str(match)

    def post_json(self, path: str, payload: dict[str, Any]) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def instances_by_modality(self, study_uid: str) -> dict[str, list[str]]:
        """Modality -> Orthanc instance ids of one study."""
        out: dict[str, list[str]] = {}
        for series in self.get(f"/studies/{self.study_id(study_uid)}/series"):
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).extend(series["Instances"])
        return out

    def stable_events(self) -> int:
        changes = self.get("/changes?since=0&limit=10000")["Changes"]
        return sum(1 for change in changes if change["ChangeType"] == "StableStudy")

    def jobs(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.get("/jobs?expand")
        return jobs

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


    def upload_all(self, paths: list[Path]) -> None:
        for path in paths:
            self.upload(path)


def _answers(orthanc: Orthanc) -> bool:
    try:
        orthanc.get("/system")
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


@contextmanager
def run_orthanc(folder: Path, peers: dict[str, str], **config: Any) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports, knowing each peer (name -> AE title) at a port reserved for
    it on 127.0.0.1; ``config`` adds to or overrides the configuration (Orthanc's own keys)."""
    assert ORTHANC is not None
    folder.mkdir(parents=True, exist_ok=True)
    server = Orthanc(http_port=free_port(), dicom_port=free_port(), peers={name: free_port() for name in peers},
                     log=folder / "orthanc.log")
    settings = {
        "Name": folder.name,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "Plugins": [],
        "HttpPort": server.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": ORTHANC_AET,
        "DicomPort": server.dicom_port,
        "DicomModalities": {name: [aet, "127.0.0.1", server.peers[name]] for name, aet in peers.items()},
        "SaveJobs": False,
        **config,
    }
    (folder / "orthanc.json").write_text(json.dumps(settings, indent=2))
    with server.log.open("wb") as log:
        process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=folder)
    try:
        assert wait_until(lambda: process.poll() is None and _answers(server), timeout=30), server.log_tail()
        yield server
    finally:
        stop_process(process)
