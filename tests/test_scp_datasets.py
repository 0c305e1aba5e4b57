"""Datasets the node must refuse: missing or malformed UIDs, crafted path-like UIDs, bytes that do
not decode. Each gets a failure status, is kept in quarantine, writes nothing outside the store,
and the node (and the very association) keeps serving.
"""

from __future__ import annotations

import os
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import PYDICOM_TEST_FILES, make_settings
from pynetdicom.association import Association
from test_scp_support import (
    context_for,
    dataset_bytes,
    echo,
    encode_dataset,
    files_under,
    scu,
    send_raw,
    store_raw,
    stored_instances,
    write_raw_instance,
)

from node.scp import CANNOT_UNDERSTAND, DATASET_MISMATCH, INVALID_UID, SUCCESS
from node.service import Node

# pydicom warns about the invalid values these tests build on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CT = PYDICOM_TEST_FILES / "CT_small.dcm"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
ALL_SYNTAXES = [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED]


def is_failure(status: int) -> bool:
    """A failure status of C-STORE (PS3.4 B.2.3 / PS3.7 C): 0xA7xx, 0xA9xx, 0xCxxx or 0x01xx."""
    return (status & 0xF000) in (0xA000, 0xC000) or (status & 0xFF00) == 0x0100


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the module (each test looks at what it changed): many cases, quickly."""
    running = Node(make_settings(tmp_path_factory.mktemp("node"), routing={"rules": []}), with_worker=False)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def assoc(node: Node) -> Iterator[Association]:
    """One association proposing CT storage in every uncompressed syntax, plus Verification."""
    with scu(node.dicom_port, [(CT_CLASS, [ts]) for ts in ALL_SYNTAXES]
             + [("1.2.840.10008.1.1", [IMPLICIT_LE])]) as association:
        assert association.is_established
        yield association


def _ct_with(**changes: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(CT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we set on purpose
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return ds


def _raw(tmp_path: Path, name: str, body: bytes, *, sop_uid: str = "1.2.826.0.1.3680043.2.1125.1",
         syntax: str = EXPLICIT_LE, sop_class: str = CT_CLASS) -> Path:
    folder = tmp_path / "sources"
    folder.mkdir(exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_raw_instance(folder / f"{name}.dcm", body, sop_class=sop_class, sop_uid=sop_uid,
                                  transfer_syntax=syntax)


def _rejected(node: Node) -> set[Path]:
    return set((node.store.quarantine / "rejected").glob("*.dcm"))


def _outside_store(tmp_path: Path, node: Node) -> set[Path]:
    """Files outside the store (in the node's folder and the test's), except the test's sources."""
    files = files_under(tmp_path) | files_under(node.settings.node.data_dir.parent)
    return {p for p in files
            if not p.is_relative_to(node.store.root) and not p.is_relative_to(tmp_path / "sources")}


@pytest.fixture
def state(node: Node) -> tuple[set[Path], set[Path]]:
    """What the shared node held before the test: (instances, rejected)."""
    return stored_instances(node.store.root), _rejected(node)


# --- missing and malformed UIDs ---------------------------------------------------------------

@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
@pytest.mark.parametrize("value", [None, "", "1.2.03.4", "1.2.3.", "abc", "1..2", "1.2.3a"])
def test_missing_or_malformed_uid_is_refused(
    node: Node, state: tuple[set[Path], set[Path]], assoc: Association, tmp_path: Path, keyword: str,
    value: str | None,
) -> None:
    ds = _ct_with(**{keyword: value})
    body = encode_dataset(ds)
    # The request names the instance as the dataset does (or as the original did, when the
    # dataset has none): only the UID itself is wrong.
    sop_uid = value if keyword == "SOPInstanceUID" and value else str(pydicom.dcmread(CT).SOPInstanceUID)
    path = _raw(tmp_path, "bad", body, sop_uid=sop_uid)
    assert send_raw(assoc, path) == INVALID_UID
    assert stored_instances(node.store.root) == state[0]
    (kept,) = _rejected(node) - state[1]
    assert dataset_bytes(kept) == body, "the refused dataset was not kept as received"
    assert keyword in kept.with_suffix(".reason").read_text()
    assert assoc.send_c_echo().Status == SUCCESS  # the same association goes on


