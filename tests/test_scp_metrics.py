"""What the node's traffic leaves in /metrics and /healthz."""

from __future__ import annotations

import json
import os
import struct
import urllib.request
from collections.abc import Callable
from pathlib import Path

from conftest import PYDICOM_TEST_FILES, make_settings, wait_until
from test_scp_support import closed_by_peer, connect_from, echo, metric, scu, store_raw, write_raw_instance

from node.scp import CANNOT_UNDERSTAND, INVALID_UID, SUCCESS
from node.service import Node

CT = PYDICOM_TEST_FILES / "CT_small.dcm"


def test_metrics_and_health_after_mixed_traffic(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node(make_settings(tmp_path, node={
        "allow_loopback": False, "acse_timeout_s": 1.0, "network_timeout_s": 1.0, "quiet_period_s": 60,
        "allowed_peers": [{"ae_title": "MAIN_PACS", "hosts": ["127.0.0.1/32"]}],
    }))
    assert node.http_port is not None
    port = node.http_port

    # accepted: one echo, a new instance, the same again, a refused dataset
    assert echo(node.dicom_port, calling="MAIN_PACS") == SUCCESS
    assert store_raw(node.dicom_port, CT, calling="MAIN_PACS") == SUCCESS
    assert store_raw(node.dicom_port, CT, calling="MAIN_PACS") == SUCCESS
    junk = write_raw_instance(tmp_path / "junk.dcm", os.urandom(1000), sop_class="1.2.840.10008.5.1.4.1.1.2",
                              sop_uid="1.2.3.4")
    assert store_raw(node.dicom_port, junk, calling="MAIN_PACS") in (CANNOT_UNDERSTAND, INVALID_UID)
    # rejected: an unknown calling AE, a wrong called AE
    with scu(node.dicom_port, calling="INTRUDER") as assoc:
        assert assoc.is_rejected
    with scu(node.dicom_port, calling="MAIN_PACS", called="SOMEONE") as assoc:
        assert assoc.is_rejected
    # hostile: garbage and an absurd PDU header, both dropped
    for payload in (os.urandom(300), b"\x01\x00" + struct.pack(">I", 0xFFFFFFF0)):
        with connect_from("127.0.0.1", node.dicom_port, "127.0.0.2") as sock:
            sock.sendall(payload)
            assert closed_by_peer(sock, 5)

    assert metric(port, "pacsnode_association_rejects_total", reason="calling_ae_or_host") == 1
    assert metric(port, "pacsnode_association_rejects_total", reason="called_ae") == 1
    assert metric(port, "pacsnode_associations_total", result="rejected") == 2
    assert metric(port, "pacsnode_associations_total", result="accepted") == 4
    assert metric(port, "pacsnode_instances_received_total", outcome="new") == 1
    assert metric(port, "pacsnode_instances_received_total", outcome="duplicate") == 1
    assert metric(port, "pacsnode_instances_received_total", outcome="refused") == 1
    stored = [p for p in node.store.root.rglob("*.dcm") if ".quarantine" not in p.parts]
    assert metric(port, "pacsnode_bytes_received_total") == sum(p.stat().st_size for p in stored) > 0
    assert wait_until(lambda: metric(port, "pacsnode_active_associations") == 0, timeout=5), \
        f"active associations gauge ends at {metric(port, 'pacsnode_active_associations')}"

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        health = json.loads(response.read())
    assert health["ok"] is True and health["disk_free_ok"] is True
    assert health["studies"] == {"receiving": 1}
