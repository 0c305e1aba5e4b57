"""What a pull has fetched, so that the next run transfers only what is new and a stopped run resumes.

One SQLite file in the archive folder. It never holds a source UID: rows are keyed by a keyed
digest (``Deidentifier.ledger_key``), so the ledger identifies nothing without the site secret.
A series is recorded once its retrieval ended in success with every sub-operation done; a study
is complete when the PACS's count of its instances is what its recorded series hold. A series
cut short (Ctrl-C, a failed C-MOVE, a refused association) is not recorded and is fetched again
(its files are rewritten under the same names).
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    key TEXT PRIMARY KEY,
    study_key TEXT NOT NULL,
    instances INTEGER NOT NULL,
    pulled_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS series_by_study ON series(study_key);
"""


class PullLedger:
    """The pulled series of one archive folder (``.pull/ledger.sqlite``)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def has_series(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM series WHERE key = ?", (key,)).fetchone() is not None

    def study_instances(self, study_key: str) -> int:
        """Instances in the recorded series of a study (0 if none)."""
        (count,) = self._db.execute("SELECT COALESCE(SUM(instances), 0) FROM series WHERE study_key = ?",
                                    (study_key,)).fetchone()
        return int(count)

    def record_series(self, key: str, study_key: str, instances: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO series (key, study_key, instances, pulled_at) VALUES (?, ?, ?, ?)",
                         (key, study_key, instances, datetime.now(UTC).isoformat(timespec="seconds")))

    def series_count(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM series").fetchone()
        return int(count)
