"""The DICOM front door: C-ECHO, C-STORE (every storage class, every transfer syntax) and MPPS.

Handlers are bound to pynetdicom events and answer DICOM status codes. A C-STORE is answered
success only after the instance's file is fsynced, renamed into the store, its folders fsynced
and its index row committed (``node.ingest``). Anything that cannot be made durable is answered
with an out-of-resources status; anything that cannot be understood with a failure status and
is kept in quarantine. Nothing a peer sends can stop the server.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE, N_CREATE, N_SET
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import time
    ModalityPerformedProcedureStep,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from config.settings import NodeSettings
from node.acceptor import IngestRequestHandler
from node.association_slots import AssociationSlots
from node.file_meta import ReceivedFile, part10_prefix
from node.headers import (
    ConvertedValues,
    InstanceHeader,
    InstanceKind,
    UnreadableDataset,
    read_header,
    read_received_header,
)
from node.index import IngestChange, Received, StudyIndex
from node.ingest import INGEST_ERRORS, IngestWriter
from node.metrics import ReceiverMetrics
from node.store import StoreOutcome, StudyStore
from node.uids import InvalidUID, is_valid_uid

SUCCESS = 0x0000
OUT_OF_RESOURCES_DISK = 0xA700  # free space below the watermark
OUT_OF_RESOURCES_WRITE = 0xA701  # the instance could not be made durable
DATASET_MISMATCH = 0xA900  # dataset does not match the request's SOP class / instance
CANNOT_UNDERSTAND = 0xC001  # the dataset does not parse
INVALID_UID = 0xC002  # Study/Series/SOP Instance UID missing or malformed
MPPS_PROCESSING_FAILURE = 0x0110
INGEST_TIMEOUT_S = 60.0

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
PYNETDICOM_REJECT_REASONS: dict[tuple[int | None, ...], str] = {
    REJECT_CALLED_AE: "called_ae", REJECT_LOCAL_LIMIT: "max_associations",
}

LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
LOOPBACK_V6 = ipaddress.ip_network("::1/128")


@dataclass(frozen=True)
class AccessPolicy:
    """Who may open an association: loopback peers and the allow-listed (AE title, host) pairs."""

    settings: NodeSettings

    def allows(self, calling_ae: str, host: str) -> bool:
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 peer of a dual-stack ("::") listener
        if self.settings.allow_loopback and (address in LOOPBACK_V4 or address in LOOPBACK_V6):
            return True
        for rule in self.settings.allowed_peers:
            if rule.ae_title not in ("*", calling_ae.strip()):
                continue
            if any(address in ipaddress.ip_network(net, strict=False) for net in rule.hosts):
                return True
        return False


def _ignore_host(host: str, reason: str) -> None:
    """Default for ``NodeServer.on_refused``."""


class Refusal:
    """Why a connection was closed before pynetdicom saw it (the metric's ``reason`` label)."""

    PER_HOST_LIMIT = "per_host_limit"
    TLS_HANDSHAKE = "tls_handshake"
    NOT_DICOM = "not_dicom"  # its first bytes are no A-ASSOCIATE-RQ PDU header
    CLOSED = "closed_before_pdu"  # closed (or silent until the ACSE timeout) before its first PDU


A_ASSOCIATE_RQ = 0x01
PEEK_POLL_S = 0.005


def opens_with_association_request(sock: socket.socket, timeout_s: float) -> str | None:
    """None when the connection's first bytes are an A-ASSOCIATE-RQ PDU header; else the refusal.

    An acceptor's first PDU must be an A-ASSOCIATE-RQ (PS3.8 9.2). The six header bytes are only
    peeked (``MSG_PEEK``), so pynetdicom reads them as usual. Checking them here, in the
    connection's own thread before pynetdicom's state machine starts, means a port scan, an HTTP
    request or a TLS hello on the plain port is closed at once: pynetdicom would answer A-ABORT and
    then read the rest of the bytes as PDUs, where random bytes soon announce a PDU of megabytes
    and the read blocks, slot held, until the network timeout.
    """
    deadline = time.monotonic() + timeout_s
    saved = sock.gettimeout()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Refusal.CLOSED
            sock.settimeout(left)
            try:
                head = sock.recv(6, socket.MSG_PEEK)
            except OSError:  # timed out or reset
                return Refusal.CLOSED
            if not head:
                return Refusal.CLOSED
            if head[0] != A_ASSOCIATE_RQ or (len(head) > 1 and head[1] != 0):
                return Refusal.NOT_DICOM
            if len(head) == 6:
                return None
            time.sleep(PEEK_POLL_S)  # part of the header is here: the rest is on its way
    finally:
        sock.settimeout(saved)


def free_dead_connection(event: Event) -> None:
    """Let an acceptor whose connection died before it associated give its slot back at once.

    pynetdicom's acceptor thread waits up to ``acse_timeout`` for the A-ASSOCIATE-RQ even after
    the peer closed the connection (Sta2 -> Sta1, no indication reaches the ACSE). After a
    non-PDU it sends A-ABORT and, in Sta13, goes on reading the rest of the bytes as PDUs: random
    bytes soon look like a PDU header announcing megabytes, and the read blocks until the network
    timeout. Both held a per-host and an overall slot for seconds; behind one PACS every
    association comes from one host. Bound to ``EVT_FSM_TRANSITION`` (pynetdicom's public
    state-machine event, fired after the action, before the new state is entered):

    - entering Sta13 before any A-ASSOCIATE-RQ (the peer sent something that is no PDU; the
      A-ABORT is already sent): the transport is closed now, which queues Evt17 (-> Sta1);
    - entering Sta1 before any A-ASSOCIATE-RQ: the waiting acceptor thread is woken with ``None``
      (what its queue returns on timeout), so it ends and its slot is free.
    """
    assoc = event.assoc
    if not assoc.is_acceptor or assoc.requestor.primitive is not None:
        return
    if event.next_state == "Sta13" and assoc.dul.socket is not None:
        assoc.dul.socket.close()
    elif event.next_state == "Sta1" and event.current_state in ("Sta2", "Sta13"):
        assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]  # None is what the DUL itself puts on timeout


