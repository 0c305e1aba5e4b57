"""The ingest path's cuts to pynetdicom (``node.acceptor``), its file meta template
(``node.file_meta``) and its header read (``read_received_header``), each checked against what
pynetdicom and pydicom themselves produce, and the pynetdicom code the overrides rely on pinned
by a digest, so that an upgrade fails here rather than silently in production."""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import PYDICOM_TEST_FILES, make_settings
from pydicom.uid import UID
from pynetdicom import AE, _config, association, dimse, dimse_messages, dul, evt, pdu, transport
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA
from test_scp_support import associate_rq_pdu, dataset_offset

from node.acceptor import Doorbell, IngestAssociation, WaitingSocket
from node.command_set import decode_store_request, store_response_command
from node.file_meta import PREAMBLE, part10_prefix
from node.headers import ConvertedValues, UnreadableDataset, read_header, read_received_header

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
    "dimse_messages.DIMSEMessage.decode_msg": "f51c777e841a",
    "dul.DULServiceProvider._decode_pdu": "fc71dd1bf853",
    "dul.DULServiceProvider._read_pdu_data": "19f2d4e38c13",
    "pdu.PDU.decode": "07098f2d8a4d",
    "pdu.P_DATA_TF._decoders": "c8efd2186829",
    "pdu.P_DATA_TF._generate_items": "55a5deea4774",
    "pdu.P_DATA_TF._wrap_generate_items": "b2ab7ad6fe47",
    "dimse_messages.DIMSEMessage.message_to_primitive": "f8f43d34e434",
}
MODULES = {"transport": transport, "dul": dul, "association": association, "dimse": dimse,
           "dimse_messages": dimse_messages, "pdu": pdu}
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


def _store_request(sop_uid: str = "1.2.3.45", priority: int = 2, message_id: int = 7,
                   move: tuple[str, int] | None = None, data: bytes = b"\x08\x00\x16\x00") -> C_STORE:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = sop_uid
    request.Priority = priority
    if move is not None:
        request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = move
    request.DataSet = BytesIO(data)
    return request


def _p_datas(primitive: Any, max_pdu: int = 1_048_576) -> list[P_DATA]:
    """The P-DATA primitives pynetdicom sends for ``primitive``."""
    message = C_ECHO_RQ() if isinstance(primitive, C_ECHO) else C_STORE_RQ()
    message.primitive_to_message(primitive)
    return list(message.encode_msg(1, max_pdu))


def _as_pynetdicom_reads(p_datas: list[P_DATA]) -> Any:
    """The primitive pynetdicom's own DIMSEMessage decodes from ``p_datas``."""
    message = DIMSEMessage()
    assert [message.decode_msg(p_data) for p_data in p_datas][-1]
    return message.message_to_primitive()


def _indication_fields(primitive: Any) -> tuple[object, ...]:
    return (type(primitive), primitive.MessageID, primitive.Priority, primitive.AffectedSOPClassUID,
            primitive.AffectedSOPInstanceUID, primitive.MoveOriginatorApplicationEntityTitle,
            primitive.MoveOriginatorMessageID, primitive.DataSet.getvalue())


@pytest.mark.parametrize("sop_uid", ["9", "1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498.12345678901234567890123"])
@pytest.mark.parametrize(("priority", "message_id", "move"), [
    (0, 1, None), (1, 65535, None), (2, 7, ("MOVESCU", 3)), (2, 8, ("A", 65535)), (0, 9, ("SIXTEEN_CHARS_AE", 1)),
])
def test_store_request_is_read_as_pynetdicom_reads_it(sop_uid: str, priority: int, message_id: int,
                                                      move: tuple[str, int] | None) -> None:
    p_datas = _p_datas(_store_request(sop_uid, priority, message_id, move))
    command = p_datas[0].presentation_data_value_list[0][1]
    decoded = decode_store_request(command[1:])
    assert decoded is not None
    ours = decoded.primitive(BytesIO(p_datas[-1].presentation_data_value_list[-1][1][1:]))
    assert _indication_fields(ours) == _indication_fields(_as_pynetdicom_reads(p_datas))


