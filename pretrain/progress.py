"""The progress display of the long pretraining steps (index, prepare): a count and its rate.

Neither step knows its total up front (the archive walk and the series stream are generators,
so that memory stays flat), so the bar shows what is done and how fast, not a percentage.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second over the whole run so far (rich's own speed column is a short moving mean)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} {self.unit}/s", style="progress.data.speed")


def rate_progress(unit: str, enabled: bool) -> AbstractContextManager[Progress | None]:
    """A running rich progress display (or ``None`` when disabled) with count, rate and time."""
    if not enabled:
        return nullcontext(None)
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        TextColumn("{task.completed:,.0f} " + unit),
        RateColumn(unit),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        transient=False,
    )
