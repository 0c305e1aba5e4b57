"""Hostile and broken peers on the wire: none of them blocks a good peer or stops the node.

Short timeouts (2 s) keep the tests quick; every held connection must be closed by the node
within them. 127.0.0.2 plays the other host that opens the bad connections, so the per-host
connection cap can be told apart from 127.0.0.1, the good peer.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import PYDICOM_TEST_FILES, make_settings, wait_until
from test_scp_support import (
    associate_rq_pdu,
    closed_by_peer,
    connect_from,
    echo,
    metric,
    scu,
    send_raw,
    still_open,
    store_raw,
    timed_echo,
)

from node.scp import SUCCESS
from node.service import Node

TIMEOUT_S = 2.0
PER_HOST = 3
PROMPT_S = 2.0  # a good peer's C-ECHO, association included, must be answered this quickly
CLOSE_WITHIN_S = TIMEOUT_S + 3.0  # a bad connection must be closed by the node within this
BAD_HOST = "127.0.0.2"


@pytest.fixture
def node(start_node: Callable[..., Node], tmp_path: Path) -> Node:
    return start_node(make_settings(tmp_path, node={
        "acse_timeout_s": TIMEOUT_S, "network_timeout_s": TIMEOUT_S, "dimse_timeout_s": TIMEOUT_S,
        "max_associations_per_host": PER_HOST, "max_associations": 20,
    }))


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def _good_peer_is_served_promptly(node: Node) -> None:
    status, took = timed_echo(node.dicom_port)
    assert status == SUCCESS, "a good peer's C-ECHO failed"
    assert took < PROMPT_S, f"a good peer's C-ECHO took {took:.2f} s"


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: pacsnode\r\n\r\n",
    os.urandom(4096),
    b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16,  # an A-ASSOCIATE-RQ of 16 junk bytes
    b"\x04\x00\x00\x00\x00\x06" + b"\x00" * 6,  # P-DATA before any association
])
def test_garbage_is_dropped_and_a_good_peer_is_served(
    node: Node, sockets: list[socket.socket], garbage: bytes,
) -> None:
    sock = connect_from("127.0.0.1", node.dicom_port, BAD_HOST)
    sockets.append(sock)
    sock.sendall(garbage)
    _good_peer_is_served_promptly(node)
    assert closed_by_peer(sock, CLOSE_WITHIN_S), "the node kept a connection that sent garbage"
    _good_peer_is_served_promptly(node)


def test_absurd_pdu_length_then_silence_is_cut_off(node: Node, sockets: list[socket.socket]) -> None:
    sock = connect_from("127.0.0.1", node.dicom_port, BAD_HOST)
    sockets.append(sock)
    sock.sendall(b"\x01\x00" + struct.pack(">I", 0xFFFFFFF0))
    _good_peer_is_served_promptly(node)
    assert closed_by_peer(sock, CLOSE_WITHIN_S), "a PDU header with an absurd length held its connection"
    _good_peer_is_served_promptly(node)


def test_pdu_stalled_halfway_is_cut_off(node: Node, sockets: list[socket.socket]) -> None:
    pdu = associate_rq_pdu()
    sock = connect_from("127.0.0.1", node.dicom_port, BAD_HOST)
    sockets.append(sock)
    sock.sendall(pdu[: len(pdu) // 2])
    _good_peer_is_served_promptly(node)
    assert closed_by_peer(sock, CLOSE_WITHIN_S), "a half-sent PDU held its connection"


def test_pdu_header_stalled_halfway_is_cut_off(node: Node, sockets: list[socket.socket]) -> None:
    sock = connect_from("127.0.0.1", node.dicom_port, BAD_HOST)
    sockets.append(sock)
    sock.sendall(b"\x01\x00\x00")  # three of the six header bytes
    _good_peer_is_served_promptly(node)
    assert closed_by_peer(sock, CLOSE_WITHIN_S), "a half-sent PDU header held its connection"


def test_a_raw_association_request_is_answered(node: Node, sockets: list[socket.socket]) -> None:
    """Sanity check of the raw PDU used above: sent whole, the node accepts it (A-ASSOCIATE-AC)."""
    sock = connect_from("127.0.0.1", node.dicom_port)
    sockets.append(sock)
    sock.sendall(associate_rq_pdu())
    assert sock.recv(1) == b"\x02"


def test_silent_connections_are_closed_after_the_acse_timeout(node: Node, sockets: list[socket.socket]) -> None:
    opened = time.monotonic()
    for _ in range(PER_HOST):
        sockets.append(connect_from("127.0.0.1", node.dicom_port, BAD_HOST))
    _good_peer_is_served_promptly(node)
    for sock in sockets:
        assert closed_by_peer(sock, CLOSE_WITHIN_S), "a silent connection was kept open"
    assert time.monotonic() - opened >= TIMEOUT_S * 0.8, "closed before the ACSE timeout: too eager"


def test_association_stalled_mid_pdu_is_aborted(node: Node) -> None:
    """An established association whose peer stops halfway through a P-DATA PDU is dropped."""
    with scu(node.dicom_port) as assoc:
        assert assoc.is_established
        assert assoc.dul.socket is not None
        raw = assoc.dul.socket.socket
        assert raw is not None
        raw.sendall(b"\x04\x00" + struct.pack(">I", 5000) + b"\x00" * 100)
        _good_peer_is_served_promptly(node)
        assert wait_until(lambda: not assoc.is_established, timeout=CLOSE_WITHIN_S), \
            "the node kept an association whose PDU stalled"
    _good_peer_is_served_promptly(node)


def test_c_store_command_without_its_dataset_is_timed_out(node: Node) -> None:
    """A peer sends a C-STORE command announcing a dataset, then nothing: the node drops the
    association after its timeout instead of holding the slot forever."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    ct_class = "1.2.840.10008.5.1.4.1.1.2"
    with scu(node.dicom_port, [(ct_class, ["1.2.840.10008.1.2.1"])]) as assoc:
        assert assoc.is_established
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = ct_class
        request.AffectedSOPInstanceUID = "1.2.3.4"
        request.Priority = 2
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        message.command_set.CommandDataSetType = 0x0001  # "a dataset follows": it never does
        (context,) = assoc.accepted_contexts
        assert context.context_id is not None
        sent = time.monotonic()
        for pdu in message.encode_msg(context.context_id, assoc.acceptor.maximum_length or 16382):
            assoc.dul.send_pdu(pdu)
        _good_peer_is_served_promptly(node)
        assert wait_until(lambda: not assoc.is_established, timeout=CLOSE_WITHIN_S + TIMEOUT_S), \
            "the node waited forever for a dataset"
        took = time.monotonic() - sent
    assert TIMEOUT_S * 0.8 <= took <= CLOSE_WITHIN_S + TIMEOUT_S, f"dropped after {took:.2f} s"
    assert store_raw(node.dicom_port, PYDICOM_TEST_FILES / "CT_small.dcm") == SUCCESS


