"""The worker process that ``pacsnode serve`` runs itself on embedded defaults.

It is a real ``pacsnode worker`` process consuming real broker messages, started with the
node's effective paths and restarted if it dies. The node never imports the worker code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import structlog

from config.settings import Settings


class EmbeddedWorker:
    def __init__(self, settings: Settings, config_file: Path | None) -> None:
        self._settings = settings
        self._config_file = config_file
        self._process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="embedded-worker", daemon=True)
        self._log = structlog.get_logger("pacsnode.worker")

    def _command(self) -> list[str]:
        command = [sys.executable, "-c", "from node.cli import main; main()", "worker",
                   "--name", f"embedded-{os.getpid()}@localhost"]
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

    def start(self) -> None:
        self._thread.start()

    def _supervise(self) -> None:
        backoff = 1.0
        log = self._settings.workers.embedded_log
        while not self._stop.is_set():
            if log is None:
                self._process = subprocess.Popen(self._command(), env=self._environment())
            else:
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("ab") as out:  # the child keeps its own descriptor
                    self._process = subprocess.Popen(self._command(), env=self._environment(), stdout=out,
                                                     stderr=subprocess.STDOUT)
            self._log.info("embedded worker started", pid=self._process.pid)
            code = self._process.wait()
            if self._stop.is_set():
                return
            self._log.error("embedded worker exited; restarting", exit_code=code, retry_in_s=backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

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
