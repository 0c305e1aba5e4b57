"""Success is only answered for durable instances.

The node's StudyStore gets an injected fsync (the only stand-in in these tests): one that blocks
on an event shows that no C-STORE response leaves the node before the file and its folders are
fsynced; one that raises shows that a write that cannot be made durable is never answered
success. A full disk (free space below the watermark) is answered out of resources.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import PYDICOM_TEST_FILES, make_settings
from test_scp_support import (
    dataset_bytes,
    echo,
    encode_dataset,
    store_raw,
    stored_instances,
    write_raw_instance,
)

from node.headers import InstanceHeader, InstanceKind
from node.index import IngestChange, Received, StudyIndex
from node.ingest import IngestWriter
from node.scp import INVALID_UID, OUT_OF_RESOURCES_DISK, OUT_OF_RESOURCES_WRITE, SUCCESS
from node.service import Node
from node.store import InstanceKey, StudyStore

CT = PYDICOM_TEST_FILES / "CT_small.dcm"


class GatedFsync:
    """A real fsync that records what it synced and can be held at a gate per kind (file / dir)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.entered = {"file": threading.Event(), "dir": threading.Event()}
        self.gates: dict[str, threading.Event] = {}
        self.fail: set[str] = set()
        self.hold_first_only = False
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        path = os.readlink(f"/proc/self/fd/{fd}")
        with self._lock:
            first = not self.entered[kind].is_set()
            self.entered[kind].set()
        gate = self.gates.get(kind)
        if gate is not None and (first or not self.hold_first_only):
            assert gate.wait(timeout=30), "test never released the fsync gate"
        if kind in self.fail:
            raise OSError(errno.EIO, "injected fsync failure", path)
        os.fsync(fd)
        with self._lock:
            self.calls.append((kind, path))

    def release(self) -> None:
        for gate in self.gates.values():
            gate.set()


@pytest.fixture
def gated_node(tmp_path: Path) -> Iterator[tuple[Node, GatedFsync]]:
    fsync = GatedFsync()
    # receivers 1: fsync is injected into the node's own store, so the node must receive in-process.
    node = Node(make_settings(tmp_path, node={"quiet_period_s": 60, "receivers": 1}, routing={"rules": []}),
                with_worker=False)
    node.store._fsync = fsync  # the store's documented injection point
    node.start()
    try:
        yield node, fsync
    finally:
        fsync.release()
        node.stop()


def _final_path(node: Node, ds: pydicom.Dataset) -> Path:
    return node.store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def _indexed(node: Node) -> list[tuple[object, ...]]:
    with sqlite3.connect(node.settings.node.index_path) as conn:
        return conn.execute("SELECT sop_uid, size FROM instances").fetchall()


def _store_in_thread(port: int, path: Path) -> tuple[threading.Thread, dict[str, int], threading.Event]:
    result: dict[str, int] = {}
    answered = threading.Event()

    def run() -> None:
        result["status"] = store_raw(port, path)
        answered.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result, answered


def test_no_response_before_the_file_and_its_folders_are_fsynced(gated_node: tuple[Node, GatedFsync]) -> None:
    node, fsync = gated_node
    fsync.gates = {"file": threading.Event(), "dir": threading.Event()}
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    final = _final_path(node, ds)

    thread, result, answered = _store_in_thread(node.dicom_port, CT)

    # 1. The instance's own file is being fsynced: not in place, not indexed, not answered.
    assert fsync.entered["file"].wait(10), "the received file was never fsynced"
    assert not answered.wait(0.5), "the SCU got a response while the file's fsync was still blocked"
    assert not final.exists(), "the file was moved into the store before it was fsynced"
    fsync.gates["file"].set()

    # 2. Renamed into place, its folders being fsynced: still no answer, not indexed.
    assert fsync.entered["dir"].wait(10), "the store folders were never fsynced"
    assert not answered.wait(0.5), "the SCU got a response while the folder fsync was still blocked"
    assert final.is_file()
    assert _indexed(node) == []

    # 3. Released: success arrives, the instance is durable and indexed.
    fsync.gates["dir"].set()
    assert answered.wait(10), "no response after fsync was released"
    thread.join(5)
    assert result["status"] == SUCCESS
    assert dataset_bytes(final) == dataset_bytes(CT)
    assert [uid for uid, _ in _indexed(node)] == [ds.SOPInstanceUID]
    synced = [(kind, Path(path)) for kind, path in fsync.calls]
    assert synced[0][0] == "file" and synced[0][1].parent == node.store.incoming
    assert {final.parent, final.parent.parent, node.store.root} <= {p for kind, p in synced if kind == "dir"}


