"""The ingest path's cuts to pynetdicom (``node.acceptor``), its file meta template
(``node.file_meta``) and its header read (``read_received_header``), each checked against what
pynetdicom and pydicom themselves produce, and the pynetdicom code the overrides rely on pinned
by a digest, so that an upgrade fails here rather than silently in production."""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import PYDICOM_TEST_FILES, make_settings
from pydicom.uid import UID
from pynetdicom import AE, association, dimse, dul, transport
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from test_scp_support import associate_rq_pdu, dataset_offset

from node.acceptor import Doorbell, IngestAssociation, WaitingSocket, store_response_command
from node.file_meta import PREAMBLE, part10_prefix
from node.headers import UnreadableDataset, read_header, read_received_header

# The pynetdicom functions whose behaviour node.acceptor relies on (what it overrides, and the
# loops whose waiting it replaces), as in pynetdicom 3.0.4. A change there fails this test:
# read the new code, check node.acceptor against it, then update the digest.
UPSTREAM = {
    "association.Association.__init__": "eb07516b8009",
    "dul.DULServiceProvider.__init__": "c82dafa9438d",
    "dimse.DIMSEServiceProvider.__init__": "bbecd186810e",
    "dimse.DIMSEServiceProvider.receive_primitive": "5f99c86b14a1",
    "transport.RequestHandler._create_association": "05c8d12b7986",
    "transport.AssociationSocket.ready": "3eb58e3d39dc",
    "transport.AssociationSocket.recv": "6bc20a33b1b7",
    "dul.DULServiceProvider.run_reactor": "e3a10eb3a093",
    "dul.DULServiceProvider._is_transport_event": "8725ed03bb8f",
    "dul.DULServiceProvider.stop_dul": "28a7e0be126e",
    "association.Association._run_reactor": "f28838c5559e",
    "association.Association.kill": "8f9713666a7f",
    "dimse.DIMSEServiceProvider.send_msg": "a839cf2fb469",
}
MODULES = {"transport": transport, "dul": dul, "association": association, "dimse": dimse}
UID_ROOT, MANUFACTURER = "1.2.826.0.1.3680043.10.1", "pacsnode"


def _source_digest(dotted: str) -> str:
    module, *path = dotted.split(".")
    target: Any = MODULES[module]
    for name in path:
        target = getattr(target, name)
    if isinstance(target, property):
        target = target.fget
    return hashlib.sha256(inspect.getsource(target).encode()).hexdigest()[:12]


@pytest.mark.parametrize("dotted", sorted(UPSTREAM))
def test_the_pynetdicom_code_the_overrides_rely_on_is_unchanged(dotted: str) -> None:
    assert _source_digest(dotted) == UPSTREAM[dotted], (
        f"pynetdicom's {dotted} changed: check node.acceptor against it before updating the digest")


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xB000, 0xC001, 0xC211])
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498.12345678901234567890123"])
def test_store_response_is_encoded_as_pynetdicom_encodes_it(status: int, sop_uid: str) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 65535 if status else 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    assert store_response_command(primitive) == encode(message.command_set, True, True)


def test_store_response_with_a_comment_is_left_to_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3"
    primitive.Status = 0xC001
    primitive.ErrorComment = "bad"
    assert store_response_command(primitive) is None
    request = C_STORE()
    request.MessageID = 1
    assert store_response_command(request) is None


@pytest.mark.parametrize("transfer_syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
                                             "1.2.840.10008.1.2.4.50"])
@pytest.mark.parametrize("sop_uid", ["9", "99", "1.2.3.4", "1.2.3.45", "1.2.999.9999.99999", "2.25.1" + "9" * 57])
def test_file_meta_from_the_template_equals_pynetdicoms(transfer_syntax: str, sop_uid: str) -> None:
    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    expected = PREAMBLE + encode_file_meta(create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_uid), transfer_syntax=UID(transfer_syntax)))
    assert part10_prefix(sop_class, sop_uid, transfer_syntax) == expected
    assert part10_prefix(sop_class, sop_uid, transfer_syntax) == expected  # from the cache too


