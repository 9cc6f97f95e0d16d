"""How a run ended, as the run metadata reports it: status, counts, requests, tokens, cost, throughput."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tasks.engine.report.metadata import batch_cost, counts, usage
from tasks.engine.send.batch.batch_run import BatchRun
from tasks.engine.send.context import RunContext
from tasks.engine.send.limits import AdaptiveLimiter

__all__ = ["Ending", "outcome"]


@dataclass(frozen=True)
class Ending:
    """When the run started and ended, and the status and message it ended with."""

    started: datetime
    finished: datetime
    status: str
    message: str


def outcome(ctx: RunContext, limiter: AdaptiveLimiter, batch_run: BatchRun | None, ended: Ending) -> dict[str, Any]:
    """The run metadata's fields on how the run ended: counts, requests, tokens, cost, throughput."""
    job, stats = ctx.job, ctx.stats
    duration = (ended.finished - ended.started).total_seconds()
    audio_input = getattr(job, "audio_input", False)
    tokens, cost = usage(stats, job.model, per_image_usd=getattr(job, "per_image_usd", None), audio_input=audio_input)
    batches = {}
    if batch_run is not None:
        cost = batch_cost(cost, batch_run.totals.tokens, job.model, audio_input=audio_input)
        batches = {"batches": batch_run.describe()}
    if stats.rerouted:
        # Priced at the model asked for; a provider may bill rerouted requests at the answering
        # model's price (reported for gemini-2.5-flash, unconfirmed).
        cost["rerouted_rows_priced_as"] = job.model
    return batches | {
        "status": ended.status,
        "message": ended.message,
        "finished_at": ended.finished.isoformat(),
        "duration_s": round(duration, 3),
        "counts": counts(stats),
        "requests": {
            "sent": stats.requests,
            "items_sent": stats.items_sent,
            "retries": stats.retries,
            "rate_limited_429": stats.rate_limited,
            "transient_errors": stats.transient_errors,
        },
        # Provider outages: how often the run paused, for how long, and the probes it sent.
        "outage": ctx.outage.describe(),
        # Failed rows by what a rerun does with them (retry column of _errors/).
        "failed_rows": {
            "retry_auto": stats.failed_retry_auto,
            "retry_on_request": stats.failed - stats.failed_retry_auto,
        },
        "tokens": tokens,
        "cost": cost,
        "throughput": {
            "rows_per_s": round((stats.succeeded + stats.deduplicated) / duration, 2) if duration else None,
            "requests_per_s": round(stats.requests / duration, 2) if duration else None,
        },
        "limits": limiter.describe(),
    }
