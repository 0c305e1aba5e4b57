"""pynetdicom's acceptor, tuned for ingest: threads that wait for work instead of polling, whole
PDUs read at once, and C-STORE requests read and responses written without pydicom Datasets.

Measured on a 512x512 CT slice (``python -m bench.ingest``, the profile in its README): pynetdicom
spent about 0.8 ms building and encoding each C-STORE-RSP (two pydicom encodes of six
elements), read every PDU in 4 KiB ``recv`` calls, and both threads of every association woke
every millisecond to look for work (``time.sleep(0.001)`` loops in the DUL and Association
reactors) while holding up the threads that had some.

What changes, and where it hooks in:

- :class:`IngestRequestHandler` is the server's ``request_handler`` (a documented argument of
  pynetdicom's ``AssociationServer``); it builds an :class:`IngestAssociation` instead of a plain
  ``Association``, configured as pynetdicom's own ``RequestHandler._create_association`` does.
- :class:`IngestAssociation` swaps in :class:`WaitingDul`, :class:`IngestDimse` and a
  :class:`WorkCheckpoint`, before any thread starts.
- :class:`WaitingSocket`: ``ready`` waits in ``select`` on the connection and on the DUL's
  :class:`Doorbell`, rung whenever the association thread hands the DUL something to send;
  ``recv`` reads a whole PDU with ``recv_into``.

These override pynetdicom internals (private attributes and the reactor's polling hooks), so the
version is pinned in ``pyproject.toml`` and ``tests/test_scp_acceptor.py`` checks the upstream
code they depend on: an upgrade that changes it fails there, not silently in production.
"""

from __future__ import annotations

import os
import queue
import select
import threading
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from io import BytesIO
from typing import Any, cast

from pynetdicom import _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.command_set import StoreRequest, decode_store_request, store_response_command

# How long an idle thread waits before it looks at its timers again (ARTIM, network, DIMSE
# timeouts). Work wakes it at once; this only bounds how late a timeout is noticed.
IDLE_WAIT_S = 0.1
RECV_CHUNK = 4 * 1024 * 1024  # read buffer: a 1 MiB PDU (the node's default maximum) in one

P_DATA_TF_TYPE = b"\x04"
P_DATA_TF_RECEIVED = "Evt10"  # PS3.8 9.2: the state machine's event for a P-DATA-TF PDU received
INVALID_PDU = "Evt19"  # PS3.8 9.2: an invalid PDU received, answered with A-ABORT
LAST_COMMAND_FRAGMENT = b"\x03"  # PS3.8 E.2: message control header, command, last fragment


class Doorbell:
    """A pipe that wakes a thread waiting in ``select``. Rung by other threads; closed by the
    waiting one when it ends (a ring after that is a no-op: the fd number may be reused)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def ring(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:  # the pipe is full: the waiter will wake anyway
                pass

    def drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


class WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class WaitingSocket(AssociationSocket):
    """An acceptor's connection: waits for data (or the doorbell) instead of being polled, and reads
    a PDU in as few ``recv`` calls as the kernel allows."""

    def __init__(self, assoc: Association, client_socket: Any, doorbell: Doorbell) -> None:
        self.doorbell = doorbell
        super().__init__(assoc, client_socket=client_socket)

    @property
    def ready(self) -> bool:
        """True when data can be read. Where pynetdicom only looks (and its reactor sleeps 1 ms
        before looking again), this waits up to ``IDLE_WAIT_S`` for data or the doorbell. While
        the connection closes (Sta13) it only looks, as upstream does."""
        if super().ready:
            return True
        if self.socket is None or not self._is_connected or self.assoc.dul.state_machine.current_state == "Sta13":
            return False
        try:
            readable, _, _ = select.select([self.socket.fileno(), self.doorbell.fileno()], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):
            return False  # closed meanwhile: the next look (super().ready) reports it
        self.doorbell.drain()
        return self.socket.fileno() in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` read into buffers of up to ``RECV_CHUNK`` (upstream: 4 KiB per call,
        appended); what arrived before the peer closed, as upstream. The buffer grows with what
        arrives, never ahead of it by more than a chunk: a PDU header may announce 4 GiB."""
        sock = cast(Any, self.socket)
        received = bytearray()
        while len(received) < nr_bytes:
            chunk = bytearray(min(nr_bytes - len(received), RECV_CHUNK))
            view = memoryview(chunk)
            filled = 0
            while filled < len(chunk):
                count = sock.recv_into(view[filled:])
                if not count:
                    view.release()
                    received += chunk[:filled]
                    return received
                filled += count
            view.release()
            if not received and filled == nr_bytes:
                return chunk  # the whole PDU in one buffer: no copy
            received += chunk
        return received