def _real_files() -> list[Path]:
    return sorted(p for p in PYDICOM_TEST_FILES.glob("*.dcm") if p.stat().st_size < 4_000_000)


def _split(path: Path) -> tuple[bytes, int, str] | None:
    """A real file's bytes, where its data set starts, and its transfer syntax (None without meta)."""
    data = path.read_bytes()
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    except Exception:  # noqa: BLE001 - files pydicom cannot read are covered by the next test
        return None
    syntax = str(meta.get("TransferSyntaxUID", ""))
    offset = dataset_offset(data)
    return (data, offset, syntax) if syntax and offset else None


def test_header_from_the_data_set_equals_the_header_from_the_whole_file() -> None:
    """Every real file pydicom ships (implicit, explicit, big endian, deflated, encapsulated):
    reading only the data set in its transfer syntax gives the header the whole-file read gives."""
    compared = 0
    for path in _real_files():
        split = _split(path)
        if split is None:
            continue
        data, offset, syntax = split
        try:
            expected: object = read_header(data, UID_ROOT, MANUFACTURER)
        except (UnreadableDataset, ValueError) as exc:
            expected = type(exc)
        try:
            got: object = read_received_header(data, offset, syntax, UID_ROOT, MANUFACTURER)
        except (UnreadableDataset, ValueError) as exc:
            got = type(exc)
        assert got == expected, path.name
        compared += 1
    assert compared > 50
    syntaxes = {_split(p)[2] for p in _real_files() if _split(p) is not None}  # type: ignore[index]
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"} <= syntaxes


def test_a_data_set_that_does_not_parse_is_unreadable() -> None:
    data = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
    offset = dataset_offset(data)
    broken = data[:offset] + b"\x08\x00\x05\x00CS\xff\xff" + data[offset + 8:offset + 40]
    with pytest.raises(UnreadableDataset):
        read_received_header(broken, offset, "1.2.840.10008.1.2.1", UID_ROOT, MANUFACTURER)
    with pytest.raises(UnreadableDataset):
        read_received_header(data[:offset] + b"not deflate", offset, "1.2.840.10008.1.2.1.99", UID_ROOT,
                             MANUFACTURER)


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def _acceptor_socket(sock: socket.socket) -> WaitingSocket:
    assoc = IngestAssociation(AE(), MODE_ACCEPTOR)
    waiting = WaitingSocket(assoc, sock, assoc.dul.doorbell)  # type: ignore[attr-defined]
    assoc.set_socket(waiting)
    return waiting


