"""Group commit: many C-STORE threads, one writer that indexes their instances together.

Each association thread writes and fsyncs its own file and the folders whose entries changed
(``StudyStore.write``, ``sync_dirs``; the filesystem's journal merges fsyncs that run at once),
then hands the instance to this writer and waits. The writer waits for its turn at the index
(the node's receivers take turns), takes everything queued by then and indexes it in one SQLite
commit, then releases the waiting threads, which only then answer success. Under load one
commit (one disk flush) serves several instances, and the busier the index, the larger the batch.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from concurrent.futures import Future

import structlog

from node.index import IngestChange, Received, StudyIndex

MAX_BATCH = 64
# What indexing a batch can raise: I/O and SQLite errors, and values SQLite cannot bind
# (OverflowError for an integer beyond 64 bits, ValueError/TypeError for odd types).
INGEST_ERRORS = (OSError, sqlite3.Error, OverflowError, ValueError, TypeError)


class IngestWriter:
    """Owns the thread that commits received instances to the index in batches."""

    def __init__(self, index: StudyIndex) -> None:
        self._index = index
        self._queue: queue.Queue[tuple[Received, Future[IngestChange]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._log = structlog.get_logger("pacsnode.ingest")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def submit(self, item: Received) -> Future[IngestChange]:
        future: Future[IngestChange] = Future()
        self._queue.put((item, future))
        return future

    def _take_batch(self, first: tuple[Received, Future[IngestChange]]) -> tuple[
            list[tuple[Received, Future[IngestChange]]], bool]:
        """``first`` and whatever else is queued now (up to ``MAX_BATCH``); whether a stop came."""
        batch = [first]
        stopping = False
        while len(batch) < MAX_BATCH:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                stopping = True
                break
            batch.append(nxt)
        return batch, stopping

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            try:
                with self._index.turns.turn():  # what arrives while waiting joins this batch
                    batch, stopping = self._take_batch(first)
                    changes = self._index.record_instances([item for item, _ in batch], time.time())
            except INGEST_ERRORS as exc:
                # This thread must survive what one batch raises, or every later C-STORE waits
                # for a writer that is gone and the node can no longer store.
                self._fail(batch, exc)
                continue
            for (_, future), change in zip(batch, changes):
                future.set_result(change)

    def _fail(self, batch: list[tuple[Received, Future[IngestChange]]], exc: BaseException) -> None:
        self._log.error("ingest batch failed", error=type(exc).__name__, detail=str(exc), count=len(batch))
        for _, future in batch:
            future.set_exception(exc)
