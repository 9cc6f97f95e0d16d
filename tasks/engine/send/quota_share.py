"""What a tracked run shares with the others on its key and model: a limit's pace, a daily-quota stop.

The shared quota itself is tasks/engine/send/shared_limits.py."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from tasks.engine.send.context import RunContext
from tasks.engine.send.limits import Limits
from tasks.errors import RunStopped

if TYPE_CHECKING:
    from tasks.engine.send.shared_limits import SharedLimits

__all__ = ["DAILY_QUOTA", "paced_by", "share_stops"]

DAILY_QUOTA = "stopped: daily quota"


def paced_by(limits: Limits, shared: SharedLimits | None) -> Limits:
    """A limit an operator keeps in Prefect (no --rpm here) paces this run like --rpm would."""
    per_window = shared.rpm_per_window if shared is not None else None
    if limits.rpm is not None or per_window is None:
        return limits
    return dataclasses.replace(limits, rpm=per_window)


async def share_stops(ctx: RunContext, shared: Any) -> None:
    """A daily-quota stop is everyone's: this run's is told to the others on the key and model, and
    theirs stops this run (ending ``stopped: daily quota``, resumable)."""
    own = asyncio.create_task(ctx.stop.event.wait())
    theirs = asyncio.create_task(shared.stop.event.wait())
    poll = asyncio.create_task(shared.stop.watch())
    try:
        await asyncio.wait({own, theirs}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (own, theirs, poll):
            task.cancel()
        await asyncio.gather(own, theirs, poll, return_exceptions=True)
    if shared.stop.is_set():
        ctx.request_stop(RunStopped(DAILY_QUOTA, shared.stop.message))
    elif ctx.stop.reason is not None and ctx.stop.reason.status == DAILY_QUOTA:
        await shared.stop_everyone(str(ctx.stop.reason))
