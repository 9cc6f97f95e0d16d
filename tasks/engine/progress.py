"""A terminal progress bar: rows done, rows/s, ETA and 429s."""

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

from tasks.engine.chunk import RunStats

__all__ = ["ProgressBar"]


class ProgressBar:
    def __init__(self, label: str, total: int | None, stats: RunStats, *, enabled: bool) -> None:
        self._stats = stats
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
                console=Console(file=sys.stderr),
                transient=False,
            )
            if enabled
            else None
        )
        self._task = None
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(label, total=total, rate="-", rate_limited=0)

    def advance(self, rows: int) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._task, rows)
        speed = self._progress.tasks[0].speed
        self._progress.update(self._task, rate=f"{speed:,.0f}" if speed else "-", rate_limited=self._stats.rate_limited)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
