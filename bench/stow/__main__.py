"""Entry point: ``python -m bench.stow`` (or ``python bench/stow``)."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as ``python bench/stow``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.entry import run
from bench.stow.run import main

if __name__ == "__main__":
    run(main)