def test_failing_file_fsync_is_answered_out_of_resources_and_leaves_nothing(
    gated_node: tuple[Node, GatedFsync],
) -> None:
    node, fsync = gated_node
    fsync.fail = {"file"}
    assert store_raw(node.dicom_port, CT) == OUT_OF_RESOURCES_WRITE
    assert stored_instances(node.store.root) == set()
    assert list(node.store.incoming.iterdir()) == [], "the temp file of a failed write was left behind"
    assert _indexed(node) == []
    assert echo(node.dicom_port) == SUCCESS  # the node keeps serving
    fsync.fail = set()
    assert store_raw(node.dicom_port, CT) == SUCCESS  # the peer's retry succeeds once the disk recovers
    assert len(_indexed(node)) == 1


def test_refused_dataset_keeps_its_failure_status_when_quarantine_cannot_be_written(
    gated_node: tuple[Node, GatedFsync], tmp_path: Path,
) -> None:
    node, fsync = gated_node
    fsync.fail = {"file"}
    junk = write_raw_instance(tmp_path / "junk.dcm", b"\x00" * 64, sop_class="1.2.840.10008.5.1.4.1.1.2",
                              sop_uid="1.2.3.4")
    assert store_raw(node.dicom_port, junk) == INVALID_UID  # about the data, not the disk
    assert list(node.store.incoming.iterdir()) == []
    assert echo(node.dicom_port) == SUCCESS


def test_failing_folder_fsync_is_answered_out_of_resources_and_a_retry_indexes_it(
    gated_node: tuple[Node, GatedFsync],
) -> None:
    node, fsync = gated_node
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    fsync.fail = {"dir"}
    assert store_raw(node.dicom_port, CT) == OUT_OF_RESOURCES_WRITE
    assert _indexed(node) == [], "an instance whose folder entry is not durable was indexed"
    fsync.fail = set()
    assert store_raw(node.dicom_port, CT) == SUCCESS
    assert _indexed(node) == [(ds.SOPInstanceUID, _final_path(node, ds).stat().st_size)]
    assert dataset_bytes(_final_path(node, ds)) == dataset_bytes(CT)


def test_failing_fsync_of_a_conflicting_resend_is_not_answered_success(
    gated_node: tuple[Node, GatedFsync], tmp_path: Path,
) -> None:
    node, fsync = gated_node
    assert store_raw(node.dicom_port, CT) == SUCCESS
    changed = pydicom.dcmread(CT)
    changed.PatientID = "OTHER"
    other = write_raw_instance(tmp_path / "other.dcm", encode_dataset(changed), sop_class=str(changed.SOPClassUID),
                               sop_uid=str(changed.SOPInstanceUID))
    fsync.fail = {"dir"}
    assert store_raw(node.dicom_port, other) == OUT_OF_RESOURCES_WRITE
    fsync.fail = {"file"}
    assert store_raw(node.dicom_port, other) == OUT_OF_RESOURCES_WRITE
    assert dataset_bytes(_final_path(node, changed)) == dataset_bytes(CT), "the original was touched"


