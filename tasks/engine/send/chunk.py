"""The live path: a chunk's rows fanned out as rate-limited requests, retried, and written as parts.

A job (see :class:`tasks.engine.job.Job`) says how a row becomes a request and a response becomes typed
columns; everything else — skipping done rows, sharing identical contents, retries, limits, atomic writes,
counts — lives here and in the modules it imports.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.engine.job import BadReply, Item, Outcome, Reply, RowFailure
from tasks.engine.plan.index import member
from tasks.engine.plan.rows import (
    DONE,
    INVALID,
    NEW,
    OWN,
    PEER,
    PREV_ERROR,
    SAME,
    STORED,
    PreparedChunk,
    chunk_statuses,
    nothing_to_do,
    prepare_chunk,
)
from tasks.engine.send.context import ChunkReport, RunContext
from tasks.engine.send.replies import count_reply, reply_stop, take_results
from tasks.engine.store.output import RETRY_AUTO, RETRY_ON_REQUEST
from tasks.errors import RunStopped
from tasks.provider.failures import Failure, classify_failure

log = logging.getLogger("gembatch.engine")

# After a stop (daily quota, fatal error) requests already in flight get this long to finish: their
# answers are paid for, so keep them if they come soon; then they are cancelled.
STOP_GRACE_S = 5.0


def count_skipped(ctx: RunContext, status: np.ndarray) -> None:
    ctx.stats.skipped_done += int(np.count_nonzero(status == DONE))
    ctx.stats.failed += int(np.count_nonzero(status == PREV_ERROR))
    ctx.on_progress(len(status))


def prepare_and_look_up(ctx: RunContext, chunk: pa.Table) -> PreparedChunk:
    """Hash a chunk and ask the output which of its rows are done (reading the parts the index points
    to): the slow half of :func:`chunk_statuses`, on a worker thread."""
    ready = prepare_chunk(ctx.job, chunk, ctx.hash_processes)
    if len(ctx.index.results):
        ready.done = ctx.index.pairs_done(ready.keys, chunk.column(ctx.id_col))
    return ready


async def precheck_chunk(ctx: RunContext, chunk: pa.Table, index: int, ready: PreparedChunk | None = None) -> bool:
    """Prepare a chunk ahead of its task: False if none of its rows needs a request or a write.

    Such a chunk (every row done, or failed before) is counted here and needs no Prefect task: a
    rerun of 10 million rows would otherwise create 5,000 empty task runs, which costs more than the
    check itself. Otherwise the prepared rows wait in ``ctx`` for :func:`process_chunk`. ``ready``:
    :func:`prepare_and_look_up` of the chunk, if the caller had it done ahead.
    """
    if ready is None:
        ready = await asyncio.to_thread(prepare_and_look_up, ctx, chunk)
    keys = chunk_statuses(
        ctx.index, chunk.column(ctx.id_col), ready.keys, ready.invalid, retry_errors=ctx.retry_errors, done=ready.done
    )
    if nothing_to_do(keys.status):
        count_skipped(ctx, keys.status)
        return False
    ctx.prechecked[index] = ready
    return True


async def process_chunk(ctx: RunContext, chunk: pa.Table, index: int, first_row: int) -> ChunkReport:
    """Send what this chunk still needs, then write one results part and at most one errors part."""
    job = ctx.job
    id_array = chunk.column(ctx.id_col)
    n = chunk.num_rows
    ready = ctx.prechecked.pop(index, None)
    if ready is None or ready.rows != n:
        ctx.preparing += 1
        try:
            ready = await asyncio.to_thread(prepare_and_look_up, ctx, chunk)
        finally:
            ctx.preparing -= 1
    # Deciding who owns which content is synchronous: no other chunk runs in between. (Which rows are
    # done was asked on a worker thread: no other chunk of this run writes this chunk's ids.)
    keys = chunk_statuses(
        ctx.index, id_array, ready.keys, ready.invalid, retry_errors=ctx.retry_errors, done=ready.done
    )
    source = keys.status
    if nothing_to_do(source):
        # Nothing to send or write (a rerun's chunk): count and go.
        count_skipped(ctx, source)
        return ChunkReport(index=index, rows=n, written=0, errors=0)
    todo = np.flatnonzero(source == NEW)
    if len(todo) > 0 and any(ready.prepared[pos] is None for pos in todo.tolist()):
        await asyncio.to_thread(ready.fill, job, chunk, todo)
    prepared = ready.prepared
    hashes = ready.hex(np.flatnonzero((source != DONE) & (source != PREV_ERROR)))
    source = source.astype(np.int64)
    invalid = {int(pos): str(prepared[pos]) for pos in np.flatnonzero(source == INVALID)}
    stored_before = ctx.index.results.has_keys(keys.keys[todo])
    ids = id_array.to_pylist()
    own: dict[str, Item] = {}
    peers: dict[str, asyncio.Future[Outcome | None]] = {}
    stored: set[str] = set()
    stored_pos: list[int] = []
    for pos, known in zip(todo.tolist(), stored_before.tolist()):
        h = hashes[pos]
        if h in own:
            source[pos] = SAME
        elif h in ctx.inflight:
            source[pos], peers[h] = PEER, ctx.inflight[h]
        elif known:
            source[pos] = STORED
            if h not in stored:
                stored.add(h)
                stored_pos.append(pos)
        else:
            source[pos] = OWN
            own[h] = Item(pos, ids[pos], h, prepared[pos])
            ctx.inflight[h] = asyncio.get_running_loop().create_future()

    outcomes: dict[str, Outcome | None] = {}
    try:
        if stored:
            found = await asyncio.to_thread(
                _stored_results, ctx, [hashes[p] for p in stored_pos], keys.keys[stored_pos]
            )
            found, served_of = found
            outcomes.update({h: Outcome(result=found[h], served_model=served_of.get(h)) for h in stored if h in found})
            # The index matches 32 bits of a content: one it pointed at that isn't there is sent after all.
            for pos in todo.tolist():
                h = hashes[pos]
                if source[pos] != STORED or h in found:
                    continue
                if h in own:
                    source[pos] = SAME
                elif h in ctx.inflight:
                    source[pos], peers[h] = PEER, ctx.inflight[h]
                else:
                    source[pos] = OWN
                    own[h] = Item(pos, ids[pos], h, prepared[pos])
                    ctx.inflight[h] = asyncio.get_running_loop().create_future()
        await _send_all(ctx, list(own.values()), outcomes)
        for h, future in peers.items():
            outcomes[h] = await future
        id_type = chunk.schema.field(ctx.id_col).type
        report = await asyncio.to_thread(
            _write_chunk, ctx, index, first_row, ids, id_type, hashes, source.tolist(), invalid, outcomes
        )
        added = [item.position for h, item in own.items() if (o := outcomes.get(h)) is not None and o.ok]
        if added and report.part is not None:
            learnt = keys.keys[np.array(added, np.intp)]
            if ctx.recurring is not None:
                learnt = learnt[member(ctx.recurring, learnt)]
            if len(learnt):
                ctx.index.results.add(learnt, ctx.index.part_ordinal(report.part))
    finally:
        for h in own:
            future = ctx.inflight.pop(h)
            if not future.done():
                future.set_result(outcomes.get(h))
    ctx.on_progress(n)
    return report


def _stored_results(
    ctx: RunContext, hashes: list[str], keys: np.ndarray
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """The stored results of these contents (the index matched their first 32 bits). The parts' keys
    confirm the match first: a false one (a run's own results make them common at corpus scale) costs
    a read of the parts' key columns, not of their results."""
    confirmed = ctx.index.contents_stored(keys)
    if not confirmed.any():
        return {}, {}
    wanted = [h for h, ok in zip(hashes, confirmed.tolist()) if ok]
    files = ctx.index.parts_holding(keys[confirmed])
    table = ctx.store.read_results_for(wanted, ctx.id_col, files=files)
    served: dict[str, str | None] = {}
    if "served_model" in table.column_names:  # the stored row's served model goes with its result
        served = dict(zip(table.column("content_hash").to_pylist(), table.column("served_model").to_pylist()))
    return ctx.job.results_from_table(table), served


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


async def _send_all(ctx: RunContext, items: list[Item], outcomes: dict[str, Outcome | None]) -> None:
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
    stop_wait = asyncio.create_task(ctx.stop_event.wait())
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


async def _send(ctx: RunContext, items: list[Item], outcomes: dict[str, Outcome | None], attempts: int = 0) -> None:
    job, stats, limiter = ctx.job, ctx.stats, ctx.limiter
    estimate = sum(item.tokens for item in items)
    while True:
        if ctx.stop_event.is_set():
            return
        # While the provider is down, wait here (one request at a time probes): see tasks/engine/send/outage.py.
        probe = await ctx.outage.admit(ctx.stop_event)
        if ctx.outage.gave_up:
            ctx.request_stop(ctx.outage.stop())
        if ctx.stop_event.is_set():
            return
        attempts += 1
        failure: Failure | None = None
        reply: Reply | None = None
        reservation = 0.0
        if ctx.budget is not None:
            reservation = ctx.budget.reserve(estimate)
            if reservation is None:
                ctx.request_stop(ctx.budget.stop())
                return
        try:
            async with limiter.slot(estimate) as started:
                if ctx.stop_event.is_set():
                    return
                if ctx.outage.holding(probe):  # the provider went down while this waited for its turn
                    limiter.give_back(started)
                    attempts -= 1
                    continue
                stats.requests += 1
                stats.items_sent += len(items)
                stats.estimated_tokens += estimate
                try:
                    reply = await job.send(ctx.conn, items)
                    if len(reply.results) != len(items):
                        raise BadReply(f"the reply had {len(reply.results)} results for {len(items)} inputs")
                except BadReply as exc:
                    if exc.transport:
                        failure = Failure("transient", f"bad reply: {exc}")
                    else:  # it arrived but can't be used: each row of it goes the RowFailure way
                        unusable = RowFailure("bad_reply", f"bad reply: {exc}", exc.raw_reply)
                        reply = Reply([unusable] * len(items), *_usage(reply))
                except Exception as exc:  # noqa: BLE001 - classify_failure re-raises what it doesn't know
                    failure = classify_failure(exc)
        except RunStopped as stop:  # the shared budget's: the key's daily quota is spent (this run or another)
            ctx.request_stop(stop)
            return
        finally:
            if ctx.budget is not None:
                ctx.budget.release(reservation)
                if failure is None and reply is not None:
                    ctx.budget.charge(reply.prompt_tokens, reply.total_tokens, reply.images)
        if failure is None:
            ctx.outage.record_success(started, probe, items[0].content_hash)
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
            return
        if failure.kind == "rate_limited":
            stats.rate_limited += 1
            limiter.on_rate_limited(started, failure.retry_after_s)
        elif failure.kind == "transient":
            stats.transient_errors += 1
        if ctx.outage.record_failure(failure.kind, started, probe, items[0].content_hash):
            # The provider is down: not the rows' fault, so no attempt used and no back-off (the
            # breaker decides when to send again).
            attempts -= 1
            stats.retries += 1
            continue
        if failure.fatal:
            if failure.kind == "daily_quota":
                stats.rate_limited += 1
            ctx.request_stop(failure.stop())
            return
        if failure.retryable and ctx.retry.allows(attempts, failure):
            stats.retries += 1
            try:
                await asyncio.wait_for(ctx.stop_event.wait(), timeout=ctx.retry.delay(attempts, failure))
            except TimeoutError:
                pass
            continue
        if failure.kind == "invalid_request" and len(items) > 1:
            # One bad input fails the whole request: split to find it, so the rest still succeed.
            half = len(items) // 2
            await asyncio.gather(
                _send(ctx, items[:half], outcomes, attempts), _send(ctx, items[half:], outcomes, attempts)
            )
            return
        for item in items:
            outcomes[item.content_hash] = Outcome(
                error_type=failure.kind,
                error_message=ctx.conn.redact(failure.message),
                attempts=attempts,
                retry_auto=failure.retryable,
            )
        return


def _usage(reply: Reply | None) -> tuple[int, int, int]:
    return (reply.prompt_tokens, reply.completion_tokens, reply.total_tokens) if reply is not None else (0, 0, 0)


def _write_chunk(
    ctx: RunContext,
    index: int,
    first_row: int,
    ids: list[Any],
    id_type: pa.DataType,
    hashes: list[str],
    source: list[int],
    invalid: dict[int, str],
    outcomes: dict[str, Outcome | None],
) -> ChunkReport:
    job, stats = ctx.job, ctx.stats
    ok_rows: list[int] = []
    ok_results: list[Any] = []
    err_rows: list[tuple[int, str, str, int, str | None]] = []
    auto: set[int] = set()  # positions of error rows the next plain run sends again
    for pos, src in enumerate(source):
        if src == DONE:
            stats.skipped_done += 1
        elif src == PREV_ERROR:
            stats.failed += 1
        elif src == INVALID:
            err_rows.append((pos, "invalid_input", invalid[pos], 0, None))
        else:
            outcome = outcomes.get(hashes[pos])
            if outcome is None:
                stats.not_attempted += 1
            elif not outcome.ok:
                if outcome.retry_auto:
                    auto.add(pos)
                err_rows.append(
                    (
                        pos,
                        outcome.error_type or "error",
                        outcome.error_message or "",
                        outcome.attempts,
                        outcome.raw_reply,
                    )
                )
            else:
                ok_rows.append(pos)
                ok_results.append(outcome.result)
    # Rows count as succeeded or failed once their part file is written: a write that an interrupt cuts
    # short leaves them unaccounted here, so the run counts them as not attempted (and a rerun sends them).
    own_ok = sum(1 for pos in ok_rows if source[pos] == OWN)
    written = 0
    part = None
    if ok_rows:
        rows_per_result = getattr(job, "rows_per_result", None)
        if rows_per_result is not None:
            ok_rows = [p for p, r in zip(ok_rows, ok_results) for _ in range(rows_per_result(r))]
        table = pa.table(
            {
                ctx.id_col: pa.array([ids[p] for p in ok_rows], id_type),
                **job.result_arrays(ok_results),
                "content_hash": pa.array([hashes[p] for p in ok_rows], pa.string()),
                "model": pa.array([job.model] * len(ok_rows), pa.string()),
            }
        )
        if ctx.served_column and not getattr(job, "stop_on_reroute", False):
            served = {p: outcomes[hashes[p]].served_model for p in set(ok_rows) if outcomes.get(hashes[p])}
            table = table.append_column(
                pa.field("served_model", pa.string()), pa.array([served.get(p) for p in ok_rows], pa.string())
            )
        part = ctx.store.write_part(table, errors=False, run_id=ctx.run_id, id_col=ctx.id_col)
        stats.parts_written.append(part)
        written = len(ok_results)
        stats.succeeded += own_ok
        stats.deduplicated += written - own_ok
    if err_rows:
        table = pa.table(
            {
                ctx.id_col: pa.array([ids[p] for p, *_ in err_rows], id_type),
                "content_hash": pa.array([hashes[p] for p, *_ in err_rows], pa.string()),
                "error_type": pa.array([e[1] for e in err_rows], pa.string()),
                "error_message": pa.array([e[2] for e in err_rows], pa.string()),
                "attempts": pa.array([e[3] for e in err_rows], pa.int32()),
                "raw_reply": pa.array([e[4] for e in err_rows], pa.string()),
                # "auto": transient errors used up the attempts, the next plain run sends the row
                # again; "on_request": it failed for itself, resent only with --retry-errors.
                "retry": pa.array([RETRY_AUTO if p in auto else RETRY_ON_REQUEST for p, *_ in err_rows], pa.string()),
                "input_row": pa.array([first_row + p for p, *_ in err_rows], pa.int64()),
                "model": pa.array([job.model] * len(err_rows), pa.string()),
                "run_id": pa.array([ctx.run_id] * len(err_rows), pa.string()),
            }
        )
        path = ctx.store.write_part(table, errors=True, run_id=ctx.run_id, id_col=ctx.id_col)
        stats.error_parts_written.append(path)
        stats.failed += len(err_rows)
        stats.failed_retry_auto += len(auto)
    return ChunkReport(index=index, rows=len(ids), written=written, errors=len(err_rows), part=part)


ChunkRunner = Callable[[RunContext, pa.Table, int, int], Awaitable[ChunkReport]]