def _connection_of(assoc: Any) -> Any:
    """The accepted socket an acceptor Association runs on (None once closed)."""
    transport = assoc.dul.socket
    return transport.socket if transport is not None else None


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server plus: TCP_NODELAY, a per-host connection cap, and a TLS
    handshake done in the connection's own thread (pynetdicom does it in the accept loop, where
    one stalled TLS peer would block every new connection)."""

    # socketserver's listen backlog is 5: a burst of connections beyond it has its SYNs dropped and
    # retried by the peer's kernel a second (then two, four...) later.
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_host_limit = 16
        self.first_pdu_timeout_s = 10.0  # node.acse_timeout_s: how long a connection may stay silent
        self.on_refused: Callable[[str, str], None] = _ignore_host
        # Connections accepted whose Association thread is not running yet (thread start, TLS
        # handshake), per host: they hold a slot too, or a burst of connections (or of stalled
        # TLS handshakes) would pass the cap before any of them shows up as an association.
        self._starting: dict[str, set[Any]] = {}  # host -> accepted sockets
        self._starting_lock = threading.Lock()
        # Set in receiver processes: the limits then hold over every receiver of the node.
        self.slots: AssociationSlots | None = None

    def _held_hosts(self) -> list[str]:
        """Hosts of every connection this process holds: live associations and those starting."""
        starting = {sock for socks in self._starting.values() for sock in socks}
        live = [str(assoc.requestor.address) for assoc in self.active_associations
                if _connection_of(assoc) not in starting]
        return live + [host for host, socks in self._starting.items() for _ in socks]

    def service_actions(self) -> None:
        """Every poll of the accept loop: publish this receiver's count afresh (connections closed)."""
        super().service_actions()
        if self.slots is not None:
            with self._starting_lock:
                self.slots.publish(self._held_hosts())

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # accept() hands out a blocking socket: without a timeout, a peer that stops halfway
        # through a PDU (or its header) holds the association thread forever, because
        # pynetdicom's reads block until the announced length arrived.
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse a connection from a host that already holds its share of association slots.

        Counted from pynetdicom's live association threads (idle, not yet associated
        connections included) plus the connections still starting (each counted once), so
        slow-loris connections from one host cannot starve others.
        """
        host = str(client_address[0])
        with self._starting_lock:
            if self.slots is not None:
                if self.slots.admit(host, self._held_hosts(), self.per_host_limit):
                    self._starting.setdefault(host, set()).add(request)
                    return True
                self.on_refused(host, Refusal.PER_HOST_LIMIT)
                return False
            starting = self._starting.get(host, set())
            live = sum(
                1 for assoc in self.active_associations
                if assoc.requestor.address == host and _connection_of(assoc) not in starting
            )
            if len(starting) + live < self.per_host_limit:
                self._starting.setdefault(host, set()).add(request)
                return True
        self.on_refused(host, Refusal.PER_HOST_LIMIT)
        return False

    def _started(self, request: Any, client_address: Any) -> None:
        """The connection's Association thread runs (or never will): it now counts as itself."""
        host = str(client_address[0])
        with self._starting_lock:
            starting = self._starting.get(host, set())
            starting.discard(request)
            if not starting:
                self._starting.pop(host, None)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._started(request, client_address)  # no thread: the slot is not held
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            refusal = None
            if isinstance(request, ssl.SSLSocket):  # TLS cannot peek: pynetdicom judges its first PDU
                request.settimeout(self.ae.network_timeout)
                try:
                    request.do_handshake()
                except (ssl.SSLError, OSError):
                    refusal = Refusal.TLS_HANDSHAKE
            else:
                refusal = opens_with_association_request(request, self.first_pdu_timeout_s)
            if refusal is not None:
                self.on_refused(str(client_address[0]), refusal)
                self.shutdown_request(request)
                return
            super().process_request_thread(request, client_address)  # starts the Association thread
        finally:
            self._started(request, client_address)


