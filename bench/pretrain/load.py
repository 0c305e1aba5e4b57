"""How much of the machine other processes used while a part ran: shared boxes skew absolute figures.

``/proc/stat`` gives the CPU time the whole machine spent busy; ``getrusage`` gives this process's
and its reaped children's (the spawned measurement processes, DataLoader and pool workers). The
difference, over the wall time, is what everything else took - other engineers' test runs, say.
Ratios measured in one process with interleaved variants suffer far less from it than rates do.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Self


def _machine_busy_s() -> float | None:
    """Non-idle CPU seconds of all CPUs since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle
    return busy / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Load:
    """CPU use by others during a stretch of wall time, as a share of all CPUs."""

    wall_s: float
    own_cpu_s: float
    other_cpu_s: float | None
    cpus: int
    loadavg_start: float
    loadavg_end: float

    @property
    def other_share(self) -> float | None:
        """Share of the machine's CPU capacity that other processes used (0..1)."""
        if self.other_cpu_s is None or self.wall_s <= 0:
            return None
        return max(0.0, self.other_cpu_s) / (self.wall_s * self.cpus)

    def as_dict(self) -> dict[str, object]:
        share = self.other_share
        return {"wall_s": round(self.wall_s, 2), "own_cpu_s": round(self.own_cpu_s, 2),
                "other_cpu_s": None if self.other_cpu_s is None else round(max(0.0, self.other_cpu_s), 2),
                "other_share_of_machine": None if share is None else round(share, 3),
                "cpus": self.cpus, "loadavg_1m_start": self.loadavg_start, "loadavg_1m_end": self.loadavg_end}


class LoadMonitor:
    """``with LoadMonitor() as m: ...`` then ``m.result``: what others used meanwhile."""

    def __init__(self) -> None:
        self.result: Load | None = None
        self._start: tuple[float, float | None, float, float] = (0.0, None, 0.0, 0.0)

    def __enter__(self) -> Self:
        self._start = (time.monotonic(), _machine_busy_s(), _own_s(), os.getloadavg()[0])
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0, load0 = self._start
        busy1 = _machine_busy_s()
        own = _own_s() - own0
        other = busy1 - busy0 - own if busy0 is not None and busy1 is not None else None
        self.result = Load(time.monotonic() - wall0, own, other, os.cpu_count() or 1, round(load0, 2),
                           round(os.getloadavg()[0], 2))
