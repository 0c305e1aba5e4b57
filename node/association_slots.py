"""Association counts shared by a node's receiver processes, so that ``max_associations`` and
``max_associations_per_host`` hold over all of them, not per process.

A small file in the node's run folder holds one row per receiver: its open connections in all,
then per host bucket (a host's bucket is a hash of its address; two hosts sharing a bucket are
limited together, which only errs on the strict side). Each receiver writes only its own row,
always as a fresh count of what it holds (pynetdicom's live associations plus connections still
starting), never as increments, so a row cannot drift. A receiver checks the sum of all rows and
publishes its new row under ``flock(2)``, so two receivers cannot both take the last slot. The
lock dies with its holder; the node zeroes the row of a receiver that died.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

BUCKETS = 1021
ROW = 1 + BUCKETS  # open connections in all, then per host bucket
_ITEM = array("i").itemsize  # the table holds C ints (int32 here)


def host_bucket(host: str) -> int:
    return int.from_bytes(hashlib.blake2b(host.encode(), digest_size=4).digest(), "little") % BUCKETS


class AssociationSlots:
    """The shared table; ``receiver`` is this process's row (None for the node, which only clears)."""

    def __init__(self, path: Path, receivers: int, receiver: int | None = None) -> None:
        self.path = path
        self.receiver = receiver
        size = receivers * ROW * _ITEM
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._lock_fd = os.open(path, os.O_RDWR)
        self._receivers = receivers
        self._cells = memoryview(self._map).cast("i")  # receivers x ROW int32, row after row

    @classmethod
    def create(cls, path: Path, receivers: int) -> AssociationSlots:
        """A zeroed table for a node starting now (what an earlier, killed node left is void)."""
        path.unlink(missing_ok=True)
        return cls(path, receivers)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @staticmethod
    def _own(hosts: Iterable[str]) -> list[int]:
        row = [0] * ROW
        for host in hosts:
            row[0] += 1
            row[1 + host_bucket(host)] += 1
        return row

    def _write_row(self, receiver: int, row: list[int]) -> None:
        self._cells[receiver * ROW:(receiver + 1) * ROW] = memoryview(array("i", row))

    def _column(self, column: int) -> list[int]:
        """One cell of every receiver's row."""
        return [self._cells[receiver * ROW + column] for receiver in range(self._receivers)]

    def admit(self, host: str, held: Iterable[str], max_per_host: int) -> bool:
        """Take a slot for a new connection from ``host`` if the node-wide per-host limit allows;
        ``held`` are the hosts of this receiver's other connections. Admitted: this receiver's row
        now counts the new connection. (The node-wide total is judged once the association request
        has come, so that it is refused with A-ASSOCIATE-RJ as pynetdicom refuses its own limit.)"""
        assert self.receiver is not None, "only a receiver admits connections"
        mine = self._own([*held, host])
        bucket = 1 + host_bucket(host)
        with self._locked():
            in_bucket = self._column(bucket)
            if sum(in_bucket) - in_bucket[self.receiver] + mine[bucket] > max_per_host:
                return False
            self._write_row(self.receiver, mine)
        return True

    def publish(self, held: Iterable[str]) -> None:
        """This receiver's row, counted afresh (after connections closed)."""
        assert self.receiver is not None, "only a receiver publishes"
        mine = self._own(held)
        with self._locked():
            self._write_row(self.receiver, mine)

    def clear(self, receiver: int) -> None:
        """Free what a receiver that died held (the node, before it starts the replacement)."""
        with self._locked():
            self._write_row(receiver, [0] * ROW)

    def connections(self) -> int:
        """Open connections over all receivers."""
        with self._locked():
            return sum(self._column(0))

    def has_fewest(self) -> bool:
        """Whether this receiver holds no more connections than any other (read without the lock:
        a hint for spreading connections, not a limit)."""
        assert self.receiver is not None, "only a receiver asks"
        totals = self._column(0)
        return totals[self.receiver] <= min(totals)

    def held_by(self, receiver: int) -> int:
        with self._locked():
            return int(self._cells[receiver * ROW])

    def close(self) -> None:
        os.close(self._lock_fd)
        self._cells.release()
        self._map.close()
