"""Who may associate: loopback by default, otherwise only allow-listed (calling AE, host) pairs.

A peer outside 127.0.0.0/8 is simulated with ``allow_loopback: false``: then 127.0.0.1 is just
another host that needs an allow-list entry. 127.0.0.2 is a second "host" on the same machine.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PYDICOM_TEST_FILES, make_settings, wait_until
from pynetdicom.association import Association
from test_scp_support import NODE_AE, dcmtk, echo, metric, scu, store_raw

from node.scp import SUCCESS
from node.service import Node

# (result, source, diagnostic) of A-ASSOCIATE-RJ, PS3.8 9.3.4
CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)


def _reject_reason(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "association was not rejected"
    rj = assoc.acceptor.primitive
    assert rj is not None and rj.result is not None and rj.result_source is not None and rj.diagnostic is not None
    return rj.result, rj.result_source, rj.diagnostic


def _rejecting_node(start_node: Callable[..., Node], tmp_path: Path, hosts: list[str]) -> Node:
    return start_node(make_settings(tmp_path, node={
        "allow_loopback": False,
        "allowed_peers": [{"ae_title": "MAIN_PACS", "hosts": hosts}],
    }))


def test_calling_ae_not_on_the_allow_list_is_rejected_permanently(
    start_node: Callable[..., Node], tmp_path: Path,
) -> None:
    node = _rejecting_node(start_node, tmp_path, ["127.0.0.1"])
    with scu(node.dicom_port, calling="INTRUDER") as assoc:
        assert _reject_reason(assoc) == CALLING_AE_NOT_RECOGNISED
    result = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port))
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr and "Calling AE Title Not Recognized" in result.stderr
    assert "Rejected Permanent" in result.stderr and "Service User" in result.stderr
    assert store_raw(node.dicom_port, PYDICOM_TEST_FILES / "CT_small.dcm", calling="MAIN_PACS") == SUCCESS
    assert node.http_port is not None
    assert metric(node.http_port, "pacsnode_association_rejects_total", reason="calling_ae_or_host") == 2


def test_allow_listed_ae_from_an_allowed_host_passes(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = _rejecting_node(start_node, tmp_path, ["127.0.0.0/30"])
    assert echo(node.dicom_port, calling="MAIN_PACS") == SUCCESS
    result = dcmtk("echoscu", "-aet", "MAIN_PACS", "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port))
    assert result.returncode == 0, result.stderr
    result = dcmtk("storescu", "-aet", "MAIN_PACS", "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port),
                   str(PYDICOM_TEST_FILES / "MR_small.dcm"))
    assert result.returncode == 0, result.stderr
    assert echo(node.dicom_port, calling="MAIN_PACS", bind_host="127.0.0.2") == SUCCESS


def test_allow_listed_ae_from_another_host_is_rejected(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = _rejecting_node(start_node, tmp_path, ["127.0.0.2/32"])
    with scu(node.dicom_port, calling="MAIN_PACS", bind_host="127.0.0.1") as assoc:
        assert _reject_reason(assoc) == CALLING_AE_NOT_RECOGNISED
    assert echo(node.dicom_port, calling="MAIN_PACS", bind_host="127.0.0.2") == SUCCESS
    with scu(node.dicom_port, calling="OTHER", bind_host="127.0.0.2") as assoc:
        assert _reject_reason(assoc) == CALLING_AE_NOT_RECOGNISED


def test_loopback_needs_no_allow_list_entry_by_default(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node(make_settings(tmp_path))
    assert echo(node.dicom_port, calling="ANYONE") == SUCCESS
    assert echo(node.dicom_port, calling="ANYONE", bind_host="127.0.0.2") == SUCCESS


@pytest.mark.parametrize("called", ["WRONG_AE", "pacsnode", "PACSNODE2"])
def test_wrong_called_ae_title_is_rejected(start_node: Callable[..., Node], tmp_path: Path, called: str) -> None:
    node = start_node(make_settings(tmp_path))
    with scu(node.dicom_port, called=called) as assoc:
        assert _reject_reason(assoc) == CALLED_AE_NOT_RECOGNISED
    assert echo(node.dicom_port) == SUCCESS


def test_dcmtk_wrong_called_ae_title_is_rejected_and_counted(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node(make_settings(tmp_path))
    result = dcmtk("echoscu", "-aec", "NOT_THE_NODE", "127.0.0.1", str(node.dicom_port))
    assert result.returncode != 0 and "Called AE Title Not Recognized" in result.stderr
    assert node.http_port is not None
    assert metric(node.http_port, "pacsnode_association_rejects_total", reason="called_ae") == 1
    assert metric(node.http_port, "pacsnode_associations_total", result="rejected") == 1


def _dual_stack_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _dual_stack_available(), reason="no IPv6 on this host")
def test_ipv4_peers_of_a_dual_stack_listener_are_judged_by_their_ipv4_address(
    start_node: Callable[..., Node], tmp_path: Path,
) -> None:
    """Bound to "::", the node sees IPv4 peers as ::ffff:a.b.c.d; loopback and allow-list rules
    written for IPv4 must still apply to them."""
    node = start_node(make_settings(tmp_path, node={"host": "::"}))
    assert echo(node.dicom_port) == SUCCESS  # 127.0.0.1, loopback
    assert echo(node.dicom_port, host="::1") == SUCCESS
    strict = start_node(make_settings(tmp_path / "strict", node={
        "host": "::", "allow_loopback": False,
        "allowed_peers": [{"ae_title": "MAIN_PACS", "hosts": ["127.0.0.1/32"]}],
    }))
    assert echo(strict.dicom_port, calling="MAIN_PACS") == SUCCESS
    with scu(strict.dicom_port, calling="INTRUDER") as assoc:
        assert _reject_reason(assoc) == CALLING_AE_NOT_RECOGNISED


def test_association_limit_rejects_transiently_and_is_counted(
    start_node: Callable[..., Node], tmp_path: Path,
) -> None:
    node = start_node(make_settings(tmp_path, node={"max_associations": 1}))
    with scu(node.dicom_port) as first:
        assert first.is_established
        with scu(node.dicom_port) as second:
            assert _reject_reason(second) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
    assert wait_until(lambda: echo(node.dicom_port) == SUCCESS, timeout=5)
    assert node.http_port is not None
    assert metric(node.http_port, "pacsnode_association_rejects_total", reason="max_associations") >= 1
