"""Entry point: ``python -m bench.e2e`` (or ``python bench/e2e``)."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as ``python bench/e2e``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.e2e.run import main
from bench.entry import run

if __name__ == "__main__":
    run(main)
