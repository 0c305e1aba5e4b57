"""Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``) as the PACS, DICOMweb only: it
pushes a study to the node by STOW-RS, the node stores it byte for byte, routes it, a real worker
processes it, and the SR and SEG go back to Orthanc through a ``kind: dicomweb`` destination.

The node runs with basic authentication; Orthanc's DICOMweb client presents the credentials.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PrivateRedis, free_port, make_settings, wait_until
from lifecycle_support import worker_process
from orthanc_support import Orthanc, requires_orthanc, run_orthanc
from workers_support import phantoms, study_files

from models.untrained import install_untrained_models
from node.service import Node

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "orthanc", "a-password-for-orthanc"
pytestmark = [requires_orthanc, pytest.mark.skipif(not PLUGIN.is_file(), reason="orthanc-dicomweb is not installed "
                                                                                  "(.ci/install installs it)")]


@dataclass
class Pushed:
    node: Node
    orthanc: Orthanc
    study_uid: str
    orthanc_files: dict[str, bytes]  # SOP Instance UID -> the file Orthanc pushed


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    tmp = tmp_path_factory.mktemp("dicomweb-orthanc")
    node_http = free_port()
    install_untrained_models(tmp / "models", tasks=("mr-metastasis",), seg_threshold=0.0)  # every MR gets a SEG
    manifest = phantoms(tmp / "phantoms", ("mr-brain",), slices=10, size=64)
    (record,) = manifest.studies
    with run_orthanc(tmp / "orthanc", {}, Plugins=[str(PLUGIN)], DicomWeb={
            "Enable": True, "Root": "/dicom-web/",
            "Servers": {"pacsnode": [f"http://127.0.0.1:{node_http}/dicomweb/", USER, PASSWORD]}}) as orthanc:
        redis_server = PrivateRedis(tmp)
        redis_server.start()
        settings = make_settings(
            tmp, http={"port": node_http, "auth": "basic", "users": {USER: PASSWORD}}, broker={"url": redis_server.url},
            destinations=[{"name": "orthanc-web", "kind": "dicomweb",
                           "url": f"http://127.0.0.1:{orthanc.http_port}/dicom-web"}])
        node = Node(settings, with_worker=False)
        node.start()
        try:
            with worker_process(settings, tmp / "worker.log"):
                ids = [orthanc.upload(path)["ID"] for path in study_files(tmp / "phantoms", record.study_uid)]
                files = {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]:
                         orthanc.get(f"/instances/{i}/file") for i in ids}
                answer = orthanc.post_json("/dicom-web/servers/pacsnode/stow",
                                           {"Resources": [orthanc.study_id(record.study_uid)], "Synchronous": True})
                assert answer is not None

                def delivered() -> bool:
                    exports = node.index.exports_of(record.study_uid)
                    return bool(exports) and all(e.state == "sent" for e in exports)

                assert wait_until(delivered, timeout=120), ((tmp / "worker.log").read_text()[-2000:],
                                                            node.index.exports_of(record.study_uid))
                yield Pushed(node, orthanc, record.study_uid, files)
        finally:
            node.stop()
            redis_server.stop()


def test_a_study_pushed_by_orthanc_over_stow_rs_is_stored_byte_exact(pushed: Pushed) -> None:
    store = pushed.node.settings.node.store_path
    for sop_uid, data in pushed.orthanc_files.items():
        (ours,) = store.glob(f"{pushed.study_uid}/*/{sop_uid}.dcm")
        assert ours.read_bytes() == data


def test_the_results_reach_orthanc_over_the_dicomweb_destination(pushed: Pushed) -> None:
    study = pushed.node.index.study(pushed.study_uid)
    assert study is not None and study.state == "done"
    held = pushed.orthanc.instances_by_modality(pushed.study_uid)
    assert len(held["SR"]) == 1 and len(held["SEG"]) == 1
    exports = pushed.node.index.exports_of(pushed.study_uid)
    assert {e.destination for e in exports} == {"orthanc-web"} and len(exports) == 2
