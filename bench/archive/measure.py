"""One pipeline step as a child process: its wall time, its own peak RSS (``wait4``, exact) and the
peak of its whole process tree (the step's worker processes included), sampled from ``/proc``."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_S = 0.1


@dataclass(frozen=True)
class StepRun:
    seconds: float
    peak_rss_main_mb: float
    peak_rss_tree_mb: float
    output: str


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def run_step(command: list[str], log: Path) -> StepRun:
    """Run ``command`` to the end (output to ``log``); raise if it fails."""
    peak = [0]
    done = threading.Event()
    with log.open("wb") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.wait(SAMPLE_S):
                peak[0] = max(peak[0], sum(_rss_kb(p) for p in _tree(process.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    output = log.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {process.returncode}:\n{output[-2000:]}")
    return StepRun(seconds, usage.ru_maxrss / 1024, max(peak[0], usage.ru_maxrss) / 1024, output)
