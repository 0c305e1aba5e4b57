"""Optional py-spy profile of ``pacsnode serve`` while it receives with 4 associations.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;...;leaf count``);
``summarise_raw`` attributes each sample to the first frame, leaf upwards, that belongs to a
known part of the ingest path, and lists the hottest leaf lines.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.ingest.receivers import Receiver

PY_SPY_RATE = 200
STOP_TIMEOUT_S = 60.0
TOP_LINES = 25

# (pattern on a frame's "function (file:line)", category); the first match walking leaf -> root wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    (r"\(node/headers\.py", "header parse (node/headers.py, pydicom)"),
    (r"_write_temp \(node/store\.py", "file write + fsync (store._write_temp)"),
    (r"sync_dirs \(node/store\.py", "folder fsync (store.sync_dirs)"),
    (r"\(node/store\.py", "store other (exists/mkdir/rename)"),
    (r"\(node/index\.py", "SQLite index (record_instances, is_produced)"),
    (r"\(node/ingest\.py", "group commit (node/ingest.py)"),
    (r"\(concurrent/futures/", "waiting for the group commit"),
    (r"\(node/scp\.py", "on_store other"),
    (r"\(node/(assembler|dispatcher|reports|service|metrics)\.py", "other node threads"),
    (r"\((pynetdicom/)?events\.py", "pynetdicom event/encoded_dataset"),
    (r"\((pynetdicom/)?(dimse|dimse_messages|dimse_primitives|dsutils)\.py", "pynetdicom DIMSE"),
    (r"\((pynetdicom/)?(dul|pdu|pdu_primitives|transport|fsm|acse)\.py", "pynetdicom DUL/PDU/socket"),
    (r"\((pynetdicom/)?association\.py", "pynetdicom association loop"),
    (r"\((prometheus_client|structlog)/", "metrics/logging"),
)
_FRAME_SPLIT = re.compile(r";")


def py_spy() -> str | None:
    """py-spy next to the running interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def categorise(frames: list[str]) -> str:
    for frame in reversed(frames):
        for pattern, name in CATEGORIES:
            if re.search(pattern, frame):
                return name
    return "other"


def summarise_raw(raw: Path) -> dict[str, object]:
    """Samples per category and per hottest leaf line, from a py-spy raw file."""
    by_category: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _FRAME_SPLIT.split(stack)
        thread = next((f for f in frames if f.startswith("thread")), "")
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        total += count
        by_category[categorise(frames)] += count
        by_leaf[frames[-1] if frames else "?"] += count
        by_thread[thread] += count
    return {
        "samples": total,
        "categories": {k: round(100 * v / max(total, 1), 1) for k, v in by_category.most_common()},
        "top_leaf_lines": {k: round(100 * v / max(total, 1), 1) for k, v in by_leaf.most_common(TOP_LINES)},
        "threads": {k: round(100 * v / max(total, 1), 1) for k, v in by_thread.most_common()},
    }


def format_summary(summary: dict[str, object]) -> str:
    lines = [f"py-spy: {summary['samples']} samples"]
    for title in ("categories", "top_leaf_lines"):
        lines.append(f"  {title} (% of samples):")
        table = summary[title]
        assert isinstance(table, dict)
        lines += [f"    {share:5.1f}  {name}" for name, share in table.items()]
    return "\n".join(lines)


def profiled_run(out: Path, run: Callable[[Callable[[Receiver], Callable[[], None]]], object],
                 extra: tuple[str, ...] = ("--threads", "--nonblocking")) -> dict[str, object]:
    """One more pacsnode run with py-spy attached; returns the run and the profile summary."""
    exe = py_spy()
    if exe is None:
        print("py-spy not installed (pip install py-spy): no profile", file=sys.stderr)
        return {"error": "py-spy not installed"}
    out.parent.mkdir(parents=True, exist_ok=True)

    def attach(receiver: Receiver) -> Callable[[], None]:
        spy = subprocess.Popen([exe, "record", "--pid", str(receiver.pid), "--rate", str(PY_SPY_RATE),
                                "--format", "raw", "--output", str(out), *extra],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def detach() -> None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()

        return detach

    result = run(attach)
    if not out.exists():
        return {"error": "py-spy wrote nothing (ptrace not permitted?)", "run": str(result)}
    summary = summarise_raw(out)
    as_dict = getattr(result, "as_dict", None)
    print(f"profiled run (py-spy {' '.join(extra)}): {as_dict() if callable(as_dict) else result}")
    print(format_summary(summary))
    return {"raw": str(out), "py_spy_args": list(extra),
            "run": as_dict() if callable(as_dict) else str(result),
            **summary}