def test_per_host_limit_closes_the_next_connection_at_once(node: Node, sockets: list[socket.socket]) -> None:
    for _ in range(PER_HOST):
        sockets.append(connect_from("127.0.0.1", node.dicom_port, BAD_HOST))
    time.sleep(0.3)  # let the node start their threads
    extra = connect_from("127.0.0.1", node.dicom_port, BAD_HOST)
    sockets.append(extra)
    assert closed_by_peer(extra, 0.5), "the connection over the per-host limit was not closed at once"
    assert still_open(sockets[:PER_HOST], after=0) == sockets[:PER_HOST], "a connection within the limit was closed"
    _good_peer_is_served_promptly(node)  # another host is not affected


def test_per_host_limit_holds_for_a_burst_of_connections(node: Node, sockets: list[socket.socket]) -> None:
    """Connections opened faster than the node starts their threads still count against the cap."""
    for _ in range(PER_HOST * 4):
        sockets.append(connect_from("127.0.0.1", node.dicom_port, BAD_HOST))
    open_ones = still_open(sockets, after=0.5)  # well within the 2 s ACSE timeout
    assert len(open_ones) == PER_HOST, f"{len(open_ones)} connections from one host held, the cap is {PER_HOST}"
    _good_peer_is_served_promptly(node)


