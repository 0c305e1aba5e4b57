"""Entry point: ``python -m bench.pretrain`` (or ``python bench/pretrain``).

The imports happen under the ``__main__`` guard: spawned worker processes (index, prepare, the
measurement processes) re-run this file as ``__mp_main__``, and must not pay for importing torch
and the whole benchmark just to read DICOM headers - that would inflate the index figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    if not __package__:  # run as ``python bench/pretrain``: make the repository root importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.entry import run
    from bench.pretrain.run import main

    run(main)
