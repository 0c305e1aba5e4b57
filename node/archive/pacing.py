"""Being gentle with a clinical PACS: a time window for pulling and a cap on images per second.

Both take a clock, so their rules are tested without waiting for the night; the pull passes the
wall clock. The rate cap is applied in our C-STORE handler: answering later slows the PACS's
sender by exactly as much, whichever of C-MOVE or C-GET carries the images.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as clock_time

WINDOW = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


def _at(hour: str, minute: str, text: str) -> clock_time:
    if int(hour) > 23 or int(minute) > 59:
        raise ValueError(f"--window {text!r}: hours run 00-23 and minutes 00-59")
    return clock_time(int(hour), int(minute))


@dataclass(frozen=True)
class TimeWindow:
    """Local times between which pulling may run; ``19:00-07:00`` wraps past midnight."""

    start: clock_time
    end: clock_time

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        match = WINDOW.match(text.strip())
        if match is None:
            raise ValueError(f"--window {text!r}: expected HH:MM-HH:MM, e.g. 19:00-07:00")
        start, end = _at(match[1], match[2], text), _at(match[3], match[4], text)
        if start == end:
            raise ValueError(f"--window {text!r}: start and end are the same time; leave --window out to pull "
                             "at any time")
        return cls(start, end)

    def is_open(self, now: datetime) -> bool:
        moment = now.time()
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def opens_in(self, now: datetime) -> float:
        """Seconds until the window is open (0 when it is)."""
        if self.is_open(now):
            return 0.0
        opening = now.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        if opening <= now:
            opening += timedelta(days=1)
        return (opening - now).total_seconds()

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


class RateCap:
    """At most ``per_second`` images per second over all concurrent retrievals (a token bucket of
    one second's burst). ``take`` blocks the calling C-STORE handler until its image may pass."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if per_second <= 0:
            raise ValueError(f"--rate {per_second}: images per second must be above 0")
        self.per_second = per_second
        self._clock, self._sleep = clock, sleep
        self._tokens = 1.0
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(max(1.0, self.per_second), self._tokens + (now - self._last) * self.per_second)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.per_second if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
