"""Where every benchmark's figures go: ``bench/results/<name>-<UTC timestamp>.json`` and
``<name>-latest.json``, each written via a temporary file so a reader never sees half a file."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(name: str, payload: dict[str, object], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` as this run's file and as ``<name>-latest.json``; returns this run's path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(payload, indent=2, default=str) + "\n"
    path = results_dir / f"{name}-{stamp}.json"
    for target in (path, results_dir / f"{name}-latest.json"):
        temp = target.with_name(target.name + ".tmp")
        temp.write_text(text)
        temp.replace(target)
    return path
