"""Entry point: ``python -m bench.archive`` (or ``python bench/archive``)."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    if not __package__:  # run as ``python bench/archive``: make the repository root importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.archive.run import main
    from bench.entry import run

    run(main)