CRAFTED = [
    "../../etc",
    "1.2.3/../../x",
    "..",
    ".",
    "1.2.3/4",
    "1.2.3\\..\\..\\x",  # a backslash: DICOM's value separator
    "1.2.3\x00/../x",
    "1.2.3\n4",
    "1" * 65,  # one over the UI maximum
    "1." + "2" * 1000,  # far over it
]


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_crafted_uids_cannot_write_outside_the_store(
    node: Node, state: tuple[set[Path], set[Path]], assoc: Association, tmp_path: Path, keyword: str,
) -> None:
    crafted = [*CRAFTED, str(tmp_path / "escaped"), "/etc/pacsnode-escape", str(tmp_path)]
    before = _outside_store(tmp_path, node)
    statuses = {}
    for index, value in enumerate(crafted):
        ds = _ct_with(**{keyword: value})
        # The request's Affected SOP Instance UID carries the crafted value too where pynetdicom lets it.
        carried = keyword == "SOPInstanceUID" and len(value) <= 64 and "\\" not in value
        sop_uid = value if carried else str(pydicom.dcmread(CT).SOPInstanceUID)
        path = _raw(tmp_path, f"crafted-{index}", encode_dataset(ds), sop_uid=sop_uid)
        statuses[value] = send_raw(assoc, path)
    assert all(is_failure(status) for status in statuses.values()), {k: hex(v) for k, v in statuses.items()}
    assert all(status == INVALID_UID for status in statuses.values()), {k: hex(v) for k, v in statuses.items()}
    assert _outside_store(tmp_path, node) == before, "a crafted UID wrote a file outside the store"
    assert not Path("/etc/pacsnode-escape").exists() and not Path("/etc/pacsnode-escape.dcm").exists()
    assert stored_instances(node.store.root) == state[0]
    inside = {p.relative_to(node.store.root).parts[0] for p in files_under(node.store.root)}
    assert inside <= {".quarantine"} | {p.relative_to(node.store.root).parts[0] for p in state[0]}, inside
    assert len(_rejected(node) - state[1]) == len(crafted)
    assert echo(node.dicom_port) == SUCCESS


# --- bytes that do not decode -----------------------------------------------------------------

def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH", group, elem) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return struct.pack("<HHH", group, elem, 0)[:4] + vr + struct.pack("<H", len(value)) + value


