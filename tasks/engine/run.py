"""One run of a job from start to finish: checks, planning, the chunk fan-out, metadata."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.defaults import DEFAULT_CHUNK_SIZE
from tasks.engine.job import Job
from tasks.engine.memory import release_free_memory
from tasks.engine.options import RunOptions
from tasks.engine.plan.claims import ClaimBook
from tasks.engine.plan.done import DoneIndex
from tasks.engine.plan.hashing import HashProcesses
from tasks.engine.plan.input import InputSource, check_ids
from tasks.engine.plan.recurring import recurring_contents
from tasks.engine.plan.rows import _template_of
from tasks.engine.plan.shard import ShardSource
from tasks.engine.preflight import preflight
from tasks.engine.report.live import LiveWatch, RunObserver, start_watch
from tasks.engine.report.metadata import input_record, new_run_id, package_versions, utc_now
from tasks.engine.report.outcome import Ending, outcome
from tasks.engine.report.progress import ProgressBar
from tasks.engine.report.status import (
    COMPLETED,
    COMPLETED_WITH_ERRORS,
    answered_by_server,
    rerouted_warning,
    run_status,
)
from tasks.engine.send.batch.batch_run import BatchRun
from tasks.engine.send.budget import Budget
from tasks.engine.send.chunk import ChunkRunner, process_chunk
from tasks.engine.send.context import REROUTED, RunContext
from tasks.engine.send.context_parts import RunOutput
from tasks.engine.send.fanout import LOOK_AHEAD, drive_chunks
from tasks.engine.send.first_request import FirstRequestAlone
from tasks.engine.send.limits import AdaptiveLimiter, Limits
from tasks.engine.send.outage import OutageBreaker
from tasks.engine.send.quota_share import DAILY_QUOTA, paced_by, share_stops
from tasks.engine.store.lease import claim_output, compact_if_last, give_up_lease, take_lease
from tasks.engine.store.output import OutputStore
from tasks.provider.catalog import lifecycle_note
from tasks.provider.client import Connection, open_connection
from tasks.provider.model_check import check_model
from tasks.provider.prices import BATCH_PRICE_FACTOR
from tasks.redact import redact_data
from tasks.sinks.lance import TableSink
from tasks.sinks.lance_sync import sync_if_last

if TYPE_CHECKING:
    from datetime import datetime

    from tasks.engine.send.shared_limits import SharedLimits

__all__ = ["DEFAULT_CHUNK_SIZE", "COMPLETED", "COMPLETED_WITH_ERRORS", "RunOptions", "preflight", "run_job"]

# The budget shared with other processes on the same host and model, given the run's host, model and
# limits (tasks/engine/send/shared_limits.py: open_shared_limits); None: nothing to share.
SharedFactory = Callable[[str, str, Limits], Awaitable[Any]]


@dataclass
class _Held:
    """What a run holds open from its start to its end, let go by :func:`run_job` however it ends."""

    conn: Connection
    claims: ClaimBook | None = None
    shared: SharedLimits | None = None
    hashers: HashProcesses | None = None
    live: LiveWatch | None = None  # a tracked run's progress and events (tasks/engine/report/live.py)

    async def close(self) -> None:
        if self.live is not None:
            await self.live.close()
        if self.hashers is not None:
            await asyncio.to_thread(self.hashers.close)
        if self.claims is not None:
            await give_up_lease(self.claims)
        if self.shared is not None:
            await self.shared.close()
        await self.conn.close()


@dataclass(frozen=True)
class _Begun:
    """A run past its checks, its output prepared and leased: what the later phases read."""

    run_id: str
    started: datetime
    source: InputSource
    total_rows: int
    store: OutputStore
    index: DoneIndex
    limiter: AdaptiveLimiter
    budget: Budget | None


async def run_job(
    job: Job,
    options: RunOptions,
    *,
    parameters: dict[str, Any] | None = None,
    chunk_runner: ChunkRunner = process_chunk,
    flow_run_id: str | None = None,
    shared_limits: SharedFactory | None = None,
    observer: RunObserver | None = None,
) -> dict[str, Any]:
    """Run ``job`` over ``options.input`` into ``options.output``; returns the run metadata document.

    ``observer`` hears of the run while it works (a tracked run's progress and events: see
    tasks/engine/report/live.py).

    Raises :class:`GembatchError` for problems found before any work, and re-raises an unexpected
    error after writing the metadata of what was done.
    """
    started = utc_now()
    source = preflight(job, options)
    # --output lancedb://…: the run writes into a staging folder; the table is synced at the end.
    sink = TableSink.for_run(job.name, options.output, options.id_col, parameters or {})
    if options.shard is not None:
        source = ShardSource(source, options.shard, options.id_col)
    held = _Held(open_connection(options.provider))
    try:
        begun = await _begin(job, options, source, started, held, shared_limits)
        document = await _first_record(job, options, begun, held, flow_run_id, parameters)
        ctx, progress = await _context(job, options, begun, held)
        held.live = await start_watch(ctx, observer, document, total=begun.total_rows)
        error, batch_run = await _send(ctx, options, begun, held, chunk_runner, progress)
        await _end(ctx, options, begun, held, error, batch_run, document, sink)
        if held.live is not None:
            await held.live.finish(document)
        if error is not None and not answered_by_server(error):
            raise error
        return document
    finally:
        await held.close()


async def _begin(
    job: Job,
    options: RunOptions,
    source: InputSource,
    started: datetime,
    held: _Held,
    shared_limits: SharedFactory | None,
) -> _Begun:
    """The checks that ask the server and read the input, then the output: prepared, leased, claimed, scanned."""
    run_id = new_run_id(started)
    await check_model(held.conn, job.model, key_source=options.provider.key_source)
    budget = Budget.for_job(options.max_cost_usd, job) if options.max_cost_usd is not None else None
    total_rows = await asyncio.to_thread(check_ids, source, options.id_col, limit=options.limit)
    release_free_memory()
    store = OutputStore(options.output)
    await asyncio.to_thread(store.prepare)
    held.claims = claims = await take_lease(store, run_id, options.claims)
    others = await asyncio.to_thread(claims.other_runs)
    if not others:
        await asyncio.to_thread(store.remove_temporary)
    await claim_output(store, job, run_id, options)
    # What the output already holds fits this run (unless told to write anyway: --force, --change-model).
    check_output = getattr(job, "check_output", None)
    if check_output is not None and not (options.force or options.change_model):
        await asyncio.to_thread(check_output, store)
    index = await asyncio.to_thread(
        store.scan, options.id_col, live_runs={h.run_id for h in others}, since_ns=int(claims.since * 1e9)
    )
    if shared_limits is not None:
        held.shared = await shared_limits(held.conn.host, job.model, options.limits)
    limiter = AdaptiveLimiter(paced_by(options.limits, held.shared), shared=held.shared)
    return _Begun(run_id, started, source, total_rows, store, index, limiter, budget)


async def _first_record(
    job: Job,
    options: RunOptions,
    begun: _Begun,
    held: _Held,
    flow_run_id: str | None,
    parameters: dict[str, Any] | None,
) -> dict[str, Any]:
    """The run metadata as the run starts, written at once (``status: running``)."""
    conn, index = held.conn, begun.index
    document: dict[str, Any] = {
        "run_id": begun.run_id,
        "flow_run_id": flow_run_id,
        "job": job.name,
        "status": "running",
        "message": "",
        "parameters": redact_data(parameters or {}),
        "provider": {
            "name": conn.provider,
            "host": conn.host,
            "base_url": conn.shown_url,
            "model": job.model,
            # What gembatch's catalog says of the model (deprecated, shutdown day, replacement); null: current.
            "lifecycle": lifecycle_note(job.model) or None,
        },
        "job_parameters": job.parameters(),
        "input": await asyncio.to_thread(input_record, begun.source, begun.total_rows),
        "output": {
            "path": options.output,
            "existing_result_rows": index.result_rows,
            "existing_parts": len(index.parts),
            "parts_from_key_cache": index.cached_parts,
        },
        "started_at": begun.started.isoformat(),
        "limits": begun.limiter.describe(),
        "versions": package_versions(),
    }
    if options.shard is not None:
        document["shard"] = str(options.shard)
    await asyncio.to_thread(begun.store.write_run, begun.run_id, document)
    return document


async def _context(job: Job, options: RunOptions, begun: _Begun, held: _Held) -> tuple[RunContext, ProgressBar]:
    """What every chunk of the run shares (tasks/engine/send/context.py), and the run's progress bar."""
    limiter = begun.limiter
    ctx = RunContext(
        job=job,
        conn=held.conn,
        limiter=FirstRequestAlone(limiter) if getattr(job, "first_request_alone", False) else limiter,
        output=RunOutput(
            store=begun.store, index=begun.index, id_col=options.id_col, retry_errors=options.retry_errors
        ),
        run_id=begun.run_id,
        retry=options.retry,
        budget=begun.budget,
        outage=OutageBreaker(options.outage),
    )
    progress = ProgressBar(
        f"{job.name} {job.model}",
        begun.total_rows,
        ctx.stats,
        enabled=options.progress,
        unit=getattr(job, "progress_unit", None),
    )
    if options.batch.mode == "live" and begun.index.result_rows < begun.total_rows:
        # Rows to send (a first run, a resumed one): find the contents that recur, so that the index
        # learns only those of this run's results (see tasks/engine/plan/recurring.py). A rerun of a
        # finished output skips this and its index learns the few rows it sends, as before.
        ctx.output.recurring = await asyncio.to_thread(
            recurring_contents, job, begun.source, options.id_col, begun.total_rows
        )
        release_free_memory()
    elif _template_of(job) is not None and begun.index.result_rows:
        # A rerun: its work is hashing every row; child processes (~14 MiB each) do it beside this one.
        # (A run that sends is bound by its requests: it hashes in its own threads.)
        ctx.on_hand.hash_processes = held.hashers = HashProcesses(LOOK_AHEAD)
    if not getattr(job, "stop_on_reroute", False):
        columns = await asyncio.to_thread(begun.store.result_columns)
        ctx.output.served_column = columns is None or "served_model" in columns
    ctx.progress = progress
    ctx.stats.input_rows = begun.total_rows
    return ctx, progress


