"""The audit log of the HTTP worklist: who viewed what, one JSON object per line, append-only.

It records the request as the client sent it (method, path with query) and the answer's status,
including refused requests, so that both access and attempts at it can be reviewed. It holds no
patient data: the node's index has none, and the paths carry only UIDs, states and dates.
Lines are appended under a lock so that concurrent requests never interleave; each line is
flushed on write (not fsynced: losing the last lines in a power cut is acceptable here).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

MAX_PATH_CHARS = 2048  # a hostile client must not grow the log by megabytes per request


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, *, client: str, user: str, method: str, path: str, status: int) -> None:
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "client": client,
            "user": user,
            "method": method,
            "path": path[:MAX_PATH_CHARS],
            "status": status,
        }
        line = json.dumps(entry, ensure_ascii=True) + "\n"
        with self._lock, self.path.open("a", encoding="ascii") as out:
            out.write(line)
