"""The node's receiver processes (``node.receivers`` of them): started, watched and replaced.

Why processes: C-STORE handling is Python (pynetdicom, the header read, the writes), so one
process cannot use a second core. The node binds and listens on the port and hands the socket
down to every receiver (a pre-forked accept): every receiver is woken for a new connection, and
the one holding the fewest connections takes it (``node.scp.AcceptTurn``); each runs
:mod:`node.receiver`. The node stays the one
owner of everything else (assembly, dispatch, exports), which reads what the receivers committed
to the index.

A receiver that dies (SIGKILL, a crash) lost nothing it had acknowledged: it answers success only
after the index commit. The node frees its association slots, drops its gauge, and starts a
replacement, with back-off while replacements keep dying. A node that dies takes its receivers
with it (``PR_SET_PDEATHSIG`` in each), so none keeps serving alone and a restarted node can bind.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import structlog
from prometheus_client import multiprocess

from config.settings import Settings
from node.association_slots import AssociationSlots
from node.child_process import RestartBackoff
from node.receiver import ReceiverSpec, is_ready
from node.scp import NodeServer

RUN_DIR = "run"
READY_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 10.0
STABLE_S = 60.0  # a receiver that ran this long before it died starts the back-off afresh (RestartBackoff)
WATCH_S = 0.2


def receiver_command(spec: Path, slot: int, listening_fd: int) -> list[str]:
    return [sys.executable, "-P", "-m", "node.receiver", str(spec), str(slot), str(listening_fd)]


class ReceiverPool:
    """Starts the receivers on ``port`` and keeps ``count`` of them running until ``stop``."""

    def __init__(self, settings: Settings, count: int) -> None:
        self._settings = settings
        self.count = count
        self.run_dir = settings.node.data_dir / RUN_DIR
        self.metrics_dir = self.run_dir / "receiver-metrics"
        self._spec_path = self.run_dir / "receivers.json"
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * count
        self._restarts = [0] * count
        self._backoff = [RestartBackoff(STABLE_S, MAX_BACKOFF_S) for _ in range(count)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="receivers", daemon=True)
        self._log = structlog.get_logger("pacsnode.receivers")
        self._listening: socket.socket | None = None
        self.port = settings.node.port
        self.slots: AssociationSlots | None = None

    def prepare(self) -> None:
        """Fresh run folder, slot table and metrics folder (an earlier, killed node's are void)."""
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)
        self.slots = AssociationSlots.create(self.run_dir / "association-slots", self.count)

    def _listen(self) -> socket.socket:
        """The node's DICOM port, bound and listening, for the receivers to accept from (port 0:
        any free one)."""
        node = self._settings.node
        family = socket.AF_INET6 if ":" in node.host else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((node.host, node.port))
        listening.listen(NodeServer.request_queue_size)  # the in-process server's backlog
        self.port = int(listening.getsockname()[1])
        return listening

    def start(self) -> None:
        self.prepare()
        self._listening = self._listen()
        node = self._settings.node.model_copy(update={"port": self.port})
        assert self.slots is not None
        spec = ReceiverSpec(node=node, logging=self._settings.logging, receivers=self.count, slots=self.slots.path,
                            metrics=self.metrics_dir, parent_pid=os.getpid())
        fd = os.open(self._spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(spec.model_dump_json())
        for slot in range(self.count):
            self._spawn(slot)
        self._wait_listening()
        self._thread.start()

    def _spawn(self, slot: int) -> None:
        assert self._listening is not None
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        fd = self._listening.fileno()
        self._processes[slot] = subprocess.Popen(receiver_command(self._spec_path, slot, fd), env=env, pass_fds=(fd,))
        self._backoff[slot].started(time.monotonic())

    def _wait_listening(self) -> None:
        """Until every receiver wrote its ready file (it listens), or one exited."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            waiting = 0
            for slot, process in enumerate(self._processes):
                assert process is not None
                if process.poll() is not None:
                    raise OSError(f"receiver {slot} exited with {process.returncode} at start "
                                  f"(port {self.port} in use?)")
                waiting += not is_ready(self.run_dir, slot, process.pid)
            if not waiting:
                return
            time.sleep(0.05)
        raise OSError(f"the receivers did not listen on port {self.port} within {READY_TIMEOUT_S:.0f} s")

    def pids(self) -> list[int | None]:
        return [p.pid if p is not None and p.poll() is None else None for p in self._processes]

    def alive(self) -> int:
        return sum(pid is not None for pid in self.pids())

    def _watch(self) -> None:
        next_try = [0.0] * self.count
        while not self._stop.wait(WATCH_S):
            for slot, process in enumerate(self._processes):
                if process is None or process.poll() is None or self._stop.is_set():
                    continue
                now = time.monotonic()
                if now < next_try[slot]:
                    continue
                next_try[slot] = now + self._backoff[slot].died(now)
                self._replace(slot, process)

    def _replace(self, slot: int, dead: subprocess.Popen[bytes]) -> None:
        assert self.slots is not None
        self.slots.clear(slot)
        multiprocess.mark_process_dead(dead.pid, str(self.metrics_dir))
        self._restarts[slot] += 1
        self._log.warning("receiver died; starting a replacement", slot=slot, pid=dead.pid,
                          exit_code=dead.returncode, restarts=self._restarts[slot])
        self._spawn(slot)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for process in self._processes:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in self._processes:
            if process is None:
                continue
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._listening is not None:
            self._listening.close()
        if self.slots is not None:
            self.slots.close()
