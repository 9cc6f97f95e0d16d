"""The live path's requests: a chunk's rows sent through the limiter, the outage breaker and the budget, retried.

Each request waits for the outage breaker and its turn at the limiter, reserves its cost in the budget,
and goes out; a transient failure is retried, a bad input found by splitting the request, a fatal one
stops the run. :func:`send_all` fans a chunk's rows out and lets requests in flight finish a moment
after a stop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tasks.engine.job import BadReply, Item, Outcome, Reply, RowFailure
from tasks.engine.send.context import RunContext
from tasks.engine.send.replies import count_reply, reply_stop, take_results
from tasks.errors import RunStopped
from tasks.provider.failures import Failure, classify_failure

__all__ = ["STOP_GRACE_S", "send_all", "send_part"]

# After a stop (daily quota, fatal error) requests already in flight get this long to finish: their
# answers are paid for, so keep them if they come soon; then they are cancelled.
STOP_GRACE_S = 5.0


async def send_part(ctx: RunContext, part: Item) -> Outcome | None:
    """One request of a row that its job sends in several parts (a recording's segments): through the
    same limiter, retries, outage breaker and budget as a row. None: not sent (the run is stopping)."""
    got: dict[str, Outcome | None] = {}
    await _send(ctx, [part], got)
    return got.get(part.content_hash)


async def _send_in_parts(ctx: RunContext, item: Item, outcomes: dict[str, Outcome | None]) -> None:
    outcome = await ctx.job.send_in_parts(ctx, item, send_part)
    if outcome is not None:
        outcomes[item.content_hash] = outcome


async def send_all(ctx: RunContext, items: list[Item], outcomes: dict[str, Outcome | None]) -> None:
    """Send ``items`` (a request each, or as many as the job puts in one) and fill ``outcomes``."""
    if hasattr(ctx.job, "send_in_parts"):
        # The job splits each row into requests itself (``send_in_parts(ctx, item, send_part)`` returns
        # the row's Outcome, or None when not attempted), each sent with :func:`send_part`.
        tasks = [asyncio.create_task(_send_in_parts(ctx, item, outcomes)) for item in items]
    else:
        size = ctx.job.max_items_per_request
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        tasks = [asyncio.create_task(_send(ctx, batch, outcomes)) for batch in batches]
    if not tasks:
        return
    stop_wait = asyncio.create_task(ctx.stop.event.wait())
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stop_wait)
            if stop_wait in done and pending:
                _, pending = await asyncio.wait(pending, timeout=STOP_GRACE_S)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                break
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
    finally:
        stop_wait.cancel()


@dataclass
class _Sent:
    """One attempt's request: when it started, and its reply or its failure."""

    started: float
    reply: Reply | None = None
    failure: Failure | None = None
    # The provider went down while it waited for its turn: it was not sent and used no attempt.
    held: bool = False


async def _send(ctx: RunContext, items: list[Item], outcomes: dict[str, Outcome | None], attempts: int = 0) -> None:
    estimate = sum(item.tokens for item in items)
    while True:
        if ctx.stop.event.is_set():
            return
        # While the provider is down, wait here (one request at a time probes): see tasks/engine/send/outage.py.
        probe = await ctx.outage.admit(ctx.stop.event)
        if ctx.outage.gave_up:
            ctx.request_stop(ctx.outage.stop())
        if ctx.stop.event.is_set():
            return
        attempts += 1
        sent = await _attempt(ctx, items, estimate, probe)
        if sent is None:
            return
        if sent.held:
            attempts -= 1
            continue
        if sent.failure is None:
            await _use_reply(ctx, items, estimate, probe, sent, attempts, outcomes)
            return
        again = await _after_failure(ctx, items, probe, sent, attempts, outcomes)
        if again is None:
            return
        attempts = again


async def _attempt(ctx: RunContext, items: list[Item], estimate: int, probe: bool) -> _Sent | None:
    """One request through the budget and the limiter. None: not sent, the run stops."""
    stats, limiter = ctx.stats, ctx.limiter
    failure: Failure | None = None
    reply: Reply | None = None
    reservation = 0.0
    if ctx.budget is not None:
        reservation = ctx.budget.reserve(estimate)
        if reservation is None:
            ctx.request_stop(ctx.budget.stop())
            return None
    try:
        async with limiter.slot(estimate) as started:
            if ctx.stop.event.is_set():
                return None
            if ctx.outage.holding(probe):  # the provider went down while this waited for its turn
                limiter.give_back(started)
                return _Sent(started, held=True)
            stats.requests += 1
            stats.items_sent += len(items)
            stats.estimated_tokens += estimate
            reply, failure = await _request(ctx, items)
    except RunStopped as stop:  # the shared budget's: the key's daily quota is spent (this run or another)
        ctx.request_stop(stop)
        return None
    finally:
        if ctx.budget is not None:
            ctx.budget.release(reservation)
            if failure is None and reply is not None:
                ctx.budget.charge(reply.prompt_tokens, reply.total_tokens, reply.images)
    return _Sent(started, reply, failure)


async def _request(ctx: RunContext, items: list[Item]) -> tuple[Reply | None, Failure | None]:
    """The job's request and its reply, or how it failed."""
    reply: Reply | None = None
    try:
        reply = await ctx.job.send(ctx.conn, items)
        if len(reply.results) != len(items):
            raise BadReply(f"the reply had {len(reply.results)} results for {len(items)} inputs")
    except BadReply as exc:
        if exc.transport:
            return None, Failure("transient", f"bad reply: {exc}")
        # It arrived but can't be used: each row of it goes the RowFailure way.
        unusable = RowFailure("bad_reply", f"bad reply: {exc}", exc.raw_reply)
        return Reply([unusable] * len(items), *_usage(reply)), None
    except Exception as exc:  # noqa: BLE001 - classify_failure re-raises what it doesn't know
        return None, classify_failure(exc)
    return reply, None


async def _use_reply(
    ctx: RunContext,
    items: list[Item],
    estimate: int,
    probe: bool,
    sent: _Sent,
    attempts: int,
    outcomes: dict[str, Outcome | None],
) -> None:
    """Take the results of a reply; its rows that failed for themselves are sent again."""
    stats, limiter, reply = ctx.stats, ctx.limiter, sent.reply
    assert reply is not None
    ctx.outage.record_success(sent.started, probe, items[0].content_hash)
    count_reply(stats, reply)
    stop = reply_stop(ctx, items, reply)
    if stop is not None:
        # Nothing of this reply is written; the rows stay to send.
        await limiter.settle_tokens(estimate, reply.prompt_tokens)
        ctx.request_stop(stop)
        return
    again = take_results(ctx, items, reply, attempts, outcomes)
    await limiter.settle_tokens(estimate, reply.prompt_tokens)
    if again:
        stats.retries += 1
        await _send(ctx, again, outcomes, attempts)


async def _after_failure(
    ctx: RunContext,
    items: list[Item],
    probe: bool,
    sent: _Sent,
    attempts: int,
    outcomes: dict[str, Outcome | None],
) -> int | None:
    """Deal with a failed request: the attempts to go on with when it is sent again, None when done."""
    stats, failure = ctx.stats, sent.failure
    assert failure is not None
    if failure.kind == "rate_limited":
        stats.rate_limited += 1
        ctx.limiter.on_rate_limited(sent.started, failure.retry_after_s)
    elif failure.kind == "transient":
        stats.transient_errors += 1
    if ctx.outage.record_failure(failure.kind, sent.started, probe, items[0].content_hash):
        # The provider is down: not the rows' fault, so no attempt used and no back-off (the
        # breaker decides when to send again).
        stats.retries += 1
        return attempts - 1
    if failure.fatal:
        if failure.kind == "daily_quota":
            stats.rate_limited += 1
        ctx.request_stop(failure.stop())
        return None
    if failure.retryable and ctx.retry.allows(attempts, failure):
        stats.retries += 1
        try:
            await asyncio.wait_for(ctx.stop.event.wait(), timeout=ctx.retry.delay(attempts, failure))
        except TimeoutError:
            pass
        return attempts
    if failure.kind == "invalid_request" and len(items) > 1:
        # One bad input fails the whole request: split to find it, so the rest still succeed.
        half = len(items) // 2
        await asyncio.gather(_send(ctx, items[:half], outcomes, attempts), _send(ctx, items[half:], outcomes, attempts))
        return None
    for item in items:
        outcomes[item.content_hash] = Outcome(
            error_type=failure.kind,
            error_message=ctx.conn.redact(failure.message),
            attempts=attempts,
            retry_auto=failure.retryable,
        )
    return None


def _usage(reply: Reply | None) -> tuple[int, int, int]:
    return (reply.prompt_tokens, reply.completion_tokens, reply.total_tokens) if reply is not None else (0, 0, 0)