CT_BODY = dataset_bytes(CT)
UNDECODABLE: dict[str, tuple[bytes, str]] = {
    "random": (os.urandom(4096), EXPLICIT_LE),
    "random-implicit": (os.urandom(4096), IMPLICIT_LE),
    "random-big-endian": (os.urandom(4096), EXPLICIT_BE),
    "random-deflated": (os.urandom(4096), DEFLATED),
    "deflated-ct-stored-raw": (CT_BODY, DEFLATED),  # declared deflated, is not
    "empty": (b"", EXPLICIT_LE),
    "zeros": (b"\x00" * 512, EXPLICIT_LE),
    "truncated-header": (CT_BODY[:301], EXPLICIT_LE),
    "truncated-inside-an-element": (CT_BODY[:CT_BODY.index(b"\x20\x00\x0d\x00") + 11], EXPLICIT_LE),
    "unknown-vr": (_element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\x00")
                   + b"\x20\x00\x0d\x00ZZ\x04\x001.23", EXPLICIT_LE),
    "element-longer-than-the-data": (_element(0x0008, 0x0016, b"UI", b"1.2.3\x00")
                                     + b"\x09\x00\x10\x00OB\x00\x00" + struct.pack("<I", 0xFFFFFFF0) + b"abc",
                                     EXPLICIT_LE),
    "unterminated-sequence": (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
                              + _element(0x0008, 0x1150, b"UI", b"1.2\x00"), EXPLICIT_LE),
    "deflate-stream-cut": (zlib.compress(CT_BODY)[2:400], DEFLATED),
}


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
def test_undecodable_dataset_gets_a_failure_and_the_node_keeps_serving(
    node: Node, state: tuple[set[Path], set[Path]], assoc: Association, tmp_path: Path, case: str,
) -> None:
    body, syntax = UNDECODABLE[case]
    path = _raw(tmp_path, case, body, syntax=syntax)
    status = send_raw(assoc, path)
    assert status in (CANNOT_UNDERSTAND, INVALID_UID), hex(status)
    assert stored_instances(node.store.root) == state[0]
    (kept,) = _rejected(node) - state[1]  # refused, and kept for inspection
    assert dataset_bytes(kept) == body
    reason = kept.with_suffix(".reason").read_text()
    expected = "dataset does not parse" if status == CANNOT_UNDERSTAND else "is missing or not a valid UID"
    assert expected in reason, reason
    assert assoc.send_c_echo().Status == SUCCESS  # the same association goes on
    with scu(node.dicom_port, [context_for(CT)]) as other:  # and a new one stores
        assert send_raw(other, CT) == SUCCESS
    assert len(stored_instances(node.store.root) - state[0]) <= 1


def test_dataset_that_contradicts_its_request_is_refused(
    node: Node, state: tuple[set[Path], set[Path]], tmp_path: Path,
) -> None:
    # pydicom's rtplan.dcm really has another SOP Instance UID in its meta than in its dataset.
    rtplan = PYDICOM_TEST_FILES / "rtplan.dcm"
    assert store_raw(node.dicom_port, rtplan) == DATASET_MISMATCH
    ds = pydicom.dcmread(CT)
    other_class = _raw(tmp_path, "other-class", encode_dataset(ds), sop_uid=str(ds.SOPInstanceUID),
                       sop_class="1.2.840.10008.5.1.4.1.1.4")
    assert store_raw(node.dicom_port, other_class) == DATASET_MISMATCH
    assert stored_instances(node.store.root) == state[0]
    assert len(_rejected(node) - state[1]) == 2
    assert store_raw(node.dicom_port, CT) == SUCCESS


@pytest.mark.parametrize("keyword, vr, value", [
    ("SeriesNumber", "IS", "99999999999999999999"),  # 20 digits: beyond SQLite's 64-bit INTEGER
    ("Rows", "UV", 2**64 - 1),
    ("Columns", "SV", -(2**63)),
])
def test_out_of_range_integer_is_refused_and_storing_goes_on(
    node: Node, state: tuple[set[Path], set[Path]], tmp_path: Path, keyword: str, vr: str, value: object,
) -> None:
    """Such a value once reached the index, raised OverflowError in the ingest writer's thread
    and killed it: every later C-STORE then hung for a minute and failed. (The header read now
    refuses it before; the group commit survives one anyway: test_scp_durability.)"""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.7.{len(keyword)}{len(str(value))}"
    tag = pydicom.datadict.tag_for_keyword(keyword)
    assert tag is not None
    del ds[tag]
    ds.add_new(tag, vr, value)
    path = _raw(tmp_path, keyword, encode_dataset(ds), sop_uid=str(ds.SOPInstanceUID))
    assert store_raw(node.dicom_port, path) == CANNOT_UNDERSTAND
    started = time.monotonic()
    other = _ct_with(SOPInstanceUID=f"{ds.SOPInstanceUID}.1")
    follow_up = _raw(tmp_path, "follow-up", encode_dataset(other), sop_uid=str(other.SOPInstanceUID))
    assert store_raw(node.dicom_port, follow_up) == SUCCESS
    assert time.monotonic() - started < 5, "storing stalled after the bad dataset"