def test_concurrent_different_sends_of_one_instance_keep_the_first_and_quarantine_the_other(
    gated_node: tuple[Node, GatedFsync], tmp_path: Path,
) -> None:
    """Two peers send different datasets with the same SOP Instance UID at the same time.

    The first to be placed must stay; the later one must go to quarantine, not replace it
    (a check-then-rename race would let the slower write overwrite an instance already
    acknowledged and indexed).
    """
    node, fsync = gated_node
    fsync.gates = {"file": threading.Event()}
    fsync.hold_first_only = True
    slow_ds = pydicom.dcmread(CT)
    fast_ds = pydicom.dcmread(CT)
    fast_ds.PatientID = "FAST"
    slow = write_raw_instance(tmp_path / "slow.dcm", encode_dataset(slow_ds), sop_class=str(slow_ds.SOPClassUID),
                              sop_uid=str(slow_ds.SOPInstanceUID))
    fast_body = encode_dataset(fast_ds)
    fast = write_raw_instance(tmp_path / "fast.dcm", fast_body, sop_class=str(fast_ds.SOPClassUID),
                              sop_uid=str(fast_ds.SOPInstanceUID))

    thread, result, answered = _store_in_thread(node.dicom_port, slow)
    assert fsync.entered["file"].wait(10)  # the slow write is held in its fsync
    assert store_raw(node.dicom_port, fast) == SUCCESS  # the fast one is placed, indexed, answered
    final = _final_path(node, fast_ds)
    assert dataset_bytes(final) == fast_body
    fsync.gates["file"].set()
    assert answered.wait(10)
    thread.join(5)
    assert result["status"] == SUCCESS

    assert dataset_bytes(final) == fast_body, "the acknowledged instance was overwritten by a later write"
    (conflict,) = (node.store.quarantine / "conflicts").rglob("*.dcm")
    assert dataset_bytes(conflict) == dataset_bytes(slow)
    assert _indexed(node) == [(str(fast_ds.SOPInstanceUID), final.stat().st_size)]


def _http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_free_disk_below_the_watermark_is_answered_out_of_resources(
    start_node: Callable[..., Node], tmp_path: Path,
) -> None:
    node = start_node(make_settings(tmp_path, node={"min_free_disk_mb": 1 << 40}))
    assert echo(node.dicom_port) == SUCCESS
    assert store_raw(node.dicom_port, CT) == OUT_OF_RESOURCES_DISK
    assert store_raw(node.dicom_port, PYDICOM_TEST_FILES / "MR_small.dcm") == OUT_OF_RESOURCES_DISK
    assert [p for p in node.store.root.rglob("*") if p.is_file()] == []  # nothing stored, nothing kept
    assert _indexed(node) == []
    assert node.http_port is not None
    code, body = _http_get(node.http_port, "/healthz")
    assert code == 503 and json.loads(body)["disk_free_ok"] is False
    started = time.monotonic()
    assert echo(node.dicom_port) == SUCCESS and time.monotonic() - started < 2


def _received(store: StudyStore, sop: str, series_number: int = 1) -> Received:
    """An instance written to ``store``, ready to be indexed."""
    header = InstanceHeader(
        key=InstanceKey("1.2.3", "1.2.3.4", sop), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", body_part="", image_type="",
        series_description="", study_description="", series_number=series_number, rows=None,
        columns=None, slice_thickness=None, study_date="", kind=InstanceKind.IMAGE)
    _, path = store.write(header.key, b"data of " + sop.encode())
    return Received(header=header, path=str(header.key.relative_path), size=10, absolute=path)


def test_ingest_writer_survives_a_batch_that_raises(tmp_path: Path) -> None:
    """Whatever one batch raises fails that batch only: the next instance is indexed as usual."""
    store = StudyStore(tmp_path / "store")
    writer = IngestWriter(StudyIndex(tmp_path / "index.sqlite3"))
    with pytest.raises(OverflowError):
        writer.commit(_received(store, "1.2.3.4.5", 2**70), 10)  # no SQLite INTEGER holds this
    assert writer.commit(_received(store, "1.2.3.4.6"), 10) is IngestChange.NEW


