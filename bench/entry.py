"""What every benchmark's ``__main__`` does: SIGTERM unwinds like Ctrl-C, then ``main``'s code is the exit code.

Unwinding (instead of dying) lets each benchmark stop its node, workers, receivers and servers and
remove its temporary storage in its ``finally`` blocks.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import NoReturn


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(main: Callable[[], int]) -> NoReturn:
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
