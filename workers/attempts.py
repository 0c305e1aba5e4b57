"""How often a job has been started, counted in the shared study store (not in the broker or the node).

A study that kills its worker process (out of memory, a decoder crash) is redelivered by the broker
(late acknowledgement with reject-on-worker-lost) and would kill the next worker too, forever. Each
delivery appends one line to ``<store>/.attempts/<job hash>`` before any work; a delivery that
finds more lines than ``max_attempts`` ends the job failed instead of running it. The file lives in
the store because every worker host mounts it and the count must survive the worker that died; it
is removed once the job reached an outcome.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FOLDER = ".attempts"


class AttemptLog:
    def __init__(self, store_root: Path, job_id: str) -> None:
        self.path = store_root / FOLDER / hashlib.sha256(job_id.encode()).hexdigest()

    def start(self, worker: str) -> int:
        """Record one more start and return the count including it (durable before the work begins)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{worker}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(self.path.read_bytes().splitlines())

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
