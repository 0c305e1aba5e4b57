"""Several receiver processes on one port (``node.receivers: 2``): every guarantee of the single
SCP holds across them.

Real receivers (child processes of a node running in this test process, or of a ``pacsnode serve``
subprocess), real associations over loopback, DCMTK as an outside peer, SIGKILL for real.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dicom_factory as f
import pydicom
import pytest
from conftest import make_settings, wait_until
from lifecycle_support import cli_env, rows, stop_process
from pynetdicom import AE
from test_scp_support import NODE_AE, associate_rq_pdu, dcmtk, echo, metric, scu

from node.association_slots import AssociationSlots
from node.child_process import RestartBackoff, pacsnode_command
from node.receiver import is_ready
from node.receivers import MAX_BACKOFF_S, STABLE_S
from node.scp import SUCCESS, build_ae, receiver_server
from node.service import Node

CT_IMAGE = f.CT_IMAGE
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _two(start_node: Callable[..., Node], tmp_path: Path, **node: object) -> Node:
    return start_node(make_settings(tmp_path, node={"receivers": 2, **node}))


def _slots(node: Node) -> AssociationSlots:
    assert node.receivers is not None and node.receivers.slots is not None
    return AssociationSlots(node.receivers.slots.path, 2)


def _indexed(node: Node) -> set[str]:
    return {r["sop_uid"] for r in rows(node.settings.node.index_path, "SELECT sop_uid FROM instances")}


def test_two_receivers_share_the_port_store_durably_and_sum_their_metrics(
        start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = _two(start_node, tmp_path)
    assert node.receivers is not None and node.receivers.alive() == 2
    studies = [f.ct_head(6) for _ in range(8)]
    folders = []
    for number, study in enumerate(studies):
        folders.append(tmp_path / f"study{number}")
        f.write(study, folders[-1])
    # Eight DCMTK senders at once: the kernel spreads their connections over both receivers.
    senders = [subprocess.Popen(["/usr/bin/storescu", "-aec", NODE_AE, "+sd", "127.0.0.1", str(node.dicom_port),
                                 str(folder)], env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE) for folder in folders]
    assert all(sender.wait(timeout=60) == 0 for sender in senders)
    sent = {str(ds.SOPInstanceUID) for study in studies for ds in study}
    # Acknowledged means durable: every instance is indexed and on disk the moment storescu is done.
    assert _indexed(node) == sent
    assert {p.stem for p in node.store.root.rglob("*.dcm")} == sent
    assert node.http_port is not None
    assert metric(node.http_port, "pacsnode_instances_received_total", outcome="new") == len(sent)
    assert metric(node.http_port, "pacsnode_associations_total", result="accepted") == len(studies)
    counters = list(node.receivers.metrics_dir.glob("counter_*.db"))
    assert len(counters) == 2, "both receivers took connections"


def test_limits_hold_over_all_receivers(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = _two(start_node, tmp_path, max_associations=3, max_associations_per_host=3)
    slots = _slots(node)
    with contextlib.ExitStack() as held:
        # Until both receivers hold associations, so that a limit can only hold if they count together.
        open_ones = []
        for _ in range(20):
            assoc = held.enter_context(scu(node.dicom_port))
            assert assoc.is_established
            open_ones.append(assoc)
            if len(open_ones) == 3:
                if slots.held_by(0) and slots.held_by(1):
                    break
                open_ones.pop(0).release()
                assert wait_until(lambda: slots.connections() == len(open_ones), timeout=5)
        assert slots.held_by(0) and slots.held_by(1) and slots.connections() == 3
        # 127.0.0.1 holds 3 of 3: the next connection from it is closed at once, on either receiver.
        for _ in range(4):
            with scu(node.dicom_port, timeout=3) as refused:
                assert not refused.is_established
        assert node.http_port is not None
        assert metric(node.http_port, "pacsnode_association_rejects_total", reason="per_host_limit") >= 4
    # Released: the slots are free again over both receivers.
    assert wait_until(lambda: slots.connections() == 0, timeout=5)
    assert echo(node.dicom_port) == SUCCESS


def test_connections_are_spread_evenly_over_the_receivers(start_node: Callable[..., Node], tmp_path: Path) -> None:
    """Four connections at once, eight times: each receiver takes two. (Whichever receiver called
    accept() first used to win: 3 + 1 in about one burst in three.)"""
    node = _two(start_node, tmp_path)
    slots = _slots(node)
    for _ in range(8):
        sockets = [socket.create_connection(("127.0.0.1", node.dicom_port), timeout=10) for _ in range(4)]
        try:
            for sock in sockets:
                sock.sendall(associate_rq_pdu())
            assert all(sock.recv(1) == b"\x02" for sock in sockets), "an association was not accepted"
            assert [slots.held_by(0), slots.held_by(1)] == [2, 2]
        finally:
            for sock in sockets:
                sock.close()
        assert wait_until(lambda: slots.connections() == 0, timeout=10)


def test_the_node_wide_association_limit_is_an_a_associate_rj(start_node: Callable[..., Node],
                                                                tmp_path: Path) -> None:
    node = _two(start_node, tmp_path, max_associations=2, max_associations_per_host=8)
    slots = _slots(node)
    with contextlib.ExitStack() as held:
        first = held.enter_context(scu(node.dicom_port))
        second = held.enter_context(scu(node.dicom_port))
        assert first.is_established and second.is_established
        rejected = 0
        for _ in range(4):  # whichever receiver takes it, the node's third association is refused
            with scu(node.dicom_port, timeout=3) as third:
                assert not third.is_established
                rejected += third.is_rejected
        assert rejected == 4
    assert wait_until(lambda: slots.connections() == 0, timeout=5)


def test_two_receivers_given_one_instance_at_once_store_it_once(start_node: Callable[..., Node],
                                                                  tmp_path: Path) -> None:
    node = _two(start_node, tmp_path)
    (path,) = f.write(f.ct_head(1), tmp_path / "one")
    statuses: list[int] = []

    def send() -> None:
        ae = AE(ae_title="TWIN")
        ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=NODE_AE)
        assert assoc.is_established
        statuses.append(int(assoc.send_c_store(pydicom.dcmread(path)).Status))
        assoc.release()

    for _ in range(5):
        senders = [threading.Thread(target=send) for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
    assert statuses == [SUCCESS] * 20
    assert len(list(node.store.root.rglob("*.dcm"))) == 1
    assert not list((node.store.quarantine / "conflicts").rglob("*.dcm"))
    assert len(_indexed(node)) == 1


def test_our_own_results_do_not_open_a_study_on_any_receiver(start_node: Callable[..., Node],
                                                              tmp_path: Path) -> None:
    node = _two(start_node, tmp_path)
    study = f.ct_head(2)
    f.send(study, tmp_path / "images", node.dicom_port)
    uid = str(study[0].StudyInstanceUID)
    assert wait_until(lambda: rows(node.settings.node.index_path, "SELECT state FROM studies WHERE study_uid=?",
                                   (uid,))[0]["state"] != "receiving", timeout=20)
    before = rows(node.settings.node.index_path, "SELECT version FROM studies WHERE study_uid=?", (uid,))[0]
    for _ in range(3):  # a result forwarded back by the PACS, over connections to both receivers
        f.send([f.sr_result(uid)], tmp_path / "results", node.dicom_port)
    time.sleep(1.5)
    after = rows(node.settings.node.index_path, "SELECT version, state FROM studies WHERE study_uid=?", (uid,))[0]
    assert after["version"] == before["version"] and after["state"] != "receiving"


@pytest.fixture
def serve_two(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """``pacsnode serve`` with two receivers on a fixed port, as a process of its own."""
    settings = make_settings(tmp_path, node={"receivers": 2}, http={"enabled": False})
    env = cli_env(settings, PACSNODE_NODE__PORT=str(settings.node.port), PACSNODE_NODE__HOST="127.0.0.1",
                  PACSNODE_NODE__RECEIVERS="2", PACSNODE_NODE__MIN_FREE_DISK_MB="1", PACSNODE_HTTP__ENABLED="false")
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(pacsnode_command("serve", "--no-worker"), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        return process

    start.settings = settings  # type: ignore[attr-defined]
    yield start
    for process in started:
        stop_process(process)


def _receiver_pids(run_dir: Path) -> list[int]:
    pids = []
    for slot in (0, 1):
        try:
            pids.append(int((run_dir / f"receiver-{slot}.ready").read_text()))
        except (OSError, ValueError):
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_a_receiver_killed_under_load_loses_nothing_acknowledged_and_is_replaced(
        start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = _two(start_node, tmp_path)
    assert node.receivers is not None
    run_dir = node.receivers.run_dir
    first_pids = _receiver_pids(run_dir)
    acknowledged: set[str] = set()
    stop = threading.Event()
    lock = threading.Lock()

    def sender(number: int) -> None:
        while not stop.is_set():
            study = f.ct_head(4)
            ae = AE(ae_title=f"LOAD{number}")
            ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
            assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=NODE_AE)
            if not assoc.is_established:
                continue
            for ds in study:
                status = assoc.send_c_store(ds)
                if status and int(status.Status) == SUCCESS:
                    with lock:
                        acknowledged.add(str(ds.SOPInstanceUID))
                if not assoc.is_established:
                    break  # the receiver died under us: a new association, a new study
            if assoc.is_established:
                assoc.release()

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: len(acknowledged) >= 40, timeout=30)
        os.kill(first_pids[0], signal.SIGKILL)
        # The sibling keeps serving while the node replaces the dead one.
        count = len(acknowledged)
        assert wait_until(lambda: len(acknowledged) >= count + 40, timeout=30)
        assert wait_until(lambda: is_ready(run_dir, 0, node.receivers.pids()[0] or -1)
                          and node.receivers.pids()[0] != first_pids[0], timeout=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert node.receivers.alive() == 2
    missing = acknowledged - _indexed(node)
    assert not missing, f"{len(missing)} acknowledged instances not indexed"
    on_disk = {p.stem for p in node.store.root.rglob("*.dcm")}
    assert acknowledged <= on_disk
    assert echo(node.dicom_port) == SUCCESS


def test_a_receiver_server_closing_leaves_the_shared_socket_listening(tmp_path: Path) -> None:
    """A receiver's server closes only its own descriptor of the listening socket the node and all
    receivers share: pynetdicom's server_close calls shutdown(SHUT_RDWR) first, which would end
    listening for every process (accept() then fails with EINVAL in all of them)."""
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    settings = make_settings(tmp_path, node={"port": port}).node
    slots = AssociationSlots.create(tmp_path / "slots", 2)
    server = build_ae(settings).make_server(
        ("127.0.0.1", port), ae_title=settings.ae_title,
        server_class=receiver_server(AssociationSlots(slots.path, 2, 0), os.dup(listening.fileno())))
    server.server_close()
    listening.settimeout(5)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        accepted, _ = listening.accept()  # still listening
        accepted.close()
    listening.close()


def test_a_killed_node_leaves_no_receiver_serving_and_a_restarted_one_binds(
        serve_two: Callable[[], subprocess.Popen[bytes]]) -> None:
    settings = serve_two.settings  # type: ignore[attr-defined]
    port = settings.node.port
    run_dir = settings.node.data_dir / "run"
    node = serve_two()
    assert wait_until(lambda: len(_receiver_pids(run_dir)) == 2 and echo(port) == SUCCESS, timeout=60)
    receivers = _receiver_pids(run_dir)
    node.send_signal(signal.SIGKILL)
    node.wait(timeout=10)
    assert wait_until(lambda: not any(_alive(pid) for pid in receivers), timeout=10), "receivers outlived the node"
    assert echo(port, timeout=2) != SUCCESS
    serve_two()
    assert wait_until(lambda: echo(port) == SUCCESS, timeout=60)
    result = dcmtk("echoscu", "-aec", NODE_AE, "127.0.0.1", str(port))
    assert result.returncode == 0, result.stderr


def test_restart_back_off_doubles_in_a_crash_loop_and_starts_afresh_after_a_stable_run() -> None:
    backoff = RestartBackoff(STABLE_S, MAX_BACKOFF_S)
    backoff.started(0.0)
    delays = []
    now = 0.0
    for _ in range(6):  # each replacement dies 2 s after it started
        now += 2.0
        delays.append(backoff.died(now))
        backoff.started(now)
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    now += STABLE_S + 1  # then one ran for over a minute
    assert backoff.died(now) == 1.0