def _command(*elements: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


PLAIN = ((0x0002, b"1.2.840.10008.5.1.4.1.1.2\0"), (0x0100, b"\x01\x00"), (0x0110, b"\x07\x00"),
         (0x0700, b"\x02\x00"), (0x0800, b"\x01\x02"), (0x1000, b"1.2.3.45"))


@pytest.mark.parametrize(("case", "elements"), [
    ("the plain request itself", PLAIN),
    ("C-ECHO-RQ", (PLAIN[0], (0x0100, b"\x30\x00"), PLAIN[2], (0x0800, b"\x01\x01"))),
    ("no data set", (*PLAIN[:4], (0x0800, b"\x01\x01"), PLAIN[5])),
    ("an element a C-STORE-RQ has not", (*PLAIN, (0x0120, b"\x01\x00"))),
    ("a required element missing", PLAIN[1:]),
    ("two SOP Instance UIDs", (*PLAIN[:5], (0x1000, b"1.2.3\\1.2.4\0"))),
    ("a US of four bytes", (*PLAIN[:2], (0x0110, b"\x07\x00\x08\x00"), *PLAIN[3:])),
    ("an element twice", (*PLAIN, PLAIN[5])),
])
def test_anything_but_a_plain_store_request_is_left_to_pynetdicom(case: str, elements: tuple[tuple[int, bytes], ...]) -> None:
    decoded = decode_store_request(_command(*elements))
    assert (decoded is not None) is (case == "the plain request itself"), case


@pytest.mark.parametrize("cut", [1, 7, 12, 20])
def test_a_truncated_command_set_is_left_to_pynetdicom(cut: int) -> None:
    assert decode_store_request(_command(*PLAIN)[:-cut]) is None


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages pynetdicom's own ``receive_primitive`` was handed (by their first PDV's
    control header), with pynetdicom's standard log handlers off as the node has them: they bind
    ``EVT_DIMSE_RECV``, which sends every message through pynetdicom."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    handed: list[str] = []
    original = dimse.DIMSEServiceProvider.receive_primitive

    def counting(self: Any, primitive: P_DATA) -> None:
        handed.append("command" if primitive.presentation_data_value_list[0][1][0] & 1 else "data")
        original(self, primitive)

    monkeypatch.setattr(dimse.DIMSEServiceProvider, "receive_primitive", counting)
    return handed


def _dimse() -> Any:
    return IngestAssociation(AE(), MODE_ACCEPTOR).dimse


def _received(dimse: Any) -> list[Any]:
    taken = []
    while not dimse.msg_queue.empty():
        taken.append(dimse.msg_queue.get_nowait()[1])
    return taken


@pytest.mark.parametrize("max_pdu", [0, 16_384, 4_096])
def test_the_acceptor_reads_store_requests_in_any_fragmentation_as_pynetdicom(max_pdu: int, upstream: list[str]) -> None:
    data = os.urandom(100_001)
    requests = [_store_request(f"1.2.3.{n}", message_id=n, data=data) for n in (1, 2)]
    expected = [_as_pynetdicom_reads(_p_datas(request, max_pdu)) for request in requests]
    dimse = _dimse()
    for request in requests:
        for p_data in _p_datas(request, max_pdu):
            dimse.receive_primitive(p_data)
    assert upstream == []
    assert [_indication_fields(p) for p in _received(dimse)] == [_indication_fields(p) for p in expected]


def test_messages_sharing_one_p_data_are_all_read(upstream: list[str]) -> None:
    """A P-DATA may carry the end of one message and the start of the next; pynetdicom reads
    only the first."""
    first, second = _p_datas(_store_request("1.2.3.1", message_id=1)), _p_datas(_store_request("1.2.3.2", message_id=2))
    joined = P_DATA()
    joined.presentation_data_value_list.extend(item for p in first + second for item in p.presentation_data_value_list)
    dimse = _dimse()
    dimse.receive_primitive(joined)
    assert [p.AffectedSOPInstanceUID for p in _received(dimse)] == ["1.2.3.1", "1.2.3.2"]


def test_other_messages_and_bound_dimse_handlers_still_go_through_pynetdicom(upstream: list[str]) -> None:
    echo = C_ECHO()
    echo.MessageID = 5
    dimse = _dimse()
    for p_data in _p_datas(echo) + _p_datas(_store_request()):
        dimse.receive_primitive(p_data)
    received = _received(dimse)
    assert [type(p) for p in received] == [C_ECHO, C_STORE] and received[0].MessageID == 5
    assert upstream == ["command"]
    dimse.assoc.bind(evt.EVT_DIMSE_RECV, lambda event: None)
    for p_data in _p_datas(_store_request()):
        dimse.receive_primitive(p_data)
    assert upstream == ["command", "command", "data"]
    assert [type(p) for p in _received(dimse)] == [C_STORE]


def _p_data_tf_bytes(*pdvs: tuple[int, bytes]) -> bytearray:
    items = b"".join(struct.pack(">IB", len(value) + 1, context_id) + value for context_id, value in pdvs)
    return bytearray(struct.pack(">BBI", 0x04, 0, len(items)) + items)


