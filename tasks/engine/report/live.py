"""A run's progress while it works, for someone who is not at its terminal.

The engine counts rows in :class:`RunStats`; :func:`watch_run` reads those counts every few seconds
(never per row or per request: a 10-million-row run sends 100,000 requests) and hands a
:class:`Snapshot` to a :class:`RunObserver` — in a tracked run, flows/events.py, which keeps a
Prefect progress artifact and a live table current and sends events. A stop (daily quota, budget,
provider unavailable) is told the moment the run decides it, not at the next tick.

Nothing here imports Prefect, and nothing an observer does can fail the run: its errors are logged as
warnings and the run goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tasks.engine.report.metadata import usage
from tasks.engine.send.context import RunContext, RunStats

__all__ = [
    "EVERY_ENV",
    "DEFAULT_EVERY_S",
    "MIN_EVERY_S",
    "LiveWatch",
    "RunObserver",
    "Snapshot",
    "Throttle",
    "cost_marks_passed",
    "snapshot",
    "start_watch",
    "watch_every_s",
]

log = logging.getLogger("gembatch.live")

DEFAULT_EVERY_S = 5.0
MIN_EVERY_S = 0.5
EVERY_ENV = "GEMBATCH_PROGRESS_EVERY_S"  # seconds between two updates of a tracked run's progress
# USD marks a run's cost passes, each told once (1-2-5 series: 1, 2, 5, 10, 20, 50, …).
_COST_MARK_STEPS = (1, 2, 5)
_MAX_COST_MARK = 10**7


def watch_every_s() -> float:
    """The seconds between two progress updates: ``GEMBATCH_PROGRESS_EVERY_S``, at least ``MIN_EVERY_S``."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        return max(MIN_EVERY_S, float(raw))
    except ValueError:
        raise ValueError(f"{EVERY_ENV} must be a number of seconds, got {raw!r}") from None


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """A run's counts at one moment. ``done``: rows with a result (sent, deduplicated or done before);
    ``settled``: done or failed; ``left``: neither yet."""

    total: int
    done: int
    failed: int
    requests: int
    rate_limited: int
    tokens: int
    cost_usd: float | None
    rows_per_s: float | None
    elapsed_s: float

    @property
    def settled(self) -> int:
        return self.done + self.failed

    @property
    def left(self) -> int:
        return max(0, self.total - self.settled)

    @property
    def percent(self) -> float:
        """Rows settled, in % of the rows to do (100 for an empty input)."""
        return 100.0 if self.total <= 0 else min(100.0, round(100 * self.settled / self.total, 2))

    @property
    def eta_s(self) -> float | None:
        if not self.left:
            return 0.0
        return self.left / self.rows_per_s if self.rows_per_s else None

    def counts(self) -> dict[str, Any]:
        """The numbers, as the live table and the events carry them."""
        return {
            "rows_total": self.total,
            "rows_done": self.done,
            "rows_failed": self.failed,
            "rows_left": self.left,
            "percent": self.percent,
            "requests": self.requests,
            "rate_limited_429": self.rate_limited,
            "tokens": self.tokens,
            "cost_usd": self.cost_usd,
            "rows_per_s": self.rows_per_s,
            "eta_s": None if self.eta_s is None else round(self.eta_s),
        }


def snapshot(
    stats: RunStats,
    *,
    total: int,
    model: str,
    elapsed_s: float,
    sent_since_start: int,
    per_image_usd: float | None = None,
    audio_input: bool = False,
) -> Snapshot:
    """The counts of ``stats`` now. ``sent_since_start``: rows this run settled by sending or
    deduplicating (not those done before it), which is what the rate is measured on. The cost so far
    is priced as the run metadata prices it at the end: images per image, audio at the audio price."""
    cost = usage(stats, model, per_image_usd=per_image_usd, audio_input=audio_input)[1]["estimated_usd"]
    return Snapshot(
        total=total,
        done=stats.skipped_done + stats.deduplicated + stats.succeeded,
        failed=stats.failed,
        requests=stats.requests,
        rate_limited=stats.rate_limited,
        tokens=stats.total_tokens,
        cost_usd=cost,
        rows_per_s=round(sent_since_start / elapsed_s, 2) if elapsed_s > 0 and sent_since_start else None,
        elapsed_s=round(elapsed_s, 1),
    )


