"""One run of a job from start to finish: checks, planning, the chunk fan-out, metadata."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tasks.defaults import DEFAULT_CHUNK_SIZE
from tasks.engine.job import Job
from tasks.engine.memory import release_free_memory
from tasks.engine.plan.claims import COMPACT_KEY, ClaimBook, ClaimPolicy, Holder, chunk_key
from tasks.engine.plan.claims import log as claims_log
from tasks.engine.plan.done import KnownParts
from tasks.engine.plan.hashing import HashProcesses
from tasks.engine.plan.input import InputSource, check_ids
from tasks.engine.plan.recurring import recurring_contents
from tasks.engine.plan.rows import PreparedChunk, _template_of, chunk_statuses, nothing_to_do
from tasks.engine.plan.shard import Shard, ShardSource
from tasks.engine.report.metadata import batch_cost, counts, input_record, new_run_id, package_versions, usage, utc_now
from tasks.engine.report.progress import ProgressBar
from tasks.engine.send.batch.batch_run import BatchRun
from tasks.engine.send.batch.policy import BatchPolicy, check_batch_capable
from tasks.engine.send.budget import Budget
from tasks.engine.send.chunk import ChunkRunner, count_skipped, precheck_chunk, prepare_and_look_up, process_chunk
from tasks.engine.send.context import REROUTED, RetryPolicy, RunContext
from tasks.engine.send.limits import AdaptiveLimiter, Limits
from tasks.engine.send.outage import OutageBreaker, OutagePolicy
from tasks.engine.store.output import OutputStore
from tasks.errors import ConfigError, GembatchError, RunStopped
from tasks.jobs.media import folder_extensions
from tasks.provider.catalog import lifecycle_note
from tasks.provider.client import ProviderSettings, check_model, classify_failure, open_connection, require_key
from tasks.provider.prices import BATCH_PRICE_FACTOR
from tasks.redact import redact_data
from tasks.sinks.lance import TableSink, sync_if_last

if TYPE_CHECKING:
    from tasks.engine.send.shared_limits import SharedLimits

__all__ = ["DEFAULT_CHUNK_SIZE", "COMPLETED", "COMPLETED_WITH_ERRORS", "RunOptions", "preflight", "run_job"]

DEFAULT_CHUNKS_IN_FLIGHT = 4
MAX_CHUNKS_IN_FLIGHT = 32
STARVED_POLL_S = 0.1
WAIT_NOTE_S = 30.0  # while waiting for chunks other runs hold, say so this often
TRIM_EVERY_CHUNKS = 50
LOOK_AHEAD = 2  # chunks hashed and checked ahead of the one offered (worker threads)
COMPLETED = "completed"
# Every row was tried, but more than --max-failed-pct of them are in _errors/ (the CLI exits 4, the
# Prefect flow run is Failed).
COMPLETED_WITH_ERRORS = "completed with errors"


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Settings shared by every job (the common command-line options)."""

    input: str
    output: str
    id_col: str = "id"
    provider: ProviderSettings = field(default_factory=ProviderSettings)
    limits: Limits = field(default_factory=Limits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # When the provider is down (its max_outage_s is --max-outage): see tasks/engine/send/outage.py.
    outage: OutagePolicy = field(default_factory=OutagePolicy)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunks_in_flight: int = DEFAULT_CHUNKS_IN_FLIGHT
    limit: int | None = None
    retry_errors: bool = False
    progress: bool = False
    max_cost_usd: float | None = None
    force: bool = False
    # --change-model: this run moves the output to its model (see OutputStore.claim).
    change_model: bool = False
    dry_run: bool = False
    # A run whose failed rows are more than this share of its input (in %) is "completed with errors".
    max_failed_pct: float = 0.0
    # --mode live|batch|auto and the batch settings (tasks/engine/send/batch/policy.py).
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    # Only this part of the input (--shard I/N): other shards write into the same output at the same
    # time, so this run deletes and rewrites nothing (no compaction: the parent of the shards does it).
    shard: Shard | None = None
    # Claims on the output's chunks, so concurrent runs never send a row twice: see tasks/engine/plan/claims.py.
    claims: ClaimPolicy = field(default_factory=ClaimPolicy)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be at least 1, got {self.chunk_size}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be 0 or more, got {self.limit}")
        if not 0 <= self.max_failed_pct <= 100:
            raise ValueError(f"--max-failed-pct must be within 0-100, got {self.max_failed_pct}")


# The budget shared with other processes on the same host and model, given the run's host, model and
# limits (tasks/engine/send/shared_limits.py: open_shared_limits); None: nothing to share.
SharedFactory = Callable[[str, str, Limits], Awaitable[Any]]


def preflight(job: Job, options: RunOptions) -> InputSource:
    """The checks that need no server: the key is set, the input opens and has the columns."""
    if options.provider.stream and not getattr(job, "streams", False):
        raise ConfigError(
            f"--stream: {job.name} replies don't come as streams; --stream is for the chat jobs (generate, "
            "extract, caption, transcribe --api chat)"
        )
    if not options.dry_run:
        require_key(options.provider)
    if options.batch.mode != "live":
        check_batch_capable(job, options.provider.provider, options.provider.base_url)
    source = InputSource.open(options.input, media_extensions=folder_extensions(job))
    check_input_columns(job, source)
    source.require_columns([options.id_col, *job.input_columns])
    return source


def check_input_columns(job: Job, source: InputSource) -> None:
    """A job whose columns come from a template says itself which are missing (and from where)."""
    check = getattr(job, "check_input_columns", None)
    if check is not None:
        check(source.path, source.columns())


async def run_job(
    job: Job,
    options: RunOptions,
    *,
    parameters: dict[str, Any] | None = None,
    chunk_runner: ChunkRunner = process_chunk,
    flow_run_id: str | None = None,
    shared_limits: SharedFactory | None = None,
) -> dict[str, Any]:
    """Run ``job`` over ``options.input`` into ``options.output``; returns the run metadata document.

    Raises :class:`GembatchError` for problems found before any work, and re-raises an unexpected
    error after writing the metadata of what was done.
    """
    started = utc_now()
    run_id = new_run_id(started)
    source = preflight(job, options)
    # --output lancedb://…: the run writes into a staging folder; the table is synced at the end.
    sink = TableSink.for_run(job.name, options.output, options.id_col, parameters or {})
    if options.shard is not None:
        source = ShardSource(source, options.shard, options.id_col)
    conn = open_connection(options.provider)
    shared = None
    claims: ClaimBook | None = None
    hashers: HashProcesses | None = None
    try:
        await check_model(conn, job.model, key_source=options.provider.key_source)
        budget = Budget.for_job(options.max_cost_usd, job) if options.max_cost_usd is not None else None
        total_rows = await asyncio.to_thread(check_ids, source, options.id_col, limit=options.limit)
        release_free_memory()
        store = OutputStore(options.output)
        await asyncio.to_thread(store.prepare)
        claims = await _take_lease(store, run_id, options.claims)
        others = await asyncio.to_thread(claims.other_runs)
        if not others:
            await asyncio.to_thread(store.remove_temporary)
        await asyncio.to_thread(
            store.claim,
            job=job.name,
            model=job.model,
            run_id=run_id,
            force=options.force,
            change_model=options.change_model,
        )
        index = await asyncio.to_thread(
            store.scan, options.id_col, live_runs={h.run_id for h in others}, since_ns=int(claims.since * 1e9)
        )
        if shared_limits is not None:
            shared = await shared_limits(conn.host, job.model, options.limits)
        limiter = AdaptiveLimiter(_paced_by(options.limits, shared), shared=shared)
        document: dict[str, Any] = {
            "run_id": run_id,
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
            "input": await asyncio.to_thread(input_record, source, total_rows),
            "output": {
                "path": options.output,
                "existing_result_rows": index.result_rows,
                "existing_parts": len(index.parts),
                "parts_from_key_cache": index.cached_parts,
            },
            "started_at": started.isoformat(),
            "limits": limiter.describe(),
            "versions": package_versions(),
        }
        if options.shard is not None:
            document["shard"] = str(options.shard)
        await asyncio.to_thread(store.write_run, run_id, document)
        ctx = RunContext(
            job=job,
            conn=conn,
            limiter=FirstRequestAlone(limiter) if getattr(job, "first_request_alone", False) else limiter,
            store=store,
            index=index,
            run_id=run_id,
            id_col=options.id_col,
            retry_errors=options.retry_errors,
            retry=options.retry,
            budget=budget,
            outage=OutageBreaker(options.outage),
        )
        progress = ProgressBar(
            f"{job.name} {job.model}",
            total_rows,
            ctx.stats,
            enabled=options.progress,
            unit=getattr(job, "progress_unit", None),
        )
        if options.batch.mode == "live" and index.result_rows < total_rows:
            # Rows to send (a first run, a resumed one): find the contents that recur, so that the index
            # learns only those of this run's results (see tasks/engine/plan/recurring.py). A rerun of a
            # finished output skips this and its index learns the few rows it sends, as before.
            ctx.recurring = await asyncio.to_thread(recurring_contents, job, source, options.id_col, total_rows)
            release_free_memory()
        elif _template_of(job) is not None and index.result_rows:
            # A rerun: its work is hashing every row; child processes (~14 MiB each) do it beside this one.
            # (A run that sends is bound by its requests: it hashes in its own threads.)
            ctx.hash_processes = hashers = HashProcesses(LOOK_AHEAD)
        if not getattr(job, "stop_on_reroute", False):
            columns = await asyncio.to_thread(store.result_columns)
            ctx.served_column = columns is None or "served_model" in columns
        ctx.on_progress = progress.advance
        ctx.on_units = progress.add_units
        ctx.stats.input_rows = total_rows
        error: BaseException | None = None
        batch_run = None
        if options.batch.mode != "live":
            if budget is not None:
                budget.price_factor = BATCH_PRICE_FACTOR
            batch_run = BatchRun(ctx, source, options, total_rows, conn, _drive, chunk_runner, claims)
        watch = asyncio.create_task(_share_stops(ctx, shared)) if shared is not None else None
        try:
            if batch_run is not None:
                await batch_run.drive()
            else:
                await _drive(ctx, source, options, total_rows, chunk_runner, claims=claims)
        except (Exception, asyncio.CancelledError, KeyboardInterrupt) as exc:
            error = exc
        finally:
            progress.close()
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        tidy = getattr(job, "tidy_output", None)
        if tidy is not None and error is None:
            # What a job kept in OUTPUT for unfinished rows (a recording's answered segments) and no
            # longer needs: the rows are in the output now.
            await asyncio.to_thread(tidy, store, index)
        status, message = _status(ctx, error, options)
        stats = ctx.stats
        if stats.rerouted:
            document["served_models"] = dict(stats.rerouted)
            if status != REROUTED:
                message = "; ".join(m for m in (message, _rerouted_warning(job.model, stats.rerouted, ctx)) if m)
        stats.not_attempted += max(0, total_rows - stats.rows_accounted())
        # Superseding: only an output that held rows before this run, or that other runs wrote into
        # at the same time, can hold two records of one id (the input's ids are unique). The index is
        # freed first: compaction needs its own memory.
        had_rows = index.result_rows + index.error_rows > 0
        index.clear()
        needed = (had_rows and bool(stats.parts_written or stats.error_parts_written)) or bool(claims.others_seen)
        if options.shard is not None:
            # The shards' parent compacts once, after all of them.
            removed, compaction = 0, "left to the parent of the shards" if needed else "not needed"
        else:
            removed, compaction = await _compact_if_last(claims, store, options.id_col, needed=needed)
        if options.shard is None and (stats.parts_written or removed):
            # The next run reads the output's keys from one file (OUTPUT/_index/), not from every part.
            await asyncio.to_thread(store.refresh_key_cache, options.id_col)
        finished = utc_now()
        duration = (finished - started).total_seconds()
        tokens, cost = usage(
            stats,
            job.model,
            per_image_usd=getattr(job, "per_image_usd", None),
            audio_input=getattr(job, "audio_input", False),
        )
        if batch_run is not None:
            cost = batch_cost(cost, batch_run.totals, job.model, audio_input=getattr(job, "audio_input", False))
            document["batches"] = batch_run.describe()
        if stats.rerouted:
            # Priced at the model asked for; a provider may bill rerouted requests at the answering
            # model's price (reported for gemini-2.5-flash, unconfirmed).
            cost["rerouted_rows_priced_as"] = job.model
        document.update(
            {
                "status": status,
                "message": conn.redact(message),
                "finished_at": finished.isoformat(),
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
        )
        if options.provider.stream:
            document["streaming"] = {
                "idle_timeout_s": options.provider.idle_timeout_s,
                "first_token": stats.first_token.describe(),
            }
        # The quota shared with other runs on the key and model (tracked runs only; null untracked).
        document["shared_limits"] = shared.describe() if shared is not None else None
        document["output"].update(
            {
                "parts_written": [p.rsplit("/", 1)[-1] for p in stats.parts_written],
                "error_parts_written": [p.rsplit("/", 1)[-1] for p in stats.error_parts_written],
                "superseded_rows_removed": removed,
                "compaction": compaction,
            }
        )
        if sink is not None and options.shard is None:
            synced = await sync_if_last(sink, claims, store, source, run_id=run_id, compacted=compaction == "done")
            document["output"]["table"] = synced
        document["claims"] = claims.describe()
        await asyncio.to_thread(store.write_run, run_id, document)
        if error is not None and not _answered_by_server(error):
            raise error
        return document
    finally:
        if hashers is not None:
            await asyncio.to_thread(hashers.close)
        if claims is not None:
            await _give_up_lease(claims)
        if shared is not None:
            await shared.close()
        await conn.close()


DAILY_QUOTA = "stopped: daily quota"


def _paced_by(limits: Limits, shared: SharedLimits | None) -> Limits:
    """A limit an operator keeps in Prefect (no --rpm here) paces this run like --rpm would."""
    per_window = shared.rpm_per_window if shared is not None else None
    if limits.rpm is not None or per_window is None:
        return limits
    return dataclasses.replace(limits, rpm=per_window)


async def _share_stops(ctx: RunContext, shared: Any) -> None:
    """A daily-quota stop is everyone's: this run's is told to the others on the key and model, and
    theirs stops this run (ending ``stopped: daily quota``, resumable)."""
    own = asyncio.create_task(ctx.stop_event.wait())
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
    elif ctx.stopped is not None and ctx.stopped.status == DAILY_QUOTA:
        await shared.stop_everyone(str(ctx.stopped))


async def _drive(
    ctx: RunContext,
    source: InputSource,
    options: RunOptions,
    total_rows: int,
    runner: ChunkRunner,
    *,
    claims: ClaimBook | None = None,
) -> None:
    """Read chunks and run ``chunks_in_flight`` of them at once, more while the limiter is starved.

    Memory is bounded by the chunks in flight. ``chunks_in_flight`` is the usual number; when the rate
    and the latency need more rows in flight than those chunks hold (embeddings: 100 rows a request,
    at 5 s latency), more chunks start, up to ``MAX_CHUNKS_IN_FLIGHT``.

    With ``claims``, a chunk starts only once this run holds its claim; a chunk another live run holds
    is left to it and looked at again at the end, when that run has let it go (see :class:`_Chunks`).
    """
    driver = _Chunks(ctx, source, options, total_rows, runner, claims)
    try:
        await driver.first_pass()
        if driver.deferred:
            await driver.finish_deferred()
    finally:
        results = await asyncio.gather(*driver.active, return_exceptions=True)
    for result in [*driver.failures, *results, *driver.cancelled]:
        if isinstance(result, BaseException):
            raise result


@dataclass
class _Deferred:
    """A chunk left to another run: where it is in the input, its claim, who held it."""

    first_row: int
    key: str
    holder: Holder


class _Chunks:
    """The chunk fan-out of one run (see :func:`_drive`)."""

    def __init__(
        self,
        ctx: RunContext,
        source: InputSource,
        options: RunOptions,
        total_rows: int,
        runner: ChunkRunner,
        claims: ClaimBook | None,
    ) -> None:
        self.ctx, self.source, self.options, self.total_rows = ctx, source, options, total_rows
        self.runner, self.claims = runner, claims
        # Finished chunks are let go (a 10-million-row run has 5,000 of them); only their first error is kept.
        self.active: set[asyncio.Task] = set()
        self.failures: list[BaseException] = []
        self.cancelled: list[BaseException] = []
        self.deferred: dict[int, _Deferred] = {}
        # This run's own parts are in ``parts_written``: the index learns only the recurring contents.
        self._known_parts = KnownParts(ctx.index, ctx.stats.parts_written, ctx.stats.error_parts_written)

    def _chunks(self):
        ctx, options = self.ctx, self.options
        return self.source.iter_chunks(
            # A job may read the id too (generate's template can name it): each column once.
            list(dict.fromkeys([options.id_col, *ctx.job.input_columns])),
            options.chunk_size,
            string_columns=ctx.job.string_columns,
        )

    def settle(self) -> None:
        for task in [t for t in self.active if t.done()]:
            self.active.discard(task)
            if task.cancelled():
                self.cancelled.append(asyncio.CancelledError())
            elif task.exception() is not None:
                self.failures.append(task.exception())

    async def room(self) -> None:
        while not _room_for_chunk(self.ctx, len(self.active), self.options.chunks_in_flight):
            await asyncio.wait(self.active, timeout=STARVED_POLL_S, return_when=asyncio.FIRST_COMPLETED)
            self.settle()

    async def first_pass(self) -> None:
        """Offer every chunk in order. The next ``LOOK_AHEAD`` chunks are read, hashed and looked up in
        the output meanwhile on worker threads (a rerun's whole work: reading Parquet and the parts it
        checks against runs beside the hashing of another chunk)."""
        ctx, total_rows = self.ctx, self.total_rows
        chunks = self._chunks()
        ahead: deque[tuple[pa.Table, int, int, asyncio.Future[PreparedChunk]]] = deque()
        started = 0
        first_row = 0
        pool = ThreadPoolExecutor(max_workers=LOOK_AHEAD, thread_name_prefix="gembatch-check")
        loop = asyncio.get_running_loop()
        try:
            while not ctx.stop_event.is_set():
                while len(ahead) < LOOK_AHEAD and first_row < total_rows:
                    chunk = await asyncio.to_thread(next, chunks, None)
                    if chunk is None:
                        total_rows = first_row
                        break
                    chunk = chunk.slice(0, total_rows - first_row)
                    future = loop.run_in_executor(pool, prepare_and_look_up, ctx, chunk)
                    ahead.append((chunk, started, first_row, future))
                    started += 1
                    first_row += chunk.num_rows
                if not ahead:
                    break
                await self.room()
                chunk, number, first, future = ahead.popleft()
                ready = await future
                if ctx.stop_event.is_set():
                    break
                if number % TRIM_EVERY_CHUNKS == TRIM_EVERY_CHUNKS - 1:
                    release_free_memory()  # chunks free many small blocks: see tasks/engine/memory.py
                await self.offer(chunk, number, first, ready)
                self.settle()
                if self.failures:
                    break
        finally:
            for *_, future in ahead:
                future.cancel()
            await asyncio.gather(*(f for *_, f in ahead), return_exceptions=True)
            pool.shutdown(wait=True)
            chunks.close()

    async def offer(self, chunk: pa.Table, number: int, first: int, ready: PreparedChunk | None = None) -> None:
        """Start the chunk's task if it has work and this run gets its claim; else count it or defer it."""
        ctx, claims = self.ctx, self.claims
        if not await precheck_chunk(ctx, chunk, number, ready):
            return  # nothing to send or write: counted, no task
        key = None
        if claims is not None:
            ready = ctx.prechecked[number]
            key = chunk_key(chunk.column(ctx.id_col).to_pylist(), ready.hashes)
            holder = await asyncio.to_thread(claims.acquire, key)
            if holder is not None:
                ctx.prechecked.pop(number, None)
                self._defer(number, first, chunk.num_rows, key, holder)
                return
            try:
                # Other runs may have written this chunk's rows since this run read the output.
                new = await asyncio.to_thread(
                    ctx.store.read_new_parts, self._known_parts(), ctx.id_col, run_id=ctx.run_id
                )
                new.add_to(ctx.index)
                if new.results:
                    ready.done = await asyncio.to_thread(ctx.index.pairs_done, ready.keys, chunk.column(ctx.id_col))
                keys = chunk_statuses(
                    ctx.index,
                    chunk.column(ctx.id_col),
                    ready.keys,
                    ready.invalid,
                    retry_errors=ctx.retry_errors,
                    done=ready.done,
                )
            except BaseException:
                await asyncio.to_thread(claims.release, key)
                raise
            if nothing_to_do(keys.status):
                ctx.prechecked.pop(number, None)
                count_skipped(ctx, keys.status)
                await asyncio.to_thread(claims.release, key)
                return
        self.active.add(asyncio.create_task(self._run(chunk, number, first, key)))

    async def _run(self, chunk: pa.Table, number: int, first: int, key: str | None):
        try:
            return await self.runner(self.ctx, chunk, number, first)
        finally:
            if key is not None:
                # The chunk's parts are written (or it failed): let other runs see it, check and go on.
                self.claims.release(key)

    def _defer(self, number: int, first: int, rows: int, key: str, holder: Holder) -> None:
        self.deferred[number] = _Deferred(first, key, holder)
        self.claims.decline(holder, f"chunk {number} (rows {first}-{first + rows - 1})", "sent")

    async def finish_deferred(self) -> None:
        """Wait for the chunks other runs held; then check each against the output: done → skipped,
        holder gone (its claim stale) → this run takes the claim over and sends what is missing."""
        ctx, claims = self.ctx, self.claims
        waited_from = time.monotonic()
        next_note = 0.0
        stopping = asyncio.ensure_future(ctx.stop_event.wait())
        try:
            while self.deferred and not ctx.stop_event.is_set() and not self.failures:
                keys = {n: d.key for n, d in self.deferred.items()}
                holders = await asyncio.to_thread(claims.holders_of, list(keys.values()))
                free = sorted(n for n, key in keys.items() if holders[key] is None)
                if free:
                    await self._second_pass(set(free))
                    continue
                for n, key in keys.items():
                    self.deferred[n].holder = holders[key]
                if time.monotonic() >= next_note:
                    next_note = time.monotonic() + WAIT_NOTE_S
                    claims_log.warning("waiting for %s", self._waiting_for(claims.policy.ttl_s))
                await asyncio.wait(
                    {*self.active, stopping},
                    timeout=claims.policy.poll_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                self.settle()
        finally:
            stopping.cancel()
            claims.waited_s += time.monotonic() - waited_from

    def _waiting_for(self, ttl_s: float) -> str:
        by_run: dict[str, list[int]] = {}
        holders: dict[str, Holder] = {}
        for n, d in sorted(self.deferred.items()):
            by_run.setdefault(d.holder.run_id, []).append(n)
            holders[d.holder.run_id] = d.holder
        parts = []
        for run_id, numbers in by_run.items():
            shown = ", ".join(str(n) for n in numbers[:8]) + (", …" if len(numbers) > 8 else "")
            parts.append(f"{len(numbers)} chunk(s) held by {holders[run_id].describe()} (chunks {shown})")
        return (
            "; ".join(parts) + f". When a holder finishes they are checked against the output; a claim not renewed for "
            f"{ttl_s:g} s counts as abandoned and this run sends its missing rows."
        )

    async def _second_pass(self, wanted: set[int]) -> None:
        """Read the input again for the chunks in ``wanted`` (memory stays bounded: chunks are not kept
        while they wait) and offer each once more."""
        ctx, total_rows = self.ctx, self.total_rows
        chunks = self._chunks()
        number = 0
        first_row = 0
        last = max(wanted)
        try:
            while first_row < total_rows and number <= last and not ctx.stop_event.is_set():
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                chunk = chunk.slice(0, total_rows - first_row)
                if number in wanted:
                    await self.room()
                    del self.deferred[number]
                    await self.offer(chunk, number, first_row)
                    self.settle()
                    if self.failures:
                        break
                number += 1
                first_row += chunk.num_rows
        finally:
            chunks.close()


async def _take_lease(store: OutputStore, run_id: str, policy: ClaimPolicy) -> ClaimBook:
    """Write this run's lease on the output folder and start renewing it (see tasks/engine/plan/claims.py);
    then wait while another run compacts the folder."""
    claims = ClaimBook(store.fs, store.root, run_id, policy)
    await asyncio.to_thread(claims.start)
    claims.ticking = asyncio.create_task(_tick(claims))
    try:
        await _wait_for_compaction(claims)
    except BaseException:
        await _give_up_lease(claims)
        raise
    return claims


async def _give_up_lease(claims: ClaimBook) -> None:
    if claims.ticking is not None:
        claims.ticking.cancel()
        await asyncio.gather(claims.ticking, return_exceptions=True)
    await asyncio.to_thread(claims.stop)


async def _tick(claims: ClaimBook) -> None:
    """Tell the heartbeat thread the event loop is alive (a stuck loop lets the claims lapse)."""
    while True:
        claims.tick()
        await asyncio.sleep(claims.policy.heartbeat_s / 2)


async def _wait_for_compaction(claims: ClaimBook) -> None:
    """A run compacting the folder rewrites and removes parts: start reading only after it is done.

    This run's lease is already written, so a run about to compact sees it and leaves compaction."""
    told = False
    while (holder := await asyncio.to_thread(claims.holder_of, COMPACT_KEY)) is not None:
        if not told:
            claims_log.warning("waiting: %s is compacting this output folder", holder.describe())
            told = True
        await asyncio.sleep(claims.policy.poll_s)


async def _compact_if_last(claims: ClaimBook, store: OutputStore, id_col: str, *, needed: bool) -> tuple[int, str]:
    """Tidy the folder only when no other run works on it: compact (supersede old records) when
    ``needed``, remove what killed runs left (temporary files, stale claims). A live run may be
    reading or writing the parts compaction rewrites, so otherwise the last run to finish does it.

    Returns the rows removed and what happened, for the run metadata."""
    await asyncio.to_thread(claims.end_lease)
    if others := await asyncio.to_thread(claims.other_runs):
        return 0, f"left to the last run: {others[0].describe()} still works on this folder" if needed else "not needed"
    if (holder := await asyncio.to_thread(claims.acquire, COMPACT_KEY)) is not None:
        return 0, f"left to {holder.describe()}, which is compacting" if needed else "not needed"
    try:
        # A run that started meanwhile wrote its lease before looking for this claim: one of us sees the other.
        if others := await asyncio.to_thread(claims.other_runs):
            return 0, f"left to the last run: {others[0].describe()} started on this folder" if needed else "not needed"
        await asyncio.to_thread(store.remove_temporary)
        await asyncio.to_thread(claims.sweep)
        if not needed:
            return 0, "not needed"
        return await asyncio.to_thread(store.compact, id_col), "done"
    finally:
        await asyncio.to_thread(claims.release, COMPACT_KEY)


class FirstRequestAlone:
    """The limiter, except that a run's first request goes alone and the others wait for its answer.

    For a job whose every request shares something the provider may refuse as a whole (extract's JSON
    schema): a refusal then stops the run after one request instead of a burst of them. Costs one
    round trip at the start. Everything else is the wrapped limiter's.
    """

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self._limiter = limiter
        self._leader_started = False
        self._answered = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._limiter, name)

    @property
    def starved(self) -> bool:
        # Requests waiting here are not queued in the limiter: it isn't short of rows, only waiting.
        return self._answered.is_set() and self._limiter.starved

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[float]:
        if self._answered.is_set() or self._leader_started:
            await self._answered.wait()
            async with self._limiter.slot(estimated_tokens) as started:
                yield started
            return
        self._leader_started = True
        try:
            async with self._limiter.slot(estimated_tokens) as started:
                yield started
        finally:
            self._answered.set()


def _room_for_chunk(ctx: RunContext, active: int, usual: int) -> bool:
    if active < usual:
        return True
    # A chunk still preparing its rows will soon queue requests: wait for it before judging.
    # No more rows on hand while the provider is down: nothing is being sent anyway.
    return active < MAX_CHUNKS_IN_FLIGHT and ctx.preparing == 0 and ctx.limiter.starved and not ctx.outage.is_open


def _answered_by_server(error: BaseException) -> bool:
    """An error a server, a gateway or the network made (not a bug): the run ends with its status and
    message like any stopped run, instead of raising."""
    try:
        classify_failure(error)
    except BaseException:  # noqa: BLE001 - classify_failure re-raises what it doesn't know
        return False
    return True


def _rerouted_warning(model: str, rerouted: dict[str, int], ctx: RunContext) -> str:
    served = ", ".join(f"{rows} by {name}" for name, rows in sorted(rerouted.items()))
    where = "their served_model column says which" if ctx.served_column else "see served_models in _runs/"
    return (
        f"warning: rows asked of {model} were answered by another model ({served}): the provider rerouted "
        f"it; {where}. Pick the model that answers with --model (an existing output: --change-model)"
    )


def _status(ctx: RunContext, error: BaseException | None, options: RunOptions) -> tuple[str, str]:
    if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
        return "interrupted", "the run was interrupted; rerun the same command to resume"
    if isinstance(error, RunStopped):
        return error.status, str(error)
    if isinstance(error, GembatchError):
        return "failed: " + type(error).__name__, str(error)
    if error is not None and _answered_by_server(error):
        failure = classify_failure(error)
        return f"failed: {failure.kind}", (
            f"{failure.message.rstrip('.')}. The run stopped there: what was finished is kept, and a rerun of the "
            "same command resumes (with --mode live if the failure was on a files or batches route)"
        )
    if error is not None:
        return "failed: " + type(error).__name__, f"{type(error).__name__}: {error}"
    if ctx.stopped is not None:
        return ctx.stopped.status, str(ctx.stopped)
    stats = ctx.stats
    if not stats.failed:
        return COMPLETED, ""
    pct = 100 * stats.failed / max(stats.input_rows, 1)
    auto, on_request = stats.failed_retry_auto, stats.failed - stats.failed_retry_auto
    parts = [f"{stats.failed} of {stats.input_rows} rows failed ({pct:.2f}%), see {options.output}/_errors/"]
    if auto:
        parts.append(f"{auto} failed on transient errors only (the next plain run sends them again)")
    if on_request:
        parts.append(f"{on_request} failed for their own input (resent only with --retry-errors)")
    detail = "; ".join(parts)
    if pct > options.max_failed_pct:
        return COMPLETED_WITH_ERRORS, f"{detail} (more than --max-failed-pct {options.max_failed_pct:g})"
    return COMPLETED, f"{detail} (within --max-failed-pct {options.max_failed_pct:g})"
