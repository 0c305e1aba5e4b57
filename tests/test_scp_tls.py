"""DICOM over TLS: DCMTK stores with a client certificate; plain, certificate-less and stalled
peers are refused without harming the node or delaying good TLS peers.

Certificates (a CA, the node's, a client's and a stranger's from another CA) are made with the
openssl command line for each test session.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from conftest import PYDICOM_TEST_FILES, make_settings
from test_scp_support import (
    NODE_AE,
    closed_by_peer,
    connect_from,
    dataset_bytes,
    dcmtk,
    echo,
    metric,
    still_open,
    transfer_syntax_of,
)

from node.scp import SUCCESS
from node.service import Node

TIMEOUT_S = 2.0
PER_HOST = 3
CT = PYDICOM_TEST_FILES / "CT_small.dcm"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN=pacsnode test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


def _leaf(folder: Path, name: str, ca: str, usage: str) -> None:
    (folder / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "rogue-ca")
    _leaf(folder, "node", "ca", "serverAuth")
    _leaf(folder, "client", "ca", "clientAuth")
    _leaf(folder, "stranger", "rogue-ca", "clientAuth")
    return folder


def _tls_node(start_node: Callable[..., Node], tmp_path: Path, pki: Path, require_client_cert: bool) -> Node:
    return start_node(make_settings(tmp_path, node={
        "acse_timeout_s": TIMEOUT_S, "network_timeout_s": TIMEOUT_S, "max_associations_per_host": PER_HOST,
        "tls": {"enabled": True, "cert_file": pki / "node.crt", "key_file": pki / "node.key",
                "ca_file": pki / "ca.crt", "require_client_cert": require_client_cert},
    }))


def _client_context(pki: Path, cert: str | None = "client") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if cert:
        context.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return context


def _tls_echo(node: Node, pki: Path, cert: str | None = "client", **kwargs: object) -> int:
    return echo(node.dicom_port, tls_args=(_client_context(pki, cert), "127.0.0.1"), **kwargs)


def _dcmtk_tls(pki: Path, cert: str | None = "client") -> list[str]:
    identity = ["+tls", str(pki / f"{cert}.key"), str(pki / f"{cert}.crt"), "-pw"] if cert else ["+tla"]
    return [*identity, "+cf", str(pki / "ca.crt")]


def test_dcmtk_storescu_over_tls_with_a_client_certificate(
    start_node: Callable[..., Node], tmp_path: Path, pki: Path,
) -> None:
    node = _tls_node(start_node, tmp_path, pki, require_client_cert=True)
    result = dcmtk("echoscu", *_dcmtk_tls(pki), "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port))
    assert result.returncode == 0, result.stderr
    result = dcmtk("storescu", *_dcmtk_tls(pki), "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port), str(CT))
    assert result.returncode == 0, result.stderr
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    stored = node.store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert stored.is_file() and transfer_syntax_of(stored) == transfer_syntax_of(CT)
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(CT).PixelData
    assert len(dataset_bytes(stored)) > 30000
    assert _tls_echo(node, pki) == SUCCESS  # pynetdicom over TLS too


def test_plain_connection_to_the_tls_port_fails_without_harming_the_node(
    start_node: Callable[..., Node], tmp_path: Path, pki: Path,
) -> None:
    node = _tls_node(start_node, tmp_path, pki, require_client_cert=False)
    result = dcmtk("echoscu", "-to", "5", "-ta", "5", "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port), timeout=30)
    assert result.returncode != 0, "a plain association succeeded on the TLS port"
    assert echo(node.dicom_port, timeout=5) == -1  # pynetdicom without TLS: no association
    assert _tls_echo(node, pki) == SUCCESS
    assert _tls_echo(node, pki, cert=None) == SUCCESS  # no client certificate needed here
    result = dcmtk("storescu", *_dcmtk_tls(pki), "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port), str(CT))
    assert result.returncode == 0, result.stderr


def test_client_without_a_trusted_certificate_is_refused(
    start_node: Callable[..., Node], tmp_path: Path, pki: Path,
) -> None:
    node = _tls_node(start_node, tmp_path, pki, require_client_cert=True)
    anonymous = dcmtk("echoscu", *_dcmtk_tls(pki, cert=None), "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port))
    assert anonymous.returncode != 0, "a client without a certificate associated"
    stranger = dcmtk("echoscu", *_dcmtk_tls(pki, cert="stranger"), "-aec", NODE_AE, "127.0.0.1",
                     str(node.dicom_port))
    assert stranger.returncode != 0, "a client with a certificate of another CA associated"
    assert _tls_echo(node, pki, cert=None) == -1
    assert _tls_echo(node, pki, cert="stranger") == -1
    assert _tls_echo(node, pki) == SUCCESS
    assert dcmtk("echoscu", *_dcmtk_tls(pki), "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port)).returncode == 0
    assert node.http_port is not None  # the four refused handshakes are counted
    assert metric(node.http_port, "pacsnode_association_rejects_total", reason="tls_handshake") == 4


def test_stalled_tls_handshakes_do_not_block_a_good_tls_peer(
    start_node: Callable[..., Node], tmp_path: Path, pki: Path,
) -> None:
    node = _tls_node(start_node, tmp_path, pki, require_client_cert=True)
    stalled = [connect_from("127.0.0.1", node.dicom_port, f"127.0.0.{index}") for index in (2, 3, 4)]
    stalled[1].sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
    try:
        started = time.monotonic()
        assert _tls_echo(node, pki) == SUCCESS
        assert time.monotonic() - started < 2.0, "a good TLS peer waited behind stalled handshakes"
        result = dcmtk("echoscu", *_dcmtk_tls(pki), "-aec", NODE_AE, "127.0.0.1", str(node.dicom_port))
        assert result.returncode == 0, result.stderr
        for sock in stalled:
            assert closed_by_peer(sock, TIMEOUT_S + 3), "a stalled handshake was never cut off"
    finally:
        for sock in stalled:
            sock.close()
    assert _tls_echo(node, pki) == SUCCESS


def test_stalled_tls_handshakes_count_against_the_per_host_limit(
    start_node: Callable[..., Node], tmp_path: Path, pki: Path,
) -> None:
    """A host cannot hold more than its share of slots with connections that never finish TLS."""
    node = _tls_node(start_node, tmp_path, pki, require_client_cert=True)
    held = [connect_from("127.0.0.1", node.dicom_port, "127.0.0.2") for _ in range(PER_HOST * 4)]
    try:
        open_ones = still_open(held, after=0.5)  # well within the 2 s handshake timeout
        assert len(open_ones) == PER_HOST, f"{len(open_ones)} stalled handshakes held, the cap is {PER_HOST}"
        assert _tls_echo(node, pki) == SUCCESS  # another host is served meanwhile
    finally:
        for sock in held:
            sock.close()