class WaitingDul(DULServiceProvider):
    """The DUL reactor, waiting in ``WaitingSocket.ready`` rather than sleeping 1 ms per loop."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.doorbell = Doorbell()
        self._run_loop_delay = 0.0  # the wait happens in WaitingSocket.ready
        self.to_provider_queue = WakingQueue(self.doorbell.ring)

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """As upstream, except that a P-DATA-TF is decoded over a view of the bytes received, so
        its PDV values are views too. Upstream copies the PDU whole into ``bytes``, then its items
        part, then each PDV value: three copies of a 514 KB CT slice, about 70 us each in a busy
        receiver. Upstream decodes it where handlers want the bytes or the PDU (``EVT_DATA_RECV``,
        ``EVT_PDU_RECV``)."""
        if bytestream[:1] != P_DATA_TF_TYPE or self.assoc.get_handlers(evt.EVT_DATA_RECV) \
                or self.assoc.get_handlers(evt.EVT_PDU_RECV):
            return cast(tuple[Any, str], super()._decode_pdu(bytestream))
        pdu = P_DATA_TF()
        pdu.decode(memoryview(bytestream))  # type: ignore[arg-type]  # slicing is all it does to it
        return pdu, P_DATA_TF_RECEIVED

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self.doorbell.close()
            cast(IngestAssociation, self.assoc).work.set()  # the association notices the DUL ended

    def kill_dul(self) -> None:
        super().kill_dul()
        self.doorbell.ring()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.doorbell.ring()
        return super().stop_dul()


class WorkCheckpoint(threading.Event):
    """The association reactor's checkpoint (set: run; cleared: paused, as upstream), which also
    waits, up to ``IDLE_WAIT_S``, until there is something to look at: a DIMSE message, a
    primitive from the DUL (release, abort), or the DUL's end. The reactor calls ``wait()`` once per
    loop, before it looks; upstream it returned at once and the loop slept 1 ms."""

    def __init__(self, work: threading.Event, pending: Callable[[], bool]) -> None:
        super().__init__()
        self.set()
        self._work = work
        self._pending = pending

    def wait(self, timeout: float | None = None) -> bool:
        if not super().wait(timeout):
            return False
        self._work.clear()  # before looking: anything put from now on sets it again
        if not self._pending():
            self._work.wait(IDLE_WAIT_S)
        return True

    def set(self) -> None:
        super().set()
        work = getattr(self, "_work", None)
        if work is not None:  # kill() sets the checkpoint to let the reactor out: wake it too
            work.set()


class IngestDimse(DIMSEServiceProvider):
    """Reads C-STORE requests and sends their responses with the command sets coded directly
    (:mod:`node.command_set`), where pynetdicom goes through pydicom Datasets each way.

    A request is read this way only when its command set comes whole in the first fragment of a
    message and is a plain C-STORE-RQ; its data set fragments are then gathered and joined once
    (pynetdicom copies each twice into a BytesIO). Any other message, a bound ``EVT_DIMSE_RECV``
    (which expects pynetdicom's message objects), chunked data sets to file
    (``_config.STORE_RECV_CHUNKED_DATASET``) and any response with an error comment or offending
    element go through pynetdicom unchanged."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._request: tuple[int, StoreRequest, list[memoryview]] | None = None  # being received

    def receive_primitive(self, primitive: P_DATA) -> None:
        items = primitive.presentation_data_value_list
        if self._request is None:
            if self.message is not None or not items or not self._reads_requests():
                super().receive_primitive(primitive)
                return
            context_id, first = items[0]
            request = decode_store_request(first[1:]) if first[0] & 3 == 3 else None
            if request is None:  # not a whole, plain C-STORE-RQ command: pynetdicom reads it
                super().receive_primitive(primitive)
                return
            self._request = (context_id, request, [])
            items = items[1:]
        for index, (context_id, data) in enumerate(items):
            context, request, fragments = self._request
            if data[0] & 1 or context_id != context:  # a command, or another context, amid a data set
                self._request = None
                self.dul.event_queue.put(INVALID_PDU)  # as pynetdicom does for an invalid DIMSE message
                return
            fragments.append(memoryview(data)[1:])
            if data[0] & 2:  # the data set's last fragment
                self._request = None
                try:
                    indication = request.primitive(BytesIO(b"".join(fragments)))
                except ValueError:  # a value the primitive refuses: as pynetdicom's message_to_primitive
                    self.dul.event_queue.put(INVALID_PDU)
                    return
                self.msg_queue.put((context, indication))
                rest = items[index + 1:]
                if rest:  # the next message begins in the same PDU
                    following = P_DATA()
                    following.presentation_data_value_list.extend(rest)  # as P_DATA_TF.to_primitive fills it
                    self.receive_primitive(following)
                return

    def _reads_requests(self) -> bool:
        return not _config.STORE_RECV_CHUNKED_DATASET and not self.assoc.get_handlers(evt.EVT_DIMSE_RECV)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = store_response_command(primitive)
        if command is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            super().send_msg(primitive, context_id)
            return
        limit = self.maximum_pdu_size
        if limit and len(command) + 6 > limit:  # PDV item header (6) over the peer's limit
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + command))
        self.dul.send_pdu(pdata)


class IngestAssociation(Association):
    """An acceptor Association whose DUL and reactor wait for work (see the module docstring)."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.work = threading.Event()
        self.dul = WaitingDul(self)
        self.dimse = IngestDimse(self)
        self.dimse.msg_queue = WakingQueue(self.work.set)
        self.dul.to_user_queue = WakingQueue(self.work.set)
        self._reactor_checkpoint = WorkCheckpoint(self.work, self._has_work)
        # Their setters arm the DUL's timers (ARTIM, idle), which the new DUL has at their defaults.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def _has_work(self) -> bool:
        return bool(self.dimse.msg_queue.qsize() or self.dul.to_user_queue.qsize()) or not self.dul.is_alive()


class IngestRequestHandler(RequestHandler):
    """pynetdicom's connection handler, building an :class:`IngestAssociation`."""

    def _create_association(self) -> Association:
        """As upstream (pynetdicom 3.0 ``RequestHandler._create_association``), with our classes."""
        assoc = IngestAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(WaitingSocket(assoc, self.request, cast(WaitingDul, assoc.dul).doorbell))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Callable[..., Any], list[Any] | None]], handlers):
                    assoc.bind(event, handler, args)
        return assoc
