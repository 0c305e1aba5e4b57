"""Group commit: many C-STORE threads index their instances together, one of them committing.

Each association thread writes and fsyncs its own file and the folders whose entries changed
(``StudyStore.write``, ``sync_dirs``; the filesystem's journal merges fsyncs that run at once),
then hands the instance to :meth:`IngestWriter.commit` and waits. The first thread that finds
nobody committing commits: it waits for its turn at the index (the node's receivers take turns),
takes everything queued by then and indexes it in one SQLite commit, then releases the threads
whose instances it indexed, which only then answer success. Under load one commit (one disk
flush) serves several instances, and the busier the index, the larger the batch.

The committing is done by the waiting threads themselves, not by a writer thread of its own:
handing each instance to such a thread and waking its sender again cost more than batching
saved (``bench/ingest``: 6 to 15 % more instances a second with 4 associations without it).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import structlog

from node.index import IngestChange, Received, StudyIndex

MAX_BATCH = 64
# What indexing a batch can raise: I/O and SQLite errors, and values SQLite cannot bind
# (OverflowError for an integer beyond 64 bits, ValueError/TypeError for odd types).
INGEST_ERRORS = (OSError, sqlite3.Error, OverflowError, ValueError, TypeError)


class IngestWriter:
    """Indexes received instances in batches, committed by the threads that wait for them."""

    def __init__(self, index: StudyIndex) -> None:
        self._index = index
        self._queued: list[tuple[Received, Future[IngestChange]]] = []
        self._queue_lock = threading.Lock()
        self._committing = threading.Lock()  # held by the thread committing a batch
        self._log = structlog.get_logger("pacsnode.ingest")

    def commit(self, item: Received, timeout_s: float) -> IngestChange:
        """Index ``item``, with whatever else is queued, durably; what the index made of it.

        Raises what indexing its batch raised (``INGEST_ERRORS``), or ``TimeoutError`` when it is
        not indexed within ``timeout_s`` because another thread's commit (stuck on the disk, say)
        held it up: it stays queued, and the next commit indexes it, as a re-send would find. The
        thread that commits waits for its turn at the index as long as a sibling receiver holds it.
        """
        future: Future[IngestChange] = Future()
        with self._queue_lock:
            self._queued.append((item, future))
        deadline = time.monotonic() + timeout_s
        while not future.done():
            if not self._committing.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise FutureTimeout(f"not indexed within {timeout_s} s")
            try:
                if not future.done():  # not in the batch the thread before this one committed
                    self._commit_queued()
            finally:
                self._committing.release()
        return future.result()

    def _commit_queued(self) -> None:
        batch: list[tuple[Received, Future[IngestChange]]] = []
        try:
            with self._index.turns.turn():  # what arrives while waiting for the turn joins this batch
                with self._queue_lock:
                    batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
                changes = self._index.record_instances([item for item, _ in batch], time.time())
        except INGEST_ERRORS as exc:
            # The batch fails, not the node: the next instance is committed as usual.
            self._fail(batch, exc)
            return
        except BaseException as exc:  # anything else also ends every wait on this batch, then goes on up
            self._fail(batch, exc)
            raise
        for (_, future), change in zip(batch, changes):
            future.set_result(change)

    def _fail(self, batch: list[tuple[Received, Future[IngestChange]]], exc: BaseException) -> None:
        self._log.error("ingest batch failed", error=type(exc).__name__, detail=str(exc), count=len(batch))
        for _, future in batch:
            future.set_exception(exc)