class Throttle:
    """Says whether an update is due: at most one per ``every_s`` (the first one at once)."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._last: float | None = None

    def due(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self.every_s:
            return False
        self._last = now
        return True


def cost_marks_passed(before: float | None, now: float | None) -> list[int]:
    """The USD marks (1, 2, 5, 10, 20, 50, …) that a cost going from ``before`` to ``now`` passed."""
    if now is None:
        return []
    low = before or 0.0
    marks = []
    scale = 1
    while scale <= _MAX_COST_MARK:
        for step in _COST_MARK_STEPS:
            mark = step * scale
            if low < mark <= now:
                marks.append(mark)
        scale *= 10
    return marks


class RunObserver(Protocol):
    """Who hears of a run while it works (flows/events.py in a tracked run)."""

    async def started(self, document: dict[str, Any], first: Snapshot) -> None: ...

    async def progress(self, now: Snapshot) -> None: ...

    async def cost_passed(self, mark_usd: int, now: Snapshot) -> None: ...

    async def stopping(self, status: str, message: str, now: Snapshot) -> None: ...

    async def finished(self, document: dict[str, Any], last: Snapshot) -> None: ...


async def _safely(what: str, call: Any) -> None:
    """An observer's trouble (an API hiccup, a bug) is a warning: the run goes on."""
    try:
        await call
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - progress reporting must never fail a run
        log.warning("could not report the run's %s (the run goes on): %s: %s", what, type(exc).__name__, exc)


class LiveWatch:
    """The ticking side of one run: see :func:`start_watch`."""

    def __init__(self, ctx: RunContext, observer: RunObserver, *, total: int, every_s: float) -> None:
        self.ctx, self.observer, self.total, self.every_s = ctx, observer, total, every_s
        self._clock_start = time.monotonic()
        self._base = self._sent_or_deduplicated()
        self._cost: float | None = 0.0
        self._told_stop = False
        self._task: asyncio.Task | None = None
        self._throttle = Throttle(every_s)
        self._throttle.due()  # the start counts as the first update

    def _sent_or_deduplicated(self) -> int:
        s = self.ctx.stats
        return s.succeeded + s.failed + s.deduplicated

    def now(self) -> Snapshot:
        return snapshot(
            self.ctx.stats,
            total=self.total,
            model=self.ctx.job.model,
            elapsed_s=time.monotonic() - self._clock_start,
            sent_since_start=self._sent_or_deduplicated() - self._base,
            per_image_usd=getattr(self.ctx.job, "per_image_usd", None),
            audio_input=getattr(self.ctx.job, "audio_input", False),
        )

    async def _tick(self) -> None:
        now = self.now()
        if self._throttle.due():
            await _safely("progress", self.observer.progress(now))
        for mark in cost_marks_passed(self._cost, now.cost_usd):
            await _safely("cost", self.observer.cost_passed(mark, now))
        self._cost = now.cost_usd
        stopped = self.ctx.stop.reason
        if stopped is not None and not self._told_stop:
            self._told_stop = True
            await _safely("stop", self.observer.stopping(stopped.status, str(stopped), now))

    async def _run(self) -> None:
        stop = self.ctx.stop.event
        while True:
            if stop.is_set():
                await asyncio.sleep(self.every_s)
            else:
                try:
                    # A stop wakes the watch at once (its event goes out then); else it looks every ``every_s``.
                    await asyncio.wait_for(stop.wait(), timeout=self.every_s)
                except TimeoutError:
                    pass
            await self._tick()

    async def close(self) -> None:
        """Stop ticking (the end of a run that raised before :meth:`finish`)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def finish(self, document: dict[str, Any]) -> None:
        """Stop ticking; tell the observer the run's end (with its last counts)."""
        await self.close()
        last = self.now()
        if not self._told_stop and self.ctx.stop.reason is not None:
            self._told_stop = True
            await _safely("stop", self.observer.stopping(self.ctx.stop.reason.status, str(self.ctx.stop.reason), last))
        for mark in cost_marks_passed(self._cost, last.cost_usd):
            await _safely("cost", self.observer.cost_passed(mark, last))
        await _safely("end", self.observer.finished(document, last))


async def start_watch(
    ctx: RunContext, observer: RunObserver | None, document: dict[str, Any], *, total: int
) -> LiveWatch | None:
    """Tell ``observer`` the run started and keep it told every few seconds until
    :meth:`LiveWatch.finish`. None (nothing to do) without an observer."""
    if observer is None:
        return None
    watch = LiveWatch(ctx, observer, total=total, every_s=watch_every_s())
    await _safely("start", observer.started(document, watch.now()))
    watch._task = asyncio.create_task(watch._run())
    return watch
