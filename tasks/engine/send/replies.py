"""What one reply of the live path does to the run: its usage counted, the stop it may call for, and
each row's outcome (or a second ask for the rows the reply says to ask again)."""

from __future__ import annotations

import logging
from typing import Any

from tasks.engine.job import MAX_RAW_REPLY_CHARS, Item, Outcome, Reply, RowFailure
from tasks.engine.send.context import RunContext, rerouted_stop
from tasks.errors import RunStopped
from tasks.provider.catalog import same_model
from tasks.provider.client import Connection

__all__ = ["count_reply", "reply_stop", "take_results"]

log = logging.getLogger("gembatch.engine")


def count_reply(stats: Any, reply: Reply) -> None:
    stats.prompt_tokens += reply.prompt_tokens
    stats.completion_tokens += reply.completion_tokens
    stats.total_tokens += reply.total_tokens
    stats.images += reply.images
    if reply.first_token_s is not None:
        stats.first_token.add(reply.first_token_s)


def reply_stop(ctx: RunContext, items: list[Item], reply: Reply) -> RunStopped | None:
    """What stops the run at this reply, if anything: a reply the job can't take as asked (vectors of
    another size), or, for embeddings, another model than the one asked for (one index must not hold
    vectors of two models). A rerouted model is counted (and told once) either way."""
    job, stats = ctx.job, ctx.stats
    wrong = getattr(job, "stop_for", None)
    stop = wrong(reply, ctx.output.store.url) if wrong is not None else None
    if stop is not None:
        return stop
    served = reply.served_model
    if served is None or same_model(job.model, served):
        return None
    stats.rerouted[served] = stats.rerouted.get(served, 0) + len(items)
    if stats.rerouted[served] == len(items):
        log.warning(
            "%s asked for %s, and the reply says %s answered (the provider rerouted the model)",
            job.name, job.model, served,
        )  # fmt: skip
    if getattr(job, "stop_on_reroute", False):
        return rerouted_stop(job, served, ctx.output.store.url)
    return None


def take_results(
    ctx: RunContext, items: list[Item], reply: Reply, attempts: int, outcomes: dict[str, Outcome | None]
) -> list[Item]:
    """Each item's outcome from the reply; returns the items whose failure says to ask again."""
    again: list[Item] = []
    for item, result in zip(items, reply.results):
        if not isinstance(result, RowFailure):
            outcomes[item.content_hash] = Outcome(result=result, attempts=attempts, served_model=reply.served_model)
        elif result.ask_again and attempts < ctx.retry.max_row_failure_attempts:
            again.append(item)
        else:
            outcomes[item.content_hash] = Outcome(
                error_type=result.kind,
                error_message=ctx.conn.redact(result.message),
                attempts=attempts,
                raw_reply=_raw_kept(ctx.conn, result.raw_reply),
            )
    return again


def _raw_kept(conn: Connection, raw: str | None) -> str | None:
    if raw is None:
        return None
    raw = conn.redact(raw)  # before cutting, so no part of the key survives at the cut
    if len(raw) > MAX_RAW_REPLY_CHARS:
        raw = f"{raw[:MAX_RAW_REPLY_CHARS]}… [cut: {len(raw)} characters in all]"
    return raw