async def _send(
    ctx: RunContext,
    options: RunOptions,
    begun: _Begun,
    held: _Held,
    chunk_runner: ChunkRunner,
    progress: ProgressBar,
) -> tuple[BaseException | None, BatchRun | None]:
    """Send the rows (live, or through batches); returns what stopped the sending, if anything."""
    error: BaseException | None = None
    batch_run = None
    if options.batch.mode != "live":
        if begun.budget is not None:
            begun.budget.price_factor = BATCH_PRICE_FACTOR
        batch_run = BatchRun(
            ctx, begun.source, options, begun.total_rows, held.conn, drive_chunks, chunk_runner, held.claims
        )
    watch = asyncio.create_task(share_stops(ctx, held.shared)) if held.shared is not None else None
    try:
        if batch_run is not None:
            await batch_run.drive()
        else:
            await drive_chunks(ctx, begun.source, options, begun.total_rows, chunk_runner, claims=held.claims)
    except (Exception, asyncio.CancelledError, KeyboardInterrupt) as exc:
        error = exc
    finally:
        progress.close()
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            if ctx.stop.reason is not None and ctx.stop.reason.status == DAILY_QUOTA:
                # Told even when the work ended before the watcher woke: else the others would each
                # find the spent quota with a request of their own.
                await held.shared.stop_everyone(str(ctx.stop.reason))
    return error, batch_run