def test_instances_queued_while_another_receiver_commits_are_indexed_in_one_commit(tmp_path: Path) -> None:
    """Group commit: eight association threads wait while a sibling receiver holds the index;
    then one of them indexes all eight in one transaction and each answers with its own result."""
    store, index = StudyStore(tmp_path / "store"), StudyIndex(tmp_path / "index.sqlite3")
    sibling = StudyIndex(tmp_path / "index.sqlite3")  # its own lock file descriptor: another receiver
    writer = IngestWriter(index)
    batches: list[int] = []
    record = index.record_instances
    index.record_instances = lambda batch, now: batches.append(len(batch)) or record(batch, now)  # type: ignore[method-assign]
    results: dict[str, IngestChange] = {}
    items = [_received(store, f"1.2.3.4.{n}") for n in range(8)]
    with sibling.turns.turn():
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i.header.key.sop_uid, writer.commit(i, 10)))
                   for i in items]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while len(writer._queued) < len(items) and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(10)
    assert results == {i.header.key.sop_uid: IngestChange.NEW for i in items}
    assert batches == [8]
    assert writer.commit(items[0], 10) is IngestChange.KNOWN


def test_an_instance_not_indexed_in_time_is_refused_and_indexed_all_the_same(tmp_path: Path) -> None:
    """A sibling receiver stuck in its commit: the thread that waits to commit behind it waits as
    long as it takes; the others give up after their timeout (the SCP answers 0xA701), and their
    instances are indexed by the next commit all the same, as a re-send finds."""
    store, index = StudyStore(tmp_path / "store"), StudyIndex(tmp_path / "index.sqlite3")
    writer = IngestWriter(index)
    first, late = _received(store, "1.2.3.4.1"), _received(store, "1.2.3.4.2")
    results: list[IngestChange] = []
    sibling = StudyIndex(tmp_path / "index.sqlite3")
    with sibling.turns.turn():
        committing = threading.Thread(target=lambda: results.append(writer.commit(first, 10)))
        committing.start()
        while not writer._committing.locked():
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            writer.commit(late, 0.3)
        assert 0.3 <= time.monotonic() - started < 2
    committing.join(10)
    assert results == [IngestChange.NEW]
    assert writer.commit(late, 10) is IngestChange.KNOWN


def _synced_dirs(fsync: GatedFsync, store: StudyStore, key: InstanceKey) -> list[Path]:
    """The folders fsynced for one instance written and group-committed as the ingest writer does."""
    before = len(fsync.calls)
    _, path = store.write(key, CT.read_bytes())
    store.sync_dirs_of(path)
    return sorted((Path(p) for kind, p in fsync.calls[before:] if kind == "dir"), key=lambda p: len(p.parts))


def test_folders_are_fsynced_once_per_series_and_again_where_made_anew(tmp_path: Path) -> None:
    """Each folder fsync costs a disk flush: the store's root and a study's folder are fsynced when
    an entry in them is new to this process, the series folder for every new file."""
    fsync = GatedFsync()
    store = StudyStore(tmp_path / "store", fsync=fsync)
    root = store.root.resolve()
    study, series = root / "1.2.3", root / "1.2.3" / "1.2.3.4"
    assert _synced_dirs(fsync, store, InstanceKey("1.2.3", "1.2.3.4", "1.2.3.4.1")) == [root, study, series]
    assert _synced_dirs(fsync, store, InstanceKey("1.2.3", "1.2.3.4", "1.2.3.4.2")) == [series]
    assert _synced_dirs(fsync, store, InstanceKey("1.2.3", "1.2.3.5", "1.2.3.5.1")) == [study, study / "1.2.3.5"]
    # Another receiver process knows none of this: it fsyncs the whole chain once.
    other = StudyStore(tmp_path / "store", fsync=fsync)
    assert _synced_dirs(fsync, other, InstanceKey("1.2.3", "1.2.3.4", "1.2.3.4.3")) == [root, study, series]
    # A study retired and received again is a new folder: its entry in the root is fsynced again.
    store.retire_study("1.2.3")
    assert _synced_dirs(fsync, store, InstanceKey("1.2.3", "1.2.3.4", "1.2.3.4.4")) == [root, study, series]