def test_p_data_tf_is_decoded_over_the_received_bytes_as_pynetdicom_decodes_it(upstream: list[str]) -> None:
    received = _p_data_tf_bytes((1, b"\x03" + b"c" * 91), (3, b"\x02" + os.urandom(70_001)), (5, b"\x00"))
    dul_ = IngestAssociation(AE(), MODE_ACCEPTOR).dul
    ours, event = dul_._decode_pdu(received)
    theirs, their_event = dul.DULServiceProvider._decode_pdu(dul_, received)
    values = [(item.presentation_context_id, item.presentation_data_value) for item in ours.presentation_data_value_items]
    assert event == their_event == "Evt10"
    assert [(c, bytes(v)) for c, v in values] == [
        (item.presentation_context_id, item.presentation_data_value) for item in theirs.presentation_data_value_items]
    assert all(isinstance(v, memoryview) and v.obj is received for _, v in values)  # views, no copies
    with pytest.raises(AssertionError):  # a PDV longer than its PDU: as pynetdicom refuses it (-> Evt19)
        dul_._decode_pdu(received[:-1])


def test_other_pdus_and_bound_pdu_handlers_are_decoded_by_pynetdicom(upstream: list[str]) -> None:
    dul_ = IngestAssociation(AE(), MODE_ACCEPTOR).dul
    release, event = dul_._decode_pdu(bytearray(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"))
    assert (type(release).__name__, event) == ("A_RELEASE_RQ", "Evt12")
    dul_.assoc.bind(evt.EVT_PDU_RECV, lambda event: None)
    p_data, _ = dul_._decode_pdu(_p_data_tf_bytes((1, b"\x03abc")))
    assert type(p_data.presentation_data_value_items[0].presentation_data_value) is bytes


def test_a_command_amid_a_data_set_aborts_the_association(upstream: list[str]) -> None:
    """pynetdicom's answer to a DIMSE message it cannot read: Evt19, an A-ABORT."""
    p_datas = _p_datas(_store_request(data=os.urandom(20_000)), 4_096)
    dimse = _dimse()
    dimse.receive_primitive(p_datas[0])
    dimse.receive_primitive(_p_datas(_store_request())[0])  # a new command before the data set ended
    assert dimse.dul.event_queue.get_nowait() == "Evt19"
    assert _received(dimse) == [] and upstream == []


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


def _charset_files() -> list[Path]:
    """pydicom's character set test files: names in many scripts."""
    return sorted((PYDICOM_TEST_FILES.parent / "charset_files").glob("*.dcm"))


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
            got: object = read_received_header(data[:offset], data[offset:], syntax, UID_ROOT, MANUFACTURER)
        except (UnreadableDataset, ValueError) as exc:
            got = type(exc)
        assert got == expected, path.name
        compared += 1
    assert compared > 50
    syntaxes = {_split(p)[2] for p in _real_files() if _split(p) is not None}  # type: ignore[index]
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"} <= syntaxes


def test_values_kept_between_headers_change_no_header() -> None:
    """One ConvertedValues over every real file and character set file, twice over: each header is
    the one read without it (a value kept under one character set is not used under another)."""
    files = [p for p in _real_files() + _charset_files() if _split(p) is not None]
    values = ConvertedValues(limit=64)  # small: forgetting happens too
    compared = 0
    for _ in range(2):
        for path in files:
            data, offset, syntax = _split(path)  # type: ignore[misc]
            try:
                expected: object = read_received_header(data[:offset], data[offset:], syntax, UID_ROOT, MANUFACTURER)
            except (UnreadableDataset, ValueError) as exc:
                expected = type(exc)
            try:
                got: object = read_received_header(data[:offset], data[offset:], syntax, UID_ROOT, MANUFACTURER, values)
            except (UnreadableDataset, ValueError) as exc:
                got = type(exc)
            assert got == expected, path.name
            compared += 1
    assert compared > 100


def test_the_same_bytes_under_another_character_set_are_read_anew() -> None:
    values = ConvertedValues()
    descriptions = []
    for charset in ("ISO_IR 144", "ISO_IR 100"):  # Cyrillic, Latin-1: b"\xe0\xe1" is "рс", then "àá"
        ds = pydicom.Dataset()
        ds.SpecificCharacterSet = charset
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4", "1.2.3.4.5"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.add_new(0x0008103E, "LO", b"\xe0\xe1")  # SeriesDescription, as its bytes
        encoded = BytesIO()
        pydicom.dcmwrite(encoded, ds, implicit_vr=True, little_endian=True)
        header = read_received_header(b"", encoded.getvalue(), "1.2.840.10008.1.2", UID_ROOT, MANUFACTURER, values)
        descriptions.append(header.series_description)
    assert descriptions == ["рс", "àá"]


def test_a_data_set_that_does_not_parse_is_unreadable() -> None:
    data = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
    offset = dataset_offset(data)
    broken = data[:offset] + b"\x08\x00\x05\x00CS\xff\xff" + data[offset + 8:offset + 40]
    with pytest.raises(UnreadableDataset):
        read_received_header(broken[:offset], broken[offset:], "1.2.840.10008.1.2.1", UID_ROOT, MANUFACTURER)
    with pytest.raises(UnreadableDataset):
        read_received_header(data[:offset], b"not deflate", "1.2.840.10008.1.2.1.99", UID_ROOT, MANUFACTURER)


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
    charset_files = _charset_files()
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