def test_recv_reads_a_whole_pdu_that_arrives_in_pieces(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = socket_pair
    waiting = _acceptor_socket(ours)
    payload = bytes(range(256)) * 40_000  # 10 MB: more than one read buffer
    sender = threading.Thread(target=lambda: [peer.sendall(payload[i:i + 70_001])
                                              for i in range(0, len(payload), 70_001)])
    sender.start()
    assert waiting.recv(len(payload)) == payload
    sender.join()


def test_recv_returns_what_came_before_the_peer_closed(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = socket_pair
    waiting = _acceptor_socket(ours)
    peer.sendall(b"abc")
    peer.close()
    assert waiting.recv(0xFFFFFFF0) == b"abc"  # an absurd announced length allocates no 4 GiB


def test_ready_waits_for_data_or_the_doorbell(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, peer = socket_pair
    waiting = _acceptor_socket(ours)
    waiting.assoc.dul.state_machine.current_state = "Sta6"
    started = time.monotonic()
    assert not waiting.ready  # nothing: waits its idle bound, no longer
    assert 0.05 <= time.monotonic() - started < 1.0
    waiting.doorbell.ring()  # as the association thread does when it queues a PDU to send
    started = time.monotonic()
    assert not waiting.ready  # the doorbell ends the wait at once
    assert time.monotonic() - started < 0.05
    peer.sendall(b"x")
    assert waiting.ready


def test_a_closed_doorbell_ignores_rings() -> None:
    bell = Doorbell()
    bell.close()
    bell.ring()  # no write into a file descriptor that may have been reused


def _associated(port: int) -> socket.socket:
    """A raw connection with an accepted association (its peer side costs no CPU while idle)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq_pdu())
    assert sock.recv(1) == b"\x02", "no A-ASSOCIATE-AC"
    return sock


def _thread_cpu_s(native_ids: list[int | None]) -> float:
    """User + system CPU of these threads of this process, from /proc."""
    ticks = 0
    for tid in native_ids:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def test_idle_associations_cost_no_cpu(tmp_path: Path) -> None:
    """Four open, idle associations: pynetdicom's reactors woke 2,000 times a second each (0.1 s
    or more of CPU a second here); the node's threads wait for work."""
    from node.index import StudyIndex
    from node.ingest import IngestWriter
    from node.metrics import ReceiverMetrics
    from node.scp import StorageSCP, start_scp
    from node.store import StudyStore

    settings = make_settings(tmp_path).node
    store, index = StudyStore(settings.store_path), StudyIndex(settings.index_path)
    writer = IngestWriter(index)
    writer.start()
    server = start_scp(settings, StorageSCP(settings, store, index, writer, ReceiverMetrics(None)))
    sockets = [_associated(settings.port) for _ in range(4)]
    try:
        assert len(server.active_associations) == 4
        # Each association's two threads, measured alone (the process also runs pytest and the
        # accept loop, which calls gc.collect() every 12 s).
        threads = [thread.native_id for assoc in server.active_associations for thread in (assoc, assoc.dul)]
        time.sleep(0.3)
        started = _thread_cpu_s(threads)
        time.sleep(1.0)
        used = _thread_cpu_s(threads) - started
        assert used < 0.03, f"{used:.3f} s of CPU in 1 s with four idle associations"
    finally:
        for sock in sockets:
            sock.close()
        server.shutdown()
        writer.stop()


def _reference_values(ds: pydicom.Dataset) -> dict[str, object]:
    """The header's attributes by pydicom's plain attribute access."""
    def text(keyword: str) -> str:
        value = ds.get(keyword)
        if value is None:
            return ""
        return "\\".join(str(v) for v in value) if isinstance(value, pydicom.multival.MultiValue) else str(value).strip()

    number = ds.get("SliceThickness")
    series = ds.get("SeriesNumber")
    return {
        "sop_class_uid": text("SOPClassUID"), "modality": text("Modality"), "body_part": text("BodyPartExamined"),
        "image_type": text("ImageType"), "series_description": text("SeriesDescription"),
        "study_description": text("StudyDescription"), "study_date": text("StudyDate"),
        "series_number": int(series) if series not in (None, "") else None,
        "rows": int(ds.Rows) if "Rows" in ds else None, "columns": int(ds.Columns) if "Columns" in ds else None,
        "slice_thickness": float(number) if number not in (None, "") else None,
        "key": (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                str(ds.get("SOPInstanceUID", ""))),
    }


def test_header_values_equal_pydicoms_own_attribute_access() -> None:
    """Every real file pydicom ships, character sets included: the header's one-pass conversion
    (node.headers.Attributes) gives what ``ds.get(keyword)`` gives."""
    compared = 0
    charset_files = sorted((PYDICOM_TEST_FILES.parent / "charset_files").glob("*.dcm"))
    for path in [*_real_files(), *charset_files]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            header = read_header(path.read_bytes(), UID_ROOT, MANUFACTURER)
            expected = _reference_values(ds)
        except (UnreadableDataset, pydicom.errors.InvalidDicomError, ValueError, TypeError, AttributeError):
            continue  # no valid header (InvalidUID is a ValueError): covered by the SCP tests
        got = {name: getattr(header, name) for name in expected if name != "key"}
        got["key"] = (header.key.study_uid, header.key.series_uid, header.key.sop_uid)
        assert got == expected, path.name
        compared += 1
    assert compared > 40
    charsets = {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).get("SpecificCharacterSet", ""))
                for p in charset_files}
    assert len(charsets) > 5  # pydicom's character set test files, names in many scripts
