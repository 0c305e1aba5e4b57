"""Evaluation report writer: ``results.json``, ``report.md`` and PNG plots in one folder.

Generic on purpose: any evaluation (classification, segmentation, robustness) hands in a nested
dict of results and gets the same three artefacts, so every model's report reads alike.

How ``results`` is rendered in Markdown:

* top-level scalars become a bullet list under the title (put run facts such as the model, the
  split or ``ci_level`` there);
* a dict of scalars becomes a two-column table; a dict of such dicts (e.g. one row per finding, as
  :func:`models.metrics.summarise_classification` returns) becomes one table with a row per key;
  deeper dicts become sub-sections;
* a key ``X_ci`` holding ``[low, high]`` next to a key ``X`` is merged into X's cell as
  ``0.912 (0.871-0.948)``;
* ``None`` (and NaN) shows as ``n/a``.

``results.json`` holds the same data with keys sorted (so two runs diff cleanly), floats rounded
to 6 significant digits (the noise beyond is not information), NaN/inf as ``null`` (strict JSON),
and numpy values, tuples and dataclasses made plain.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["to_jsonable", "write_report"]

_SIGNIFICANT = 6


def to_jsonable(value: Any) -> Any:
    """A plain-JSON copy of ``value``: floats rounded, non-finite -> None, containers as list/dict."""
    if isinstance(value, bool | None | str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        x = float(value)
        return float(f"{x:.{_SIGNIFICANT}g}") if math.isfinite(x) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence | set | frozenset):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# --------------------------------------------------------------------------------------------------
# Markdown


def _number(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.3f}"
    return f"{x:.3g}"


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, str):
        return value.replace("|", "\\|").replace("\n", " ")
    return json.dumps(value, separators=(",", ":")).replace("|", "\\|")


def _is_interval(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def _with_ci(row: Mapping[str, Any], key: str) -> str:
    value = row[key]
    ci = row.get(f"{key}_ci")
    if not isinstance(value, int | float) or isinstance(value, bool) or not _is_interval(ci):
        return _cell(value)
    low, high = row[f"{key}_ci"]
    sep = " to " if low < 0 or high < 0 else "-"
    return f"{_cell(value)} ({_number(float(low))}{sep}{_number(float(high))})"


def _columns(row: Mapping[str, Any]) -> list[str]:
    """Keys of ``row`` to show, with an ``X_ci`` dropped when it is merged into ``X``'s cell."""
    return [k for k in row if not (k.endswith("_ci") and k[: -len("_ci")] in row)]


def _is_scalar(value: Any) -> bool:
    """Whether ``value`` fits in one table cell: a plain value, or a flat list of them."""
    plain = (type(None), bool, int, float, str)
    return isinstance(value, plain) or (isinstance(value, list) and all(isinstance(v, plain) for v in value))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _section(name: str, value: Any, depth: int) -> list[str]:
    heading = "#" * min(depth, 6) + " " + name
    if isinstance(value, dict) and value:
        if all(_is_scalar(v) for v in value.values()):
            rows = [[_cell(k), _with_ci(value, k)] for k in _columns(value)]
            return [heading, "", *_table(["", "value"], rows), ""]
        if all(isinstance(v, dict) and v and all(_is_scalar(x) for x in v.values()) for v in value.values()):
            columns: list[str] = []
            for row in value.values():
                columns += [c for c in _columns(row) if c not in columns]
            rows = [
                [_cell(k)] + [_with_ci(r, c) if c in r else "" for c in columns] for k, r in value.items()
            ]
            return [heading, "", *_table(["", *columns], rows), ""]
        scalars = {k: v for k, v in value.items() if _is_scalar(v)}
        lines = [heading, ""]
        if scalars:
            lines += [
                *_table(["", "value"], [[_cell(k), _with_ci(scalars, k)] for k in _columns(scalars)]),
                "",
            ]
        for key, sub in value.items():
            if key not in scalars:
                lines += _section(str(key), sub, depth + 1)
        return lines
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = []
        for row in value:
            columns += [c for c in _columns(row) if c not in columns]
        rows = [[_with_ci(r, c) if c in r else "" for c in columns] for r in value]
        return [heading, "", *_table(columns, rows), ""]
    return [heading, "", _cell(value), ""]


