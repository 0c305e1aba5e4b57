"""The worker process that ``pacsnode serve`` runs itself on embedded defaults.

It is a real ``pacsnode worker`` process consuming real broker messages, started with the
node's effective paths and restarted with back-off if it dies. The node never imports the worker
code. Its output is passed through (to ``workers.embedded_log`` or the node's console) and the
last lines are kept, so that a worker that keeps failing is reported with its own words: in the
node's log, in ``/health`` (503 while it lasts), in ``pacsnode status`` (through a state file in
the data folder) and to the demo, which stops early instead of waiting out its timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Literal

import structlog
from pydantic import BaseModel, ConfigDict

from config.settings import Settings
from node.child_process import RestartBackoff, pacsnode_command

STATE_FILE = "embedded-worker.json"
TAIL_LINES = 20
STABLE_S = 30.0  # a restarted worker that stays up this long is healthy again
MAX_BACKOFF_S = 30.0
_DECORATION = re.compile(r"[\u2500-\u257f\s]+")  # rich's box drawing around typer's error messages


class WorkerHealth(BaseModel):
    """What the node knows of its embedded worker, as ``/health`` and ``pacsnode status`` show it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: Literal["starting", "running", "failing", "stopped"]
    pid: int | None = None
    node_pid: int
    failures: int = 0  # consecutive exits of workers that did not stay up STABLE_S
    exit_code: int | None = None
    reason: str = ""
    last_output: list[str] = []
    updated_at: float

    @property
    def failing(self) -> bool:
        return self.state == "failing"

    def summary(self) -> str:
        """One line for an operator: ``embedded worker failing: <reason>`` or the state."""
        if self.failing:
            return f"embedded worker failing: {self.reason}"
        return f"embedded worker {self.state}" + (f" (pid {self.pid})" if self.pid else "")


def failure_reason(lines: Iterable[str], exit_code: int) -> str:
    """The child's last line with words in it (its error, for a typer usage error or a traceback),
    with the exit code; box drawing and padding are stripped."""
    worded = [text for text in (_DECORATION.sub(" ", line).strip() for line in lines) if any(c.isalnum() for c in text)]
    said = worded[-1] if worded else "no output"
    how = f"killed by signal {-exit_code}" if exit_code < 0 else f"exit code {exit_code}"
    return f"{said} ({how})"


def read_worker_health(data_dir: Path) -> WorkerHealth | None:
    """The state file a running node keeps, or None when no node with an embedded worker runs there."""
    path = data_dir / STATE_FILE
    try:
        health = WorkerHealth.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None
    try:
        os.kill(health.node_pid, 0)
    except ProcessLookupError:
        return None  # left behind by a node that was killed
    except PermissionError:
        pass  # alive, under another user
    return health


class EmbeddedWorker:
    def __init__(self, settings: Settings, config_file: Path | None) -> None:
        self._settings = settings
        self._config_file = config_file
        self._process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="embedded-worker", daemon=True)
        self._log = structlog.get_logger("pacsnode.worker")
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
        self._health = WorkerHealth(state="starting", node_pid=os.getpid(), updated_at=time.time())
        self._state_file = settings.node.data_dir / STATE_FILE

    def _command(self) -> list[str]:
        command = pacsnode_command("worker", "--name", f"embedded-{os.getpid()}@localhost")
        if self._config_file is not None:
            command += ["--config", str(self._config_file)]
        return command

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        node = self._settings.node
        env["PACSNODE_NODE__DATA_DIR"] = str(node.data_dir.resolve())
        env["PACSNODE_NODE__STORE_DIR"] = str(node.store_path.resolve())
        env["PACSNODE_WORKERS__MODELS_DIR"] = str(self._settings.workers.models_dir.resolve())
        return env

    def health(self) -> WorkerHealth:
        with self._lock:
            return self._health

    def _set_health(self, **changes: object) -> None:
        """Record a change and publish it to the state file (temp file, then ``os.replace``)."""
        with self._lock:
            self._health = self._health.model_copy(update={**changes, "updated_at": time.time()})
            health = self._health
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            staging = self._state_file.with_name(f".{STATE_FILE}.{os.getpid()}")
            staging.write_text(health.model_dump_json())
            os.replace(staging, self._state_file)
        except OSError as exc:  # status then shows nothing; /health and the log still say it
            self._log.warning("embedded worker state not written", error=type(exc).__name__, path=str(self._state_file))

    def start(self) -> None:
        self._thread.start()

    def _pass_through(self, stream: IO[bytes], sink: IO[bytes]) -> None:
        """Copy the child's output to its sink line by line, keeping the last lines."""
        for line in stream:
            self._tail.append(line.decode(errors="replace").rstrip())
            try:
                sink.write(line)
                sink.flush()
            except (OSError, ValueError):
                pass  # a closed console must not stop the copy, or the child would block on a full pipe

    def _run_once(self) -> int:
        """Start one worker, wait for it; its exit code and how long it ran."""
        log = self._settings.workers.embedded_log
        self._tail.clear()
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") if log is not None else nullcontext(sys.stderr.buffer) as sink:
            self._process = subprocess.Popen(self._command(), env=self._environment(), stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT)
            assert self._process.stdout is not None  # stdout=PIPE
            copier = threading.Thread(target=self._pass_through, args=(self._process.stdout, sink),
                                      name="embedded-worker-output", daemon=True)
            copier.start()
            self._log.info("embedded worker started", pid=self._process.pid)
            if not self.health().failing:
                self._set_health(state="running", pid=self._process.pid)
            while True:
                try:
                    code = self._process.wait(timeout=STABLE_S if self.health().failing else None)
                    break
                except subprocess.TimeoutExpired:  # up long enough: healthy again
                    self._set_health(state="running", pid=self._process.pid, failures=0)
                    self._log.info("embedded worker recovered", pid=self._process.pid)
            copier.join(timeout=5)
        return code

    def _supervise(self) -> None:
        backoff = RestartBackoff(STABLE_S, MAX_BACKOFF_S)
        while not self._stop.is_set():
            backoff.started(time.monotonic())
            code = self._run_once()
            if self._stop.is_set():
                return
            delay = backoff.died(time.monotonic())
            last = list(self._tail)
            reason = failure_reason(last, code)
            self._set_health(state="failing", pid=None, failures=backoff.failures, exit_code=code, reason=reason,
                             last_output=last[-5:])
            self._log.error("embedded worker exited; restarting", exit_code=code, retry_in_s=delay,
                            failures=backoff.failures, reason=reason, last_output=last[-5:])
            self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(timeout=5)
        self._state_file.unlink(missing_ok=True)
