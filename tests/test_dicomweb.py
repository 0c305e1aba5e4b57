"""DICOMweb on the node: STOW-RS through the C-STORE path, QIDO-RS and WADO-RS, with dicomweb-client
(the field's client) and raw multipart requests, over loopback, under the node's authentication."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dicom_factory as f
import pydicom
import pytest
from conftest import wait_until
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from node.index import StudyIndex
from node.service import Node

TOKEN = "a-token-of-at-least-16"


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "pacsnode-test-boundary") -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n" for kind, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _post(url: str, body: bytes, content_type: str, token: str | None = TOKEN) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _state(index: StudyIndex, study_uid: str) -> str | None:
    study = index.study(study_uid)
    return None if study is None else study.state


@pytest.fixture
def node(start_node: Callable[..., Node]) -> Node:
    return start_node(http={"auth": "token", "token": TOKEN})


def _client(node: Node) -> DICOMwebClient:
    return DICOMwebClient(url=f"http://127.0.0.1:{node.http_port}/dicomweb", headers={"Authorization":
                                                                                      f"Bearer {TOKEN}"})


def test_stow_rs_stores_byte_exact_and_routes_with_a_bad_part_refused_alone(node: Node) -> None:
    chest, head = f.cxr(), f.ct_head(8)
    good = [_part10(ds) for ds in chest + head]
    body, content_type = _multipart([("application/dicom", good[0]), ("application/dicom", b"not DICOM at all"),
                                     *(("application/dicom", data) for data in good[1:])])
    status, answer = _post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies", body, content_type)
    assert status == 202, answer
    referenced = answer["00081199"]["Value"]
    failed = answer["00081198"]["Value"]
    assert len(referenced) == len(good) and len(failed) == 1
    assert failed[0]["00081197"]["Value"][0] >= 0xC000  # a "cannot understand" reason for the garbage part
    for ds, data in zip(chest + head, good, strict=True):
        assert next(node.store.root.rglob(f"{ds.SOPInstanceUID}*")).read_bytes() == data
    for study in (chest[0].StudyInstanceUID, head[0].StudyInstanceUID):
        assert wait_until(lambda s=study: _state(node.index, s) == "queued", timeout=15)  # routed like a C-STORE
    again, answer = _post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies", *_multipart(
        [("application/dicom", good[0])]))
    assert again == 200 and len(answer["00081199"]["Value"]) == 1  # a re-send is a duplicate, not an error


def test_stow_rs_by_dicomweb_client_then_qido_and_wado_find_and_return_it(node: Node) -> None:
    # As read from files (PS3.10, with the preamble): what dicomweb-client then writes as each part.
    head = [pydicom.dcmread(io.BytesIO(_part10(ds))) for ds in f.ct_head(2)]
    sr = pydicom.dcmread(io.BytesIO(_part10(f.sr_result(str(head[0].StudyInstanceUID)))))
    seg = pydicom.dcmread(io.BytesIO(_part10(f.seg_result(str(head[0].StudyInstanceUID)))))
    client = _client(node)
    client.store_instances(head + [sr, seg])
    study_uid = str(head[0].StudyInstanceUID)
    studies = client.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    assert len(studies) == 1 and studies[0]["0020000D"]["Value"] == [study_uid]
    assert studies[0]["00201208"]["Value"] == [4]  # instances in the study
    series = client.search_for_series(study_uid)
    assert {s["00080060"]["Value"][0] for s in series} == {"CT", "SR", "SEG"}
    for result in (sr, seg):
        found = client.search_for_instances(study_uid, search_filters={"SOPClassUID": str(result.SOPClassUID)})
        assert [i["00080018"]["Value"][0] for i in found] == [result.SOPInstanceUID]
        returned = client.retrieve_instance(study_uid, str(result.SeriesInstanceUID), str(result.SOPInstanceUID))
        assert returned.SOPInstanceUID == result.SOPInstanceUID and _part10(returned) == _part10(result)
    whole = client.retrieve_study(study_uid)
    assert sorted(ds.SOPInstanceUID for ds in whole) == sorted(str(ds.SOPInstanceUID) for ds in [*head, sr, seg])
    metadata = client.retrieve_study_metadata(study_uid)
    assert len(metadata) == 4 and all("7FE00010" not in item for item in metadata)
    assert client.search_for_studies(search_filters={"StudyDate": "19000101-19000102"}) == []
    assert len(client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"})) == 1
    assert client.search_for_studies(limit=1, offset=1) == []


def test_dicomweb_needs_the_node_credentials(node: Node) -> None:
    body, content_type = _multipart([("application/dicom", _part10(f.cxr()[0]))])
    status, _ = _post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies", body, content_type, token=None)
    assert status == 401
    assert not list(node.store.root.rglob("*.dcm"))
    status, answer = _post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies", b"x", "application/json")
    assert status == 415 and "multipart/related" in str(answer)


def test_stow_rs_to_a_study_refuses_instances_of_another(node: Node, tmp_path: Path) -> None:
    chest, other = f.cxr(), f.cxr()
    body, content_type = _multipart([("application/dicom", _part10(chest[0])), ("application/dicom",
                                                                                  _part10(other[0]))])
    status, answer = _post(f"http://127.0.0.1:{node.http_port}/dicomweb/studies/{chest[0].StudyInstanceUID}", body,
                           content_type)
    assert status == 202 and answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert pydicom.dcmread(next(node.store.root.rglob(f"{chest[0].SOPInstanceUID}*"))).SOPInstanceUID == \
        chest[0].SOPInstanceUID
