"""C-ECHO and C-STORE over real associations: every byte a peer sends is what the store keeps.

DCMTK (echoscu, storescu) is the outside peer; DCMTK's own storescp in bit-preserving mode
records what storescu really sent, so the node's file can be compared byte for byte. pynetdicom
sends pydicom's test files verbatim (no decode / re-encode), so the node's file must equal the
original file after its meta.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import PYDICOM_TEST_FILES, free_port, make_settings, wait_until
from test_scp_support import (
    DCMTK_ENV,
    NODE_AE,
    context_for,
    dataset_bytes,
    dcmtk,
    encode_dataset,
    scu,
    send_raw,
    store_raw,
    stored_instances,
    transfer_syntax_of,
    write_raw_instance,
)

from node.service import Node

# file -> storescu options that make it propose the file's own transfer syntax
DCMTK_FILES: dict[str, list[str]] = {
    "CT_small.dcm": [],  # CT, explicit VR little endian
    "MR_small.dcm": [],  # MR
    "examples_palette.dcm": [],  # US, 283 kB: many 16 kB PDUs
    "ExplVR_BigEnd.dcm": ["-xb"],  # US, explicit VR big endian
    "rtplan.dcm": ["-xi"],  # implicit VR little endian
    "examples_ybr_color.dcm": ["-xy"],  # US, JPEG baseline
    "JPEG-lossy.dcm": ["-xx"],  # JPEG extended (12 bit)
    "examples_jpeg2k.dcm": ["-xv"],  # US, JPEG 2000 lossless
    "JPEG2000.dcm": ["-xw"],  # JPEG 2000
    "SC_rgb_rle.dcm": ["-xr"],  # RLE lossless
    "image_dfl.dcm": ["-xd"],  # deflated explicit VR little endian
}

# Sent verbatim by pynetdicom, each in a presentation context of its own syntax.
PYNETDICOM_FILES = [
    "CT_small.dcm",  # CT, explicit VR little endian
    "MR_small_RLE.dcm",  # MR, RLE lossless
    "examples_palette.dcm",  # US, palette colour
    "examples_ybr_color.dcm",  # US, JPEG baseline
    "JPEG-lossy.dcm",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "examples_jpeg2k.dcm",  # US, JPEG 2000 lossless
    "693_J2KI.dcm",  # CT, JPEG 2000
    "image_dfl.dcm",  # deflated explicit VR little endian: the deflated bytes as sent
    "ExplVR_BigEnd.dcm",  # explicit VR big endian
    "liver_1frame.dcm",  # SEG (a non-image object)
    "reportsi.dcm",  # SR
    "waveform_ecg.dcm",  # ECG waveform, 290 kB
]
# From the pydicom-data package (installed, read locally; never downloaded).
DATA_STORE_FILES = [
    "gdcm-US-ALOKA-16.dcm",  # US, implicit VR little endian, 870 kB
    "emri_small_jpeg_ls_lossless.dcm",  # MR, JPEG-LS lossless
    "MR2_UNCI.dcm",  # MR, 2 MB: larger than the node's 1 MiB PDU, so it arrives in several
]

_spec = importlib.util.find_spec("data_store")
assert _spec is not None and _spec.origin is not None, "the pydicom-data package is not installed"
DATA_STORE = Path(_spec.origin).parent / "data"

DCMTK_FILE_TS = {
    "ExplVR_BigEndNoMeta.dcm": "1.2.840.10008.1.2.2",  # a dataset without file meta
}


@pytest.fixture
def node(start_node: Callable[..., Node], tmp_path: Path) -> Node:
    # No routing rules and a long quiet period: studies stay "receiving" during a test.
    return start_node(make_settings(tmp_path, node={"quiet_period_s": 60}, routing={"rules": []}))


@pytest.fixture
def reference_scp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp, bit-preserving: its files hold exactly the bytes storescu sent."""
    folder = tmp_path / "reference"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(["storescp", "+B", "+xa", "-od", str(folder), "-aet", "REFSCP", str(port)],
                               env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: dcmtk("echoscu", "-aec", "REFSCP", "127.0.0.1", str(port)).returncode == 0,
                          timeout=10), "reference storescp did not start"
        yield port, folder
    finally:
        process.terminate()
        process.wait(timeout=10)


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def _stored_path(node: Node, source: Path) -> Path:
    ds = pydicom.dcmread(source, stop_before_pixels=True, force=True)
    return node.store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def _index_rows(node: Node, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(node.settings.node.index_path) as conn:
        return conn.execute(sql, params).fetchall()


def test_dcmtk_echoscu_is_answered(node: Node) -> None:
    result = dcmtk("echoscu", "-v", "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port))
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr + result.stdout


def test_dcmtk_storescu_instances_are_stored_byte_for_byte_in_their_own_syntax(
    node: Node, reference_scp: tuple[int, Path],
) -> None:
    ref_port, ref_folder = reference_scp
    for name, options in DCMTK_FILES.items():
        source = PYDICOM_TEST_FILES / name
        for called, port in ((NODE_AE, node.dicom_port), ("REFSCP", ref_port)):
            result = dcmtk("storescu", "-R", *options, "-aec", called, "127.0.0.1", str(port), str(source))
            assert result.returncode == 0, f"{name} -> {called}: {result.stderr}"
        sop_uid = _sop_uid(source)
        (reference,) = [p for p in ref_folder.iterdir() if p.name.endswith(sop_uid)]
        stored = _stored_path(node, source)
        assert stored.is_file(), f"{name} was not stored"
        assert transfer_syntax_of(stored) == transfer_syntax_of(source), f"{name} was transcoded"
        assert transfer_syntax_of(reference) == transfer_syntax_of(source), f"storescu did not send {name} as is"
        sent, kept = dataset_bytes(reference), dataset_bytes(stored)
        assert len(kept) == len(sent) and kept == sent, f"{name}: stored dataset differs from the bytes sent"
    assert len(stored_instances(node.store.root)) == len(DCMTK_FILES)
    rows = _index_rows(node, "SELECT sop_uid, transfer_syntax_uid FROM instances")
    assert {uid: ts for uid, ts in rows} == {
        _sop_uid(PYDICOM_TEST_FILES / n): transfer_syntax_of(PYDICOM_TEST_FILES / n) for n in DCMTK_FILES
    }


def test_dcmtk_storescu_dataset_without_file_meta_is_stored(node: Node, reference_scp: tuple[int, Path]) -> None:
    """A bare big-endian dataset (no meta): storescu infers its syntax; the node stores what was sent."""
    ref_port, ref_folder = reference_scp
    for name, syntax in DCMTK_FILE_TS.items():
        source = PYDICOM_TEST_FILES / name
        for called, port in ((NODE_AE, node.dicom_port), ("REFSCP", ref_port)):
            result = dcmtk("storescu", "-R", "-xb", "-aec", called, "127.0.0.1", str(port), str(source))
            assert result.returncode == 0, f"{name} -> {called}: {result.stderr}"
        (reference,) = [p for p in ref_folder.iterdir() if p.name.endswith(_sop_uid(source))]
        stored = _stored_path(node, source)
        assert transfer_syntax_of(stored) == transfer_syntax_of(reference) == syntax
        assert dataset_bytes(stored) == dataset_bytes(reference)
        assert dataset_bytes(stored) == source.read_bytes(), "storescu sent the bare dataset unchanged"


def test_pynetdicom_instances_are_stored_exactly_as_the_original_files(node: Node) -> None:
    sources = [PYDICOM_TEST_FILES / name for name in PYNETDICOM_FILES]
    sources += [DATA_STORE / name for name in DATA_STORE_FILES]
    # One presentation context per (SOP class, syntax), so each file travels in its own syntax.
    pairs = sorted({(context_for(p)[0], context_for(p)[1][0]) for p in sources})
    with scu(node.dicom_port, [(sop_class, [ts]) for sop_class, ts in pairs]) as assoc:
        assert assoc.is_established
        statuses = {p.name: send_raw(assoc, p) for p in sources}
    assert statuses == {p.name: 0x0000 for p in sources}
    for source in sources:
        stored = _stored_path(node, source)
        assert stored.is_file(), f"{source.name} was not stored"
        assert transfer_syntax_of(stored) == transfer_syntax_of(source), f"{source.name} was transcoded"
        assert dataset_bytes(stored) == dataset_bytes(source), f"{source.name}: stored bytes differ"
        assert pydicom.dcmread(stored).SOPInstanceUID == _sop_uid(source)  # a valid DICOM file
    assert stored_instances(node.store.root) == {_stored_path(node, p) for p in sources}
    rows = _index_rows(node, "SELECT sop_uid, transfer_syntax_uid, size FROM instances")
    assert {uid: ts for uid, ts, _ in rows} == {_sop_uid(p): transfer_syntax_of(p) for p in sources}
    assert {uid: size for uid, _, size in rows} == {_sop_uid(p): _stored_path(node, p).stat().st_size
                                                    for p in sources}


def _study_snapshot(node: Node, study_uid: str) -> tuple[object, ...]:
    study = node.index.study(study_uid)
    assert study is not None
    instances = _index_rows(node, "SELECT sop_uid, path, size, version, received_at FROM instances ORDER BY sop_uid")
    series = _index_rows(node, "SELECT series_uid, instance_count FROM series ORDER BY series_uid")
    return study, instances, series


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_identical_resend_is_acknowledged_and_changes_nothing(node: Node) -> None:
    source = PYDICOM_TEST_FILES / "CT_small.dcm"
    study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    assert store_raw(node.dicom_port, source) == 0x0000
    before_index, before_files = _study_snapshot(node, study_uid), _tree(node.store.root)
    assert store_raw(node.dicom_port, source) == 0x0000  # over a new association
    with scu(node.dicom_port, [context_for(source)]) as assoc:  # twice on one association
        assert send_raw(assoc, source) == 0x0000
        assert send_raw(assoc, source) == 0x0000
    assert _study_snapshot(node, study_uid) == before_index
    assert _tree(node.store.root) == before_files, "a re-send wrote or changed a file"
    study = node.index.study(study_uid)
    assert study is not None and (study.version, study.state, study.image_count) == (1, "receiving", 1)


def test_identical_resend_after_completion_does_not_reopen_the_study(
    start_node: Callable[..., Node], tmp_path: Path,
) -> None:
    node = start_node(make_settings(tmp_path, node={"quiet_period_s": 0.3}, routing={"rules": []}))
    source = PYDICOM_TEST_FILES / "MR_small.dcm"
    study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    assert store_raw(node.dicom_port, source) == 0x0000
    assert wait_until(lambda: getattr(node.index.study(study_uid), "state", "") == "unmatched", timeout=10)
    before = _study_snapshot(node, study_uid)
    assert store_raw(node.dicom_port, source) == 0x0000
    time.sleep(0.6)  # two assembler rounds
    assert _study_snapshot(node, study_uid) == before
    study = node.index.study(study_uid)
    assert study is not None and (study.version, study.state) == (1, "unmatched")


def test_different_dataset_with_same_sop_instance_uid_goes_to_quarantine(node: Node, tmp_path: Path) -> None:
    source = PYDICOM_TEST_FILES / "CT_small.dcm"
    original = pydicom.dcmread(source)
    assert store_raw(node.dicom_port, source) == 0x0000
    stored = _stored_path(node, source)
    stored_before = stored.read_bytes()
    index_before = _study_snapshot(node, str(original.StudyInstanceUID))

    changed = pydicom.dcmread(source)
    changed.PatientName = "Other^Patient"
    changed.InstanceNumber = 99
    body = encode_dataset(changed)
    resend = write_raw_instance(tmp_path / "changed.dcm", body, sop_class=str(changed.SOPClassUID),
                                sop_uid=str(changed.SOPInstanceUID))
    assert store_raw(node.dicom_port, resend) == 0x0000  # durable in quarantine: the peer may let go

    assert stored.read_bytes() == stored_before, "the original instance was overwritten"
    assert _study_snapshot(node, str(original.StudyInstanceUID)) == index_before
    assert stored_instances(node.store.root) == {stored}
    conflicts = list((node.store.quarantine / "conflicts").rglob("*.dcm"))
    assert len(conflicts) == 1 and conflicts[0].name.startswith(str(original.SOPInstanceUID))
    assert dataset_bytes(conflicts[0]) == body, "the quarantined copy is not what was sent"
    assert not list(node.store.incoming.iterdir()), "a temp file was left behind"


def test_same_sop_instance_uid_under_another_study_goes_to_quarantine(node: Node, tmp_path: Path) -> None:
    source = PYDICOM_TEST_FILES / "CT_small.dcm"
    assert store_raw(node.dicom_port, source) == 0x0000
    moved = pydicom.dcmread(source)
    moved.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.99"
    body = encode_dataset(moved)
    resend = write_raw_instance(tmp_path / "moved.dcm", body, sop_class=str(moved.SOPClassUID),
                                sop_uid=str(moved.SOPInstanceUID))
    assert store_raw(node.dicom_port, resend) == 0x0000
    assert stored_instances(node.store.root) == {_stored_path(node, source)}, "an unindexed copy is in the store"
    (conflict,) = (node.store.quarantine / "conflicts").rglob("*.dcm")
    assert dataset_bytes(conflict) == body