class FreeSpaceGauge:
    """Free bytes of the store, re-read at most once a second (statvfs on every C-STORE is waste)."""

    def __init__(self, store: StudyStore, min_free_bytes: int) -> None:
        self._store = store
        self._min_free = min_free_bytes
        self._checked_at = 0.0
        self._ok = True
        self._lock = threading.Lock()

    def enough(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at >= 1.0:
                self._ok = self._store.free_bytes() >= self._min_free
                self._checked_at = now
            return self._ok


@dataclass(frozen=True)
class Stored:
    """What storing one instance came to: its DICOM status, its header where it could be read, and
    why it failed (for STOW-RS's FailedSOPSequence and the logs)."""

    status: int
    header: InstanceHeader | None
    reason: str = ""


class StorageSCP:
    """The event handlers of the node's AE."""

    def __init__(
        self, settings: NodeSettings, store: StudyStore, index: StudyIndex, writer: IngestWriter,
        metrics: ReceiverMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.writer = writer
        self.metrics = metrics
        self.policy = AccessPolicy(settings)
        self.free_space = FreeSpaceGauge(store, settings.min_free_disk_mb * 1024 * 1024)
        self.header_values = ConvertedValues()  # one series' instances repeat most header values
        # In a receiver process: the node's open connections over all its receivers (this one's
        # included), for max_associations; None when this process is the only receiver.
        self.node_wide_connections: Callable[[], int] | None = None
        self.log = structlog.get_logger("pacsnode.scp")

    # --- association -------------------------------------------------------------------

    def on_requested(self, event: Event) -> None:
        """Reject callers that are not allowed before any negotiation happens."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip() if request is not None else ""
        host = str(assoc.requestor.address)
        if not self.policy.allows(calling, host):
            self.metrics.rejects.labels(reason="calling_ae_or_host").inc()
            self.log.warning("association rejected", reason="calling AE/host not allowed", calling_ae=calling,
                             peer=host)
            assoc.acse.send_reject(*REJECT_CALLING_AE)
            self.metrics.associations.labels(result="rejected").inc()  # pynetdicom fires no EVT_REJECTED here
            assoc.kill()
        elif self.node_wide_connections is not None and self.node_wide_connections() > self.settings.max_associations:
            # Over all receivers: answered as pynetdicom answers its own per-process limit.
            self.metrics.rejects.labels(reason="max_associations").inc()
            assoc.acse.send_reject(*REJECT_LOCAL_LIMIT)
            self.metrics.associations.labels(result="rejected").inc()
            assoc.kill()

    def on_rejected(self, event: Event) -> None:
        """Rejections by pynetdicom's own checks (called AE title, association limit)."""
        self.metrics.associations.labels(result="rejected").inc()
        rj = event.assoc.acceptor.primitive
        diagnosis = (rj.result, rj.result_source, rj.diagnostic) if rj is not None else ()
        self.metrics.rejects.labels(reason=PYNETDICOM_REJECT_REASONS.get(diagnosis, "other")).inc()

    def on_established(self, event: Event) -> None:
        self.metrics.associations.labels(result="accepted").inc()
        self.metrics.active_associations.inc()

    def on_closed(self, event: Event) -> None:
        if event.assoc.is_established or event.assoc.is_released or event.assoc.is_aborted:
            self.metrics.active_associations.dec()

    def refused_connection(self, host: str, reason: str) -> None:
        """Counted by reason; logged as a warning except for connections that simply closed
        (a load balancer's TCP check would fill the log)."""
        self.metrics.rejects.labels(reason=reason).inc()
        if reason == Refusal.CLOSED:
            self.log.debug("connection closed before its first PDU", peer=host)
        else:
            self.log.warning("connection refused", reason=reason, peer=host)

    # --- services ------------------------------------------------------------------------

    def on_echo(self, event: Event) -> int:
        return SUCCESS

    def on_store(self, event: Event) -> int:
        """Store one instance durably, exactly as received, and index it.

        The same bytes as ``event.encoded_dataset()``, with the file meta from a cached template
        (``node.file_meta``), and the header read from the data set in the context's transfer
        syntax, without parsing that file meta again."""
        request = cast(C_STORE, event.request)
        sop_uid, sop_class = str(request.AffectedSOPInstanceUID), str(request.AffectedSOPClassUID)
        transfer_syntax = str(event.context.transfer_syntax)
        received = ReceivedFile(part10_prefix(sop_class, sop_uid, transfer_syntax),
                                cast(BytesIO, request.DataSet).getvalue(), transfer_syntax)
        return self.store_encoded(received, str(event.assoc.requestor.ae_title).strip(), (sop_uid, sop_class)).status

    def store_encoded(self, encoded: bytes | ReceivedFile, peer: str, announced: tuple[str, str] | None = None) -> Stored:
        """Store one Part 10 instance durably, as received, and index it: the C-STORE path (a
        ``ReceivedFile``, whose file meta the node built) and the STOW-RS path (the file's bytes)
        alike. ``announced``: the (SOP Instance UID, SOP Class UID) the request named, which the
        data set must match (a STOW-RS part announces none)."""
        if not self.free_space.enough():
            self.metrics.instances.labels(outcome="disk_full").inc()
            self.log.error("store refused: free disk below watermark", peer=peer)
            return Stored(OUT_OF_RESOURCES_DISK, None, "free disk below the watermark")
        parts = encoded.parts if isinstance(encoded, ReceivedFile) else (encoded,)
        try:
            if isinstance(encoded, ReceivedFile):
                header = read_received_header(encoded.prefix, encoded.data_set, encoded.transfer_syntax,
                                              self.settings.uid_root, self.settings.manufacturer, self.header_values)
            else:
                header = read_header(encoded, self.settings.uid_root, self.settings.manufacturer, self.header_values)
        except UnreadableDataset as exc:
            return self._refuse(parts, CANNOT_UNDERSTAND, str(exc), peer)
        except InvalidUID as exc:
            return self._refuse(parts, INVALID_UID, str(exc), peer)
        if announced is not None and announced[0] != header.key.sop_uid:
            return self._refuse(parts, DATASET_MISMATCH, "SOPInstanceUID differs from the request's", peer)
        if announced is not None and announced[1] != header.sop_class_uid:
            return self._refuse(parts, DATASET_MISMATCH, "SOPClassUID differs from the request's", peer)
        stored = Stored(SUCCESS, header)
        size = sum(len(part) for part in parts)
        kind = header.kind
        produced = self.index.is_produced(header.key.sop_uid)
        if produced:
            kind = InstanceKind.RESULT
        try:
            own = self.store.path_of(header.key)
            if produced and own.is_file():
                # One of our results forwarded back by the PACS: the original in the store is ours;
                # the PACS's copy may carry another file meta or transfer syntax, which is no conflict.
                outcome, path = StoreOutcome.DUPLICATE, own
            else:
                outcome, path = self.store.write(header.key, parts)
            if outcome is StoreOutcome.CONFLICT:
                return self._kept_aside(path, stored, peer)
            self.store.sync_dirs_of(path)
            received = Received(
                header=replace(header, kind=kind),
                path=str(header.key.relative_path), size=size, absolute=path,
            )
            change = self.writer.commit(received, INGEST_TIMEOUT_S)
        except (*INGEST_ERRORS, FutureTimeout) as exc:
            self.metrics.instances.labels(outcome="write_failed").inc()
            self.log.error("store failed: not durable", error=type(exc).__name__, sop_uid=header.key.sop_uid,
                           peer=peer)
            return replace(stored, status=OUT_OF_RESOURCES_WRITE, reason="not durable")
        if change is IngestChange.VANISHED:
            self.metrics.instances.labels(outcome="write_failed").inc()
            return replace(stored, status=OUT_OF_RESOURCES_WRITE, reason="not durable")
        if change is IngestChange.MISPLACED and outcome is StoreOutcome.STORED:
            try:
                return self._kept_aside(self.store.set_aside(path, header.key), stored, peer)
            except OSError as exc:
                self.log.error("store failed: conflict not set aside", error=type(exc).__name__,
                               sop_uid=header.key.sop_uid, peer=peer)
                return replace(stored, status=OUT_OF_RESOURCES_WRITE, reason="not durable")
        self.metrics.instances.labels(outcome=change.value if outcome is StoreOutcome.STORED else "duplicate").inc()
        if change is IngestChange.NEW:
            self.metrics.bytes.inc(size)
        self.log.debug("stored", sop_uid=header.key.sop_uid, study_uid=header.key.study_uid, kind=kind.value,
                       change=change.value)
        return stored

    def _kept_aside(self, aside: Path, stored: Stored, peer: str) -> Stored:
        """A re-send that conflicts with the indexed instance (other bytes, or another study or
        series): the original stays, the copy is kept durably in quarantine, the peer is told success."""
        assert stored.header is not None
        key = stored.header.key
        self.metrics.instances.labels(outcome="conflict").inc()
        self.log.warning("conflicting re-send kept in quarantine", sop_uid=key.sop_uid, study_uid=key.study_uid,
                         peer=peer)
        self.store.sync_dirs_of(aside)
        return stored

    def _refuse(self, parts: Sequence[bytes], status: int, reason: str, peer: str) -> Stored:
        self.metrics.instances.labels(outcome="refused").inc()
        try:
            kept = self.store.quarantine_rejected(parts, reason)
            self.log.warning("store refused", status=hex(status), reason=reason, peer=peer, kept=kept.name)
        except OSError as exc:
            self.log.warning("store refused, not kept", status=hex(status), reason=reason, peer=peer,
                             error=type(exc).__name__)
        return Stored(status, None, reason)

    def on_n_create(self, event: Event) -> tuple[int, Dataset | None]:
        """MPPS IN PROGRESS: remember which study the procedure step belongs to."""
        request = cast(N_CREATE, event.request)
        if request.AffectedSOPClassUID != ModalityPerformedProcedureStep:
            return 0x0112, None  # no such SOP instance
        uid = str(request.AffectedSOPInstanceUID or "")
        attrs = event.attribute_list
        study_uid = _mpps_study_uid(attrs)
        if not is_valid_uid(uid) or study_uid is None:
            return MPPS_PROCESSING_FAILURE, None
        status = str(attrs.get("PerformedProcedureStepStatus", "IN PROGRESS"))
        self.index.record_mpps(uid, study_uid, status, _mpps_expected(attrs), time.time())
        return SUCCESS, attrs

    def on_n_set(self, event: Event) -> tuple[int, Dataset | None]:
        """MPPS COMPLETED: the listed images are what the study needs before it completes."""
        request = cast(N_SET, event.request)
        if request.RequestedSOPClassUID != ModalityPerformedProcedureStep:
            return 0x0112, None
        uid = str(request.RequestedSOPInstanceUID or "")
        if not is_valid_uid(uid):
            return MPPS_PROCESSING_FAILURE, None
        mods = event.modification_list
        status = str(mods.get("PerformedProcedureStepStatus", "IN PROGRESS"))
        self.index.record_mpps(uid, _mpps_study_uid(mods), status, _mpps_expected(mods), time.time())
        self.log.info("mpps", mpps_uid=uid, status=status)
        return SUCCESS, mods

    def handlers(self) -> list[EventHandlerType]:
        bound: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_FSM_TRANSITION, free_dead_connection),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]
        if self.settings.mpps:
            bound += [(evt.EVT_N_CREATE, self.on_n_create), (evt.EVT_N_SET, self.on_n_set)]
        return bound


