"""``--mode auto``'s last step: what no batch answered, sent live by the live engine, counted into the run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pyarrow.parquet as pq

from tasks.engine.plan.claims import ClaimBook
from tasks.engine.send.context import RunContext

_ADDED = ("requests", "items_sent", "retries", "rate_limited", "transient_errors", "estimated_tokens", "images")


async def send_rest_live(
    ctx: RunContext,
    totals: Any,
    source: Any,
    options: Any,
    total_rows: int,
    drive_live: Callable[..., Awaitable[None]],
    chunk_runner: Any,
    claims: ClaimBook,
) -> None:
    """Send live what no batch answered: a small remainder, failed and unfinished lines, invalid rows.

    A second pass over the input with the live engine and its own counts; only what it sends or
    writes is added to the run's counts (rows it finds done were counted already), and to ``totals.live_rows``."""
    if ctx.budget is not None:
        ctx.budget.price_factor = 1.0
    live = RunContext(
        job=ctx.job,
        conn=ctx.conn,
        limiter=ctx.limiter,
        output=ctx.output,  # what the run learnt of its output (the parts' schema) holds for this pass too
        run_id=ctx.run_id,
        retry=ctx.retry,
        budget=ctx.budget,
        outage=ctx.outage,
    )
    try:
        await drive_live(live, source, options, total_rows, chunk_runner, claims=claims)
    finally:
        s, t = live.stats, ctx.stats
        new_errors = sum(pq.read_metadata(p, filesystem=ctx.output.store.fs).num_rows for p in s.error_parts_written)
        t.succeeded += s.succeeded
        t.deduplicated += s.deduplicated
        t.failed += new_errors
        t.failed_retry_auto += s.failed_retry_auto
        for name in _ADDED:
            setattr(t, name, getattr(t, name) + getattr(s, name))
        s.add_into(t)  # the tokens
        t.parts_written += s.parts_written
        t.error_parts_written += s.error_parts_written
        totals.live_rows = s.succeeded + s.deduplicated + new_errors
        ctx.progress.advance(totals.live_rows)
        if live.stop.reason is not None:
            ctx.request_stop(live.stop.reason)
