"""How the study store writes a received file: O_DIRECT, past the page cache, byte for byte what
was received at every length around the block and buffer sizes, and buffered writes where the
filesystem refuses O_DIRECT."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from node.store import DIRECT_IO_ALIGN, DIRECT_IO_CHUNK, InstanceKey, StoreOutcome, StudyStore

LENGTHS = [0, 1, DIRECT_IO_ALIGN - 1, DIRECT_IO_ALIGN, DIRECT_IO_ALIGN + 1, 526_337, DIRECT_IO_CHUNK - 1,
           DIRECT_IO_CHUNK, DIRECT_IO_CHUNK + 1, 3 * DIRECT_IO_CHUNK + 5]


def _key(n: int) -> InstanceKey:
    return InstanceKey("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1", f"1.2.826.0.1.3680043.8.498.1.1.{n}")


@pytest.mark.parametrize("direct_io", [True, False])
def test_a_written_file_holds_exactly_the_received_bytes(tmp_path: Path, direct_io: bool) -> None:
    store = StudyStore(tmp_path / "store", direct_io=direct_io)
    for n, length in enumerate(LENGTHS):
        data = os.urandom(length)
        outcome, path = store.write(_key(n), data)
        assert outcome is StoreOutcome.STORED
        assert path.read_bytes() == data, f"{length} bytes"
        assert store.write(_key(n), data) == (StoreOutcome.DUPLICATE, path)  # and it reads back as itself
    assert store.direct_io is direct_io
    assert not list(store.incoming.iterdir())


@pytest.mark.parametrize("direct_io", [True, False])
def test_a_file_written_in_parts_holds_them_one_after_the_other(tmp_path: Path, direct_io: bool) -> None:
    """The C-STORE path writes the file meta the node built and the data set as received, unglued."""
    store = StudyStore(tmp_path / "store", direct_io=direct_io)
    for n, (head, tail) in enumerate([(0, 5), (300, 526_337), (DIRECT_IO_CHUNK - 7, 7), (DIRECT_IO_CHUNK, 1),
                                      (DIRECT_IO_ALIGN + 3, 2 * DIRECT_IO_CHUNK - 3)]):
        parts = (os.urandom(head), os.urandom(tail))
        outcome, path = store.write(_key(n), parts)
        assert outcome is StoreOutcome.STORED
        assert path.read_bytes() == parts[0] + parts[1], (head, tail)
        assert store.write(_key(n), parts[0] + parts[1]) == (StoreOutcome.DUPLICATE, path)
        assert store.write(_key(n), (parts[0], parts[1][:-1] + bytes([parts[1][-1] ^ 1])))[0] is StoreOutcome.CONFLICT


def _cached_bytes(path: Path) -> int:
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore is not installed")
def test_direct_writes_leave_no_pages_in_the_cache(tmp_path: Path) -> None:
    direct, buffered = StudyStore(tmp_path / "direct"), StudyStore(tmp_path / "buffered", direct_io=False)
    data = os.urandom(526_337)
    _, direct_path = direct.write(_key(1), data)
    _, buffered_path = buffered.write(_key(1), data)
    assert _cached_bytes(direct_path) == 0
    assert _cached_bytes(buffered_path) >= len(data)  # the check itself sees cached pages


def test_a_filesystem_that_refuses_o_direct_is_written_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs took no O_DIRECT before Linux 6.6, nor do some network filesystems: open() answers
    EINVAL. This kernel's filesystems all take it, so the refusal is simulated."""
    real_open = os.open
    refused: list[str] = []

    def open_without_direct(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            refused.append(str(path))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", open_without_direct)
    store = StudyStore(tmp_path / "store")
    data = os.urandom(DIRECT_IO_ALIGN + 1)
    outcome, path = store.write(_key(1), data)
    assert (outcome, path.read_bytes()) == (StoreOutcome.STORED, data)
    assert store.direct_io is False and len(refused) == 1
    store.write(_key(2), data)
    assert len(refused) == 1  # asked once, not for every file
    assert not list(store.incoming.iterdir())


def test_a_failing_direct_write_leaves_no_temp_file(tmp_path: Path) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    store = StudyStore(tmp_path / "store", fsync=failing_fsync)
    with pytest.raises(OSError):
        store.write(_key(1), os.urandom(1000))
    assert store.direct_io is True
    assert not list(store.incoming.iterdir())
    assert not store.path_of(_key(1)).exists()
