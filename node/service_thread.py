"""The one shape of the node's background loops (assembler, dispatcher, report consumer, exporter).

Each runs ``_run`` on a named daemon thread until ``stop``; ``_stop`` is also what the loop sleeps
on, so stopping wakes it at once instead of after its poll interval.
"""

from __future__ import annotations

import threading


class ServiceThread:
    def __init__(self, name: str, join_timeout_s: float = 15.0) -> None:
        self._stop = threading.Event()
        self._join_timeout_s = join_timeout_s
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._join_timeout_s)

    def _run(self) -> None:
        raise NotImplementedError
