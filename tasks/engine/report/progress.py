"""A terminal progress bar: rows done, rows/s, ETA and 429s (and audio minutes done, for recordings)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from tasks.engine.send.context import RunStats
from tasks.engine.send.context_parts import ProgressSink

__all__ = ["ProgressBar"]


class ProgressBar(ProgressSink):
    def __init__(
        self, label: str, total: int | None, stats: RunStats, *, enabled: bool, unit: str | None = None
    ) -> None:
        """``unit``: a job that measures its work in something besides rows (``audio min``) shows it
        too, fed by :meth:`add_units` in seconds."""
        self._stats = stats
        self._unit = unit
        self._units_s = 0.0
        extra = [TextColumn("{task.fields[units]}")] if unit else []
        self._progress = (
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("429s: {task.fields[rate_limited]}"),
                *extra,
                console=Console(file=sys.stderr),
                transient=False,
            )
            if enabled
            else None
        )
        self._task = None
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(label, total=total, rate="-", rate_limited=0, units=self._units_text())

    def advance(self, rows: int) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._task, rows)
        speed = self._progress.tasks[0].speed
        self._progress.update(self._task, rate=f"{speed:,.0f}" if speed else "-", rate_limited=self._stats.rate_limited)

    def add_units(self, seconds: float) -> None:
        self._units_s += seconds
        if self._progress is not None and self._unit:
            self._progress.update(self._task, units=self._units_text())

    def _units_text(self) -> str:
        return f"{self._units_s / 60:,.1f} {self._unit} done" if self._unit else ""

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
