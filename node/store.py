"""The study store: received instances as files, exactly as received, made durable before success.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Only values that
pass the UID grammar become path parts, so no dataset can name a path outside the store.
Writes go to a temp file in ``<root>/.incoming`` (same filesystem), are fsynced and renamed
into place; the caller fsyncs the folders whose entries changed (``touched_dirs``, ``sync_dirs``)
before it answers success.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.uids import InvalidUID, is_valid_uid

INCOMING = ".incoming"
DURABLE_ENTRIES_KEPT = 100_000  # folders remembered as durable (series and studies); then forgotten
QUARANTINE = ".quarantine"
DIRECT_IO_ALIGN = 4096  # O_DIRECT: buffer, offsets and lengths in whole blocks (4096 covers 512-byte devices)
DIRECT_IO_CHUNK = 1024 * 1024  # each writing thread's aligned buffer


class StoreOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical bytes already stored: nothing changes
    CONFLICT = "conflict"  # same SOP Instance UID, other bytes: kept aside in quarantine


@dataclass(frozen=True)
class InstanceKey:
    """The three UIDs that place an instance; validated on construction."""

    study_uid: str
    series_uid: str
    sop_uid: str

    def __post_init__(self) -> None:
        for keyword, value in (
            ("StudyInstanceUID", self.study_uid),
            ("SeriesInstanceUID", self.series_uid),
            ("SOPInstanceUID", self.sop_uid),
        ):
            if not is_valid_uid(value):
                raise InvalidUID(keyword, value)

    @property
    def relative_path(self) -> Path:
        return Path(self.study_uid) / self.series_uid / f"{self.sop_uid}.dcm"


class StudyStore:
    """Files of the study store; knows nothing of the index."""

    def __init__(self, root: Path, fsync: Callable[[int], None] = os.fsync, direct_io: bool = True) -> None:
        """``fsync`` is injectable so tests can observe that durability precedes the answer.

        ``direct_io``: write received files with O_DIRECT, past the page cache. Each file is
        fsynced before it is answered anyway, so caching its pages only costs: allocating and
        filling 128 new cache pages for a CT slice took 0.5 to 1.3 ms of kernel time here, more
        than a third of what receiving the instance costs (``bench/ingest``), and the pages then
        push out what readers use. Falls back to buffered writes, for good, where the filesystem
        refuses O_DIRECT. Still fsynced: O_DIRECT leaves the data in the device's cache and the
        file's size and blocks unjournaled.
        """
        self.root = root
        self._fsync = fsync
        self.direct_io = direct_io
        self._buffers = threading.local()
        self.incoming = root / INCOMING
        self.quarantine = root / QUARANTINE
        self._durable_entries: set[tuple[str, int]] = set()  # (folder, inode) whose entry is fsynced
        self._durable_lock = threading.Lock()
        for folder in (self.root, self.incoming, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)

    def path_of(self, key: InstanceKey) -> Path:
        return self.root / key.relative_path

    def resolve(self, relative: str | Path) -> Path:
        """An absolute path for a store-relative one, refusing anything that leaves the store."""
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root.resolve()):
            raise ValueError(f"path leaves the study store: {relative}")
        return candidate

    def _write_temp(self, parts: Sequence[bytes]) -> Path:
        temp = self.incoming / f"{secrets.token_hex(8)}.part"
        direct = self.direct_io
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0), 0o640)
            try:
                if direct:
                    self._write_direct(fd, parts)
                else:
                    for part in parts:
                        _write_all(fd, memoryview(part))
                self._fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            temp.unlink(missing_ok=True)
            if direct and isinstance(exc, OSError) and exc.errno == errno.EINVAL:
                self.direct_io = False  # the filesystem takes no O_DIRECT (tmpfs, some network ones)
                return self._write_temp(parts)
            raise
        return temp

    def _write_direct(self, fd: int, parts: Sequence[bytes]) -> None:
        """Write ``parts`` one after the other past the page cache: through this thread's aligned
        buffer, a chunk at a time, the last one padded to the block size and the file cut back."""
        buffer: mmap.mmap | None = getattr(self._buffers, "buffer", None)
        if buffer is None:
            buffer = self._buffers.buffer = mmap.mmap(-1, DIRECT_IO_CHUNK)  # page-aligned, as O_DIRECT needs
        filled = 0
        with memoryview(buffer) as aligned:
            for part in parts:
                source = memoryview(part)
                while source:
                    taken = min(len(source), DIRECT_IO_CHUNK - filled)
                    aligned[filled:filled + taken] = source[:taken]
                    filled, source = filled + taken, source[taken:]
                    if filled == DIRECT_IO_CHUNK:
                        _write_all(fd, aligned)
                        filled = 0
            if filled:
                padded = -(-filled // DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN
                aligned[filled:padded] = bytes(padded - filled)
                _write_all(fd, aligned[:padded])
        length = sum(len(part) for part in parts)
        if length % DIRECT_IO_ALIGN:
            os.ftruncate(fd, length)

    def write(self, key: InstanceKey, data: bytes | Sequence[bytes]) -> tuple[StoreOutcome, Path]:
        """Store ``data`` (the file's bytes, or its parts in order) durably (file fsynced, renamed);
        returns the outcome and the final path.

        The folders touched still need ``sync_dirs_of`` before the instance counts as durable.
        Raises OSError when the bytes cannot be made durable.
        """
        parts = _parts_of(data)
        final = self.path_of(key)
        if self._holds(final, parts):
            return StoreOutcome.DUPLICATE, final
        temp = self._write_temp(parts)  # the slow part (fsync) runs outside any lock
        # Placed with link(2), which fails if the name exists: of two concurrent writes of one SOP
        # Instance UID, in threads or in receiver processes, the later one finds the earlier in
        # place and never replaces an instance already answered.
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(temp, final)
        except FileExistsError:
            if self._holds(final, parts):
                temp.unlink()
                return StoreOutcome.DUPLICATE, final
            return StoreOutcome.CONFLICT, self.set_aside(temp, key)
        temp.unlink()
        return StoreOutcome.STORED, final

    def set_aside(self, path: Path, key: InstanceKey) -> Path:
        """Move a conflicting copy of an instance into quarantine (same filesystem: a rename)."""
        aside = self.quarantine / "conflicts" / key.study_uid / f"{key.sop_uid}.{secrets.token_hex(4)}.dcm"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, aside)
        return aside

    @staticmethod
    def _holds(path: Path, parts: Sequence[bytes]) -> bool:
        """True when ``path`` is a file with exactly the bytes of ``parts``, one after the other."""
        try:
            if path.stat().st_size != sum(len(part) for part in parts):
                return False
            content = memoryview(path.read_bytes())
        except FileNotFoundError:
            return False
        offset = 0
        for part in parts:
            if content[offset:offset + len(part)] != part:
                return False
            offset += len(part)
        return True

    def quarantine_rejected(self, parts: Sequence[bytes], reason: str) -> Path:
        """Keep a refused dataset (its bytes, in parts) for inspection: bad input is answered with
        a failure, not lost."""
        temp = self._write_temp(parts)
        folder = self.quarantine / "rejected"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{temp.stem}.dcm"
        os.replace(temp, target)
        target.with_suffix(".reason").write_text(reason + "\n")
        return target

    def touched_dirs(self, path: Path) -> list[Path]:
        """Folders to fsync so that a file just placed at ``path`` keeps its name after a crash: its
        own folder (the new entry), and each folder above it, up to two levels (study, store
        root), whose entry for the folder below is not yet known durable.

        Each fsync costs a disk cache flush (about 3 ms here) even on an unchanged folder, so
        folders are fsynced once per series and study, not for every instance. "Known durable" is
        kept per (path, inode) by this process after it fsynced the parent itself: a folder
        another receiver made, or one retired and made again, is fsynced here once more.
        """
        folders = [path.parent]
        child = path.parent
        for _ in range(2):
            if self._entry_durable(child):
                break
            folders.append(child.parent)
            child = child.parent
        return folders

    def sync_dirs_of(self, path: Path) -> None:
        """Make the name of the one file just placed at ``path`` durable (``touched_dirs``)."""
        self.sync_dirs(set(self.touched_dirs(path)))

    def _entry_durable(self, folder: Path) -> bool:
        inode = _inode(folder)
        with self._durable_lock:
            return inode is not None and (str(folder), inode) in self._durable_entries

    def sync_dirs(self, folders: set[Path]) -> None:
        """fsync each folder once (deepest first), for one write or a batch of them. Afterwards the
        entries of the folders below them are known durable."""
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._fsync(fd)
            finally:
                os.close(fd)
        # touched_dirs gives a chain (series, study, root): each folder whose parent was fsynced
        # along with it has a durable entry now.
        durable = [(str(folder), inode) for folder in folders
                   if folder.parent in folders and (inode := _inode(folder)) is not None]
        with self._durable_lock:
            if len(self._durable_entries) + len(durable) > DURABLE_ENTRIES_KEPT:
                self._durable_entries.clear()  # forgetting only costs an fsync more
            self._durable_entries.update(durable)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def usage(self) -> tuple[int, int]:
        """(total, used) bytes of the filesystem holding the store."""
        usage = shutil.disk_usage(self.root)
        return usage.total, usage.used

    def retire_study(self, study_uid: str) -> Path | None:
        """Move a study's folder out of the store (atomic); ``delete_retired`` frees the space."""
        if not is_valid_uid(study_uid):
            raise InvalidUID("StudyInstanceUID", study_uid)
        folder = self.root / study_uid
        if not folder.exists():
            return None
        target = self.quarantine / "purged" / f"{study_uid}.{secrets.token_hex(4)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, target)
        return target

    @staticmethod
    def delete_retired(folder: Path) -> int:
        """Delete a retired study folder; returns the bytes freed."""
        freed = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        return freed


def _parts_of(data: bytes | Sequence[bytes]) -> Sequence[bytes]:
    return (data,) if isinstance(data, bytes) else data


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _inode(path: Path) -> int | None:
    """The inode number of ``path``; None once it is gone (retired meanwhile)."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
