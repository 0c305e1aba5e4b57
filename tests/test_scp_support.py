"""Helpers shared by the SCP network tests (``test_scp_*``); this module holds no tests.

Peers are real: DCMTK command-line tools run as separate processes, pynetdicom runs as an SCU
in this process, raw sockets play the hostile peers. Nothing is mocked.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import encode_file_meta

NODE_AE = "PACSNODE"
VERIFICATION = "1.2.840.10008.1.1"
# Nagle would add ~44 ms per instance to DCMTK's small PDUs; DCMTK reads this variable.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

# Explicit VR Little Endian VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def dcmtk(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool as an outside peer."""
    return subprocess.run(list(args), check=False, capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout)


def dataset_offset(data: bytes) -> int:
    """Offset of the dataset in a DICOM file: after preamble, ``DICM`` and the group 2 elements
    (0 for a file without meta). Parsed by hand so that the check does not trust pydicom."""
    if data[128:132] != b"DICM":
        return 0
    pos = 132
    while pos + 8 <= len(data):
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return pos


def dataset_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return data[dataset_offset(data):]


def transfer_syntax_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def write_raw_instance(path: Path, body: bytes, *, sop_class: str, sop_uid: str,
                       transfer_syntax: str = "1.2.840.10008.1.2.1") -> Path:
    """A DICOM file whose dataset part is ``body`` verbatim (junk allowed), for a raw send."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body)
    return path


def encode_dataset(ds: pydicom.Dataset, transfer_syntax: str = "1.2.840.10008.1.2.1") -> bytes:
    """The dataset part of ``ds`` encoded in ``transfer_syntax`` (uncompressed syntaxes only)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    ts = pydicom.uid.UID(transfer_syntax)
    fp.is_little_endian = ts.is_little_endian
    fp.is_implicit_VR = ts.is_implicit_VR
    write_dataset(fp, ds)
    return bytes(fp.getvalue())


@contextmanager
def scu(port: int, contexts: list[tuple[str, list[str]]] | None = None, *, calling: str = "TESTSCU",
        called: str = NODE_AE, host: str = "127.0.0.1", bind_host: str | None = None,
        tls_args: tuple[object, str] | None = None, timeout: float = 10) -> Iterator[Association]:
    """A pynetdicom association to the node (released on exit); the caller checks it is established."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    for sop_class, syntaxes in contexts or [(VERIFICATION, ["1.2.840.10008.1.2"])]:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(host, port, ae_title=called,
                         bind_address=(bind_host, 0) if bind_host else None,
                         tls_args=tls_args)  # type: ignore[arg-type]
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def context_for(path: Path) -> tuple[str, list[str]]:
    """The presentation context that carries a file exactly as it is: its SOP class, its syntax."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)]


_chunked_lock = threading.Lock()
_chunked_senders = 0
_chunked_before = False


@contextmanager
def _chunked_sends() -> Iterator[None]:
    """pynetdicom's process-wide switch to send a file's dataset bytes as they are, on while any
    thread sends raw (several may, concurrently) and restored after the last one."""
    global _chunked_senders, _chunked_before
    with _chunked_lock:
        if _chunked_senders == 0:
            _chunked_before = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
        _chunked_senders += 1
    try:
        yield
    finally:
        with _chunked_lock:
            _chunked_senders -= 1
            if _chunked_senders == 0:
                _config.STORE_SEND_CHUNKED_DATASET = _chunked_before


def send_raw(assoc: Association, path: Path) -> int:
    """C-STORE the dataset bytes of ``path`` verbatim (no decode/re-encode); returns the status,
    or -1 when no response came."""
    with _chunked_sends():
        status = assoc.send_c_store(path)
    return int(status.Status) if "Status" in status else -1


def store_raw(port: int, path: Path, **kwargs: object) -> int:
    """One association, one verbatim C-STORE of ``path``; returns the status."""
    with scu(port, [context_for(path)], **kwargs) as assoc:  # type: ignore[arg-type]
        assert assoc.is_established, "association to the node was not established"
        return send_raw(assoc, path)


def echo(port: int, **kwargs: object) -> int:
    """One association, one C-ECHO; returns the status (-1: no association or no answer)."""
    with scu(port, **kwargs) as assoc:  # type: ignore[arg-type]
        if not assoc.is_established:
            return -1
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1


def timed_echo(port: int, **kwargs: object) -> tuple[int, float]:
    started = time.monotonic()
    status = echo(port, **kwargs)
    return status, time.monotonic() - started


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def stored_instances(store_root: Path) -> set[Path]:
    """``.dcm`` files in the store proper (not in ``.incoming`` or ``.quarantine``)."""
    return {p for p in store_root.rglob("*.dcm") if not p.relative_to(store_root).parts[0].startswith(".")}


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the other end closes (EOF or reset) within ``within`` seconds; data is drained."""
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def still_open(sockets: list[socket.socket], after: float) -> list[socket.socket]:
    """The sockets the node has not closed ``after`` seconds from now (checked all at once, so
    the answer is about that moment, not about a slow sequence of waits)."""
    time.sleep(after)
    return [sock for sock in sockets if not closed_by_peer(sock, 0.01)]


def connect_from(host: str, port: int, source: str = "127.0.0.1") -> socket.socket:
    """A raw TCP connection to the node from ``source`` (another loopback address is another host)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect((host, port))
    return sock


def metric(port: int, name: str, **labels: str) -> float:
    """A sample's value from the node's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name and ",".join(sorted((match.group(2) or "").split(","))) == wanted:
            return float(match.group(3))
    return 0.0


def associate_rq_pdu(called: str = "PACSNODE", calling: str = "RAWPEER") -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU proposing Verification, built with pynetdicom's encoder."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())