def _mpps_study_uid(attrs: Dataset) -> str | None:
    for item in attrs.get("ScheduledStepAttributesSequence", []):
        uid = str(item.get("StudyInstanceUID", ""))
        if is_valid_uid(uid):
            return uid
    return None


def _mpps_expected(attrs: Dataset) -> list[str] | None:
    if "PerformedSeriesSequence" not in attrs:
        return None
    return [
        str(image.ReferencedSOPInstanceUID)
        for series in attrs.PerformedSeriesSequence
        for image in series.get("ReferencedImageSequence", [])
        if is_valid_uid(str(image.get("ReferencedSOPInstanceUID", "")))
    ]


def tls_context(settings: NodeSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context


def build_ae(settings: NodeSettings) -> AE:
    """An AE that accepts verification, MPPS and any storage SOP class in any transfer syntax."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True  # pynetdicom's switch: accept unknown/private storage classes
    # pynetdicom's own handlers describe every PDU and DIMSE message (DEBUG/INFO lines, about 5%
    # of the CPU an instance costs); the node logs its own events, with UIDs only.
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.add_supported_context(Verification)
    if settings.mpps:
        ae.add_supported_context(ModalityPerformedProcedureStep)
    return ae


ACCEPT_DEFER_S = 0.002  # a receiver with more connections than a sibling waits this long, then looks again
ACCEPT_DEFER_MAX_S = 0.02  # ... and accepts anyway after this long (the sibling may be stuck or restarting)


class AcceptTurn:
    """Whether this receiver should accept the connection waiting now: only when it holds no more
    connections than any sibling, or when the siblings left it waiting ``ACCEPT_DEFER_MAX_S``.

    Every receiver is woken for a new connection and the first to call accept() wins, which is
    not the least busy one: 4 connections over 2 receivers went 3 + 1 in about one run in
    three, and the receiver with 3 then ran at its one core's limit while the other idled."""

    def __init__(self, slots: AssociationSlots) -> None:
        self._slots = slots
        self._waiting_since: float | None = None
        self._last_look = 0.0

    def mine(self) -> bool:
        now = time.monotonic()
        if self._slots.has_fewest():
            self._waiting_since = None
            return True
        if self._waiting_since is None or now - self._last_look > 5 * ACCEPT_DEFER_S:
            self._waiting_since = now  # a new connection (the last one was taken by a sibling)
        self._last_look = now
        return now - self._waiting_since >= ACCEPT_DEFER_MAX_S


def receiver_server(slots: AssociationSlots, listening_fd: int) -> type[NodeServer]:
    """The server class of a receiver process: it accepts from the listening socket the node bound
    and handed down (``listening_fd``), beside the node's other receivers, and counts the
    association limits over all of them in ``slots``.

    One shared socket rather than one per receiver (SO_REUSEPORT): the kernel then hands each new
    connection to a receiver that is waiting in accept, so a busy receiver gets fewer, where
    SO_REUSEPORT spreads connections by a hash of their addresses (four connections land all on
    one of two receivers one time in eight, and half the time three on one). The socket is
    non-blocking: every receiver is woken for a connection, one accepts it, the others' accept
    fails (EAGAIN) and their loop goes on. A receiver holding more connections than a sibling
    leaves the connection to it (:class:`AcceptTurn`)."""

    class ReceiverServer(NodeServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.slots = slots
            self._turn = AcceptTurn(slots)

        def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
            if not self._turn.mine():
                time.sleep(ACCEPT_DEFER_S)
                raise BlockingIOError("left to a receiver with fewer connections")  # socketserver skips it
            return super().get_request()

        def server_bind(self) -> None:
            assert self.socket is not None
            self.socket.close()
            self.socket = socket.socket(fileno=listening_fd)
            self.socket.setblocking(False)
            self.server_address = self.socket.getsockname()

        def server_activate(self) -> None:
            """Listening already: the node did it."""

        def server_close(self) -> None:
            """Close this process's descriptor only. pynetdicom's ``server_close`` first calls
            shutdown(SHUT_RDWR), which on the one listening socket the node and every receiver
            share ends listening for all of them: after one receiver stopped (SIGTERM), its
            replacement and its siblings found accept() failing with EINVAL, spun on it, and the
            port took no more connections."""
            assert self.socket is not None
            self.socket.close()

    return ReceiverServer


def start_scp(settings: NodeSettings, scp: StorageSCP, server_class: type[NodeServer] = NodeServer) -> NodeServer:
    """Start listening (non-blocking); returns the server, whose ``shutdown()`` stops it."""
    ae = build_ae(settings)
    server = ae.make_server(
        (settings.host, settings.port),
        ae_title=settings.ae_title,
        ssl_context=tls_context(settings),
        evt_handlers=scp.handlers(),
        server_class=server_class,
        request_handler=IngestRequestHandler,
    )
    assert isinstance(server, NodeServer)
    server.per_host_limit = settings.max_associations_per_host
    server.first_pdu_timeout_s = settings.acse_timeout_s
    server.on_refused = scp.refused_connection
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dicom-server",
                              daemon=True)
    thread.start()
    ae._servers.append(server)
    return server
