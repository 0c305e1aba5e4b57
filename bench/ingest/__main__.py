"""Entry point: ``python -m bench.ingest`` (or ``python bench/ingest``)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

if not __package__:  # run as ``python bench/ingest``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ingest.run import main


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so receivers are stopped and temp storage removed."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