async def _end(
    ctx: RunContext,
    options: RunOptions,
    begun: _Begun,
    held: _Held,
    error: BaseException | None,
    batch_run: BatchRun | None,
    document: dict[str, Any],
    sink: TableSink | None,
) -> None:
    """Tidy and compact the output (and bring a LanceDB table up to date), then complete the run
    metadata and write it."""
    job, stats = ctx.job, ctx.stats
    tidy = getattr(job, "tidy_output", None)
    if tidy is not None and error is None:
        # What a job kept in OUTPUT for unfinished rows (a recording's answered segments) and no
        # longer needs: the rows are in the output now.
        await asyncio.to_thread(tidy, begun.store, begun.index)
    status, message = run_status(ctx, error, options)
    if stats.rerouted:
        document["served_models"] = dict(stats.rerouted)
        if status != REROUTED:
            message = "; ".join(m for m in (message, rerouted_warning(job.model, stats.rerouted, ctx)) if m)
    stats.not_attempted += max(0, begun.total_rows - stats.rows_accounted())
    removed, compaction = await _settle_output(ctx, options, begun, held.claims)
    finished = utc_now()
    ended = Ending(begun.started, finished, status, held.conn.redact(message))
    document.update(outcome(ctx, begun.limiter, batch_run, ended))
    if options.provider.stream:
        document["streaming"] = {
            "idle_timeout_s": options.provider.idle_timeout_s,
            "first_token": stats.first_token.describe(),
        }
    # The quota shared with other runs on the key and model (tracked runs only; null untracked).
    document["shared_limits"] = held.shared.describe() if held.shared is not None else None
    document["output"].update(
        {
            "parts_written": [p.rsplit("/", 1)[-1] for p in stats.parts_written],
            "error_parts_written": [p.rsplit("/", 1)[-1] for p in stats.error_parts_written],
            "superseded_rows_removed": removed,
            "compaction": compaction,
        }
    )
    if sink is not None and options.shard is None:
        document["output"]["table"] = await sync_if_last(
            sink, held.claims, begun.store, begun.source, run_id=begun.run_id, compacted=compaction == "done"
        )
    document["claims"] = held.claims.describe()
    await asyncio.to_thread(begun.store.write_run, begun.run_id, document)


async def _settle_output(ctx: RunContext, options: RunOptions, begun: _Begun, claims: ClaimBook) -> tuple[int, str]:
    """Compact the output if this run's rows may supersede others (a shard leaves it to its parent), and
    refresh the key cache; returns the rows removed and what compaction did."""
    stats, index = ctx.stats, begun.index
    # Superseding: only an output that held rows before this run, or that other runs wrote into
    # at the same time, can hold two records of one id (the input's ids are unique). The index is
    # freed first: compaction needs its own memory.
    had_rows = index.result_rows + index.error_rows > 0
    index.clear()
    needed = (had_rows and bool(stats.parts_written or stats.error_parts_written)) or bool(claims.others_seen)
    if options.shard is not None:
        # The shards' parent compacts once, after all of them.
        return 0, "left to the parent of the shards" if needed else "not needed"
    removed, compaction = await compact_if_last(claims, begun.store, options.id_col, needed=needed)
    if stats.parts_written or removed:
        # The next run reads the output's keys from one file (OUTPUT/_index/), not from every part.
        await asyncio.to_thread(begun.store.refresh_key_cache, options.id_col)
    return removed, compaction
