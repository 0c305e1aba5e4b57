"""Cold-ish reads without root: evict given files from the page cache, and check that it worked.

Dropping the whole page cache (``/proc/sys/vm/drop_caches``) needs root and disturbs everything
else on the machine. ``posix_fadvise(POSIX_FADV_DONTNEED)`` drops the clean pages of just the
files it is given (after ``fdatasync``, every page is clean), so a pass that follows reads them
from disk again. The kernel may ignore the advice (some filesystems, pages mapped by another
process), hence ``resident_fraction`` (``mincore``), which the report quotes next to the figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def evict(paths: Iterable[str | Path]) -> None:
    """Ask the kernel to drop the cached pages of ``paths`` (written back first, so they are clean)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: Iterable[str | Path]) -> float | None:
    """Share of the pages of ``paths`` now in the page cache (``mincore``); None where unsupported."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapped:
            view = np.frombuffer(mapped, dtype=np.uint8)
            try:
                if libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vector) != 0:
                    return None
            finally:
                del view  # release the buffer before the mapping closes
        resident += sum(byte & 1 for byte in vector)
        total += pages
    return resident / total if total else None
