"""How pacsnode starts and restarts Python child processes: never with the working directory on
``sys.path``, and with a back-off while a replacement keeps dying.

``python -c`` and ``python -m`` put the working directory first on the child's import path. With
an editable install a folder there named like one of our packages (a demo's ``node/`` data folder,
an ML engineer's ``models/``) becomes a namespace package ahead of ours and its subfolders shadow
our modules. ``-P`` (Python 3.11+, "safe path") prepends nothing; it is also passed on to the
children that ``multiprocessing``'s spawn start method makes from such a process.
"""

from __future__ import annotations

import sys


def pacsnode_command(*args: str) -> list[str]:
    """The argv that runs ``pacsnode ARGS...`` in a fresh interpreter of this environment."""
    return [sys.executable, "-P", "-m", "node.cli", *args]


class RestartBackoff:
    """How long to wait before the next replacement of a child process (the embedded worker, a
    receiver): 1 s after a death, doubling while replacements keep dying within ``stable_s`` of
    their start, up to ``max_s``. A child that ran ``stable_s`` before it died counts as a first
    death again, so one crash a week is not met with the back-off a crash loop earned long ago."""

    def __init__(self, stable_s: float, max_s: float) -> None:
        self.stable_s = stable_s
        self.max_s = max_s
        self.failures = 0  # consecutive deaths soon after a start
        self._started_at = 0.0

    def started(self, now: float) -> None:
        self._started_at = now

    def died(self, now: float) -> float:
        """The delay before the next start, for a child started at ``started()`` that died at ``now``."""
        self.failures = self.failures + 1 if now - self._started_at < self.stable_s else 1
        return min(self.max_s, 2.0 ** min(self.failures - 1, 30))