def _robustness_tables(robustness: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]) -> list[str]:
    lines = ["## Robustness", ""]
    for kind, metrics in robustness.items():
        magnitudes = sorted({float(x) for points in metrics.values() for x, _ in points})
        by_metric = {m: {float(x): y for x, y in points} for m, points in metrics.items()}
        rows = [[f"{x:g}"] + [_cell(to_jsonable(by_metric[m].get(x))) for m in metrics] for x in magnitudes]
        lines += [f"### {kind}", "", *_table([kind, *metrics], rows), ""]
    return lines


def _markdown(title: str, results: Mapping[str, Any], robustness: Any, images: Mapping[str, str]) -> str:
    lines = [f"# {title}", ""]
    facts = {k: v for k, v in results.items() if _is_scalar(v)}
    lines += [f"- **{k}**: {_with_ci(facts, k)}" for k in _columns(facts)]
    if facts:
        lines.append("")
    for key, value in results.items():
        if key not in facts:
            lines += _section(str(key), value, 2)
    if robustness:
        lines += _robustness_tables(robustness)
    for caption, file in images.items():
        lines += [f"![{caption}]({file})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# Plots


def _plot_roc(path: Path, roc: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in roc.items():
        fpr = np.asarray(curve[0], dtype=np.float64)
        tpr = np.asarray(curve[1], dtype=np.float64)
        area = float(np.trapezoid(tpr, fpr))
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {area:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_robustness(
    path: Path, robustness: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = len(robustness)
    fig = Figure(figsize=(4.5 * panels, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, (kind, metrics) in zip(axes, robustness.items()):
        for metric, points in metrics.items():
            pts = sorted((float(x), float(y)) for x, y in points if y is not None and math.isfinite(y))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=metric)
        ax.set(title=kind, xlabel=kind, ylabel="metric")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------------


def write_report(
    out_dir: Path,
    title: str,
    results: dict[str, Any],
    *,
    roc: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    robustness: dict[str, dict[str, list[tuple[float, float]]]] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and, when data are given, ``roc.png`` and ``robustness.png``.

    ``roc`` maps a finding to its ``(fpr, tpr)`` (e.g. ``metrics.roc_curve(...)[:2]``); the legend
    shows the trapezoidal AUC of each curve. ``robustness`` maps a perturbation kind to metric
    curves of ``(magnitude, value)`` points, e.g. ``{"rotation_deg": {"auc": [(-30, 0.80),
    (0, 0.90), (30, 0.81)]}}``; it gets one plot panel per kind, a Markdown table per kind, and is
    stored in ``results.json`` under ``"robustness_curves"`` so the plotted numbers stay
    machine-readable. Plots use matplotlib's Agg canvas directly on a ``Figure`` (no pyplot), so
    they need no display and leave the process-wide backend and figure registry untouched.

    Returns ``{"json": ..., "markdown": ..., "roc": ..., "robustness": ...}`` for the files
    written (plot keys only when drawn).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = to_jsonable(results)
    if not isinstance(shown, dict):
        raise TypeError("results must be a dict")
    data = dict(shown)
    if robustness:
        if "robustness_curves" in data:
            raise ValueError('results already has a "robustness_curves" key')
        data["robustness_curves"] = to_jsonable(robustness)

    paths: dict[str, Path] = {}
    images: dict[str, str] = {}
    if roc:
        paths["roc"] = out_dir / "roc.png"
        _plot_roc(paths["roc"], roc)
        images["ROC curves"] = paths["roc"].name
    if robustness:
        paths["robustness"] = out_dir / "robustness.png"
        _plot_robustness(paths["robustness"], robustness)
        images["Robustness"] = paths["robustness"].name

    paths["json"] = out_dir / "results.json"
    paths["json"].write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(_markdown(title, shown, robustness, images))
    return paths