def test_many_hostile_peers_at_once_do_not_stop_the_node(node: Node, sockets: list[socket.socket]) -> None:
    # Five more "hosts", each at its cap, each misbehaving differently: 15 connections, and the
    # good ones below still fit in max_associations (20).
    for index in range(2, 7):
        host = f"127.0.0.{index}"
        for payload in (b"", b"\x01\x00\xff\xff\xff\xf0", os.urandom(64)):
            sock = connect_from("127.0.0.1", node.dicom_port, host)
            sockets.append(sock)
            if payload:
                sock.sendall(payload)
    errors: list[BaseException] = []

    def good() -> None:
        try:
            _good_peer_is_served_promptly(node)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=good) for _ in range(PER_HOST)]  # 127.0.0.1 has its cap too
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors, errors
    for sock in sockets:
        assert closed_by_peer(sock, CLOSE_WITHIN_S)
    assert store_raw(node.dicom_port, PYDICOM_TEST_FILES / "CT_small.dcm") == SUCCESS
    assert echo(node.dicom_port) == SUCCESS
    http_port = node.http_port
    assert http_port is not None
    assert wait_until(lambda: metric(http_port, "pacsnode_active_associations") == 0, timeout=5), \
        "the active associations gauge did not come back to 0"


def test_send_raw_helper_round_trip(node: Node) -> None:
    """The raw sender used by these tests stores a file (guards the helpers against false passes)."""
    source = PYDICOM_TEST_FILES / "MR_small.dcm"
    with scu(node.dicom_port, [("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])]) as assoc:
        assert send_raw(assoc, source) == SUCCESS


def test_dead_connections_free_their_slots_at_once(start_node: Callable[..., Node], tmp_path: Path,
                                                   sockets: list[socket.socket]) -> None:
    """70 garbage or instantly closed connections from the PACS's own host, then within 1 s a
    C-ECHO and a C-STORE from that host succeed: only live connections hold slots. The node runs
    on the shipped limits and timeouts (16 per host, ACSE 10 s), so no short timeout can pass this.

    30 send bytes that are no PDU (an HTTP request, a TLS ClientHello on the plain port), half of
    them left open by the peer; 20 send half an A-ASSOCIATE-RQ and close (pynetdicom's state
    machine sees these); 20 close at once with nothing sent."""
    node = start_node(make_settings(tmp_path))
    half_request = associate_rq_pdu()[:40]
    for index in range(70):
        sock = connect_from("127.0.0.1", node.dicom_port)
        try:
            if index % 7 < 3:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: pacsnode\r\n\r\n" if index % 2
                             else b"\x16\x03\x01\x01\xfc" + os.urandom(508))
                if index % 2:
                    sockets.append(sock)
                    continue
            elif index % 7 < 5:
                sock.sendall(half_request)
        except OSError:
            pass  # closed by the node already: over the per-host limit while others were winding down
        sock.close()
    started = time.monotonic()
    assert echo(node.dicom_port) == SUCCESS, "a C-ECHO from the same host was refused"
    assert store_raw(node.dicom_port, PYDICOM_TEST_FILES / "CT_small.dcm") == SUCCESS
    took = time.monotonic() - started
    assert took < 1.0, f"the good association waited {took:.2f} s for slots held by dead connections"
    held = [sock for sock in sockets if not closed_by_peer(sock, 1.0)]
    assert not held, f"{len(held)} garbage connections were kept open"
