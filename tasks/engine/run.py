"""One run of a job from start to finish: checks, planning, the chunk fan-out, metadata."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from tasks.defaults import DEFAULT_CHUNK_SIZE
from tasks.engine.budget import Budget
from tasks.engine.chunk import ChunkRunner, Job, RetryPolicy, RunContext, precheck_chunk, process_chunk
from tasks.engine.io import InputSource, check_ids
from tasks.engine.limits import AdaptiveLimiter, Limits
from tasks.engine.memory import release_free_memory
from tasks.engine.metadata import counts, new_run_id, package_versions, usage, utc_now
from tasks.engine.outage import OutageBreaker, OutagePolicy
from tasks.engine.progress import ProgressBar
from tasks.engine.store import OutputStore
from tasks.errors import GembatchError
from tasks.provider.client import ProviderSettings, check_model, open_connection, require_key

__all__ = ["DEFAULT_CHUNK_SIZE", "COMPLETED", "COMPLETED_WITH_ERRORS", "RunOptions", "preflight", "run_job"]

DEFAULT_CHUNKS_IN_FLIGHT = 4
MAX_CHUNKS_IN_FLIGHT = 32
STARVED_POLL_S = 0.1
TRIM_EVERY_CHUNKS = 50
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
    # When the provider is down (its max_outage_s is --max-outage): see tasks/engine/outage.py.
    outage: OutagePolicy = field(default_factory=OutagePolicy)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunks_in_flight: int = DEFAULT_CHUNKS_IN_FLIGHT
    limit: int | None = None
    retry_errors: bool = False
    progress: bool = False
    max_cost_usd: float | None = None
    force: bool = False
    dry_run: bool = False
    # A run whose failed rows are more than this share of its input (in %) is "completed with errors".
    max_failed_pct: float = 0.0

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be at least 1, got {self.chunk_size}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be 0 or more, got {self.limit}")
        if not 0 <= self.max_failed_pct <= 100:
            raise ValueError(f"--max-failed-pct must be within 0-100, got {self.max_failed_pct}")


def preflight(job: Job, options: RunOptions) -> InputSource:
    """The checks that need no server: the key is set, the input opens and has the columns."""
    if not options.dry_run:
        require_key(options.provider)
    source = InputSource.open(options.input)
    source.require_columns([options.id_col, *job.input_columns])
    return source


async def run_job(
    job: Job,
    options: RunOptions,
    *,
    parameters: dict[str, Any] | None = None,
    chunk_runner: ChunkRunner = process_chunk,
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """Run ``job`` over ``options.input`` into ``options.output``; returns the run metadata document.

    Raises :class:`GembatchError` for problems found before any work, and re-raises an unexpected
    error after writing the metadata of what was done.
    """
    started = utc_now()
    run_id = new_run_id(started)
    source = preflight(job, options)
    conn = open_connection(options.provider)
    try:
        await check_model(conn, job.model, key_source=options.provider.key_source)
        budget = Budget.for_job(options.max_cost_usd, job) if options.max_cost_usd is not None else None
        total_rows = await asyncio.to_thread(check_ids, source, options.id_col, limit=options.limit)
        release_free_memory()
        store = OutputStore(options.output)
        await asyncio.to_thread(store.prepare)
        await asyncio.to_thread(store.claim, job=job.name, model=job.model, run_id=run_id, force=options.force)
        index = await asyncio.to_thread(store.scan, options.id_col)
        limiter = AdaptiveLimiter(options.limits)
        document: dict[str, Any] = {
            "run_id": run_id,
            "flow_run_id": flow_run_id,
            "job": job.name,
            "status": "running",
            "message": "",
            "parameters": parameters or {},
            "provider": {"name": conn.provider, "host": conn.host, "base_url": conn.base_url, "model": job.model},
            "job_parameters": job.parameters(),
            "input": {
                "path": source.path,
                "format": source.format,
                "size_bytes": source.size_bytes,
                "rows": total_rows,
                "fingerprint": await asyncio.to_thread(source.fingerprint),
            },
            "output": {"path": options.output, "existing_result_rows": index.result_rows},
            "started_at": started.isoformat(),
            "limits": limiter.describe(),
            "versions": package_versions(),
        }
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
        progress = ProgressBar(f"{job.name} {job.model}", total_rows, ctx.stats, enabled=options.progress)
        ctx.on_progress = progress.advance
        ctx.stats.input_rows = total_rows
        error: BaseException | None = None
        try:
            await _drive(ctx, source, options, total_rows, chunk_runner)
        except (Exception, asyncio.CancelledError, KeyboardInterrupt) as exc:
            error = exc
        finally:
            progress.close()
        status, message = _status(ctx, error, options)
        stats = ctx.stats
        stats.not_attempted += max(0, total_rows - stats.rows_accounted())
        removed = 0
        # Superseding: only an output that held rows before this run can hold two records of one id
        # (the input's ids are unique). The index is freed first: compaction needs its own memory.
        had_rows = index.result_rows + index.error_rows > 0
        index.clear()
        if had_rows and (stats.parts_written or stats.error_parts_written):
            removed = await asyncio.to_thread(store.compact, options.id_col)
        finished = utc_now()
        duration = (finished - started).total_seconds()
        tokens, cost = usage(stats, job.model, per_image_usd=getattr(job, "per_image_usd", None))
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
        document["output"].update(
            {
                "parts_written": [p.rsplit("/", 1)[-1] for p in stats.parts_written],
                "error_parts_written": [p.rsplit("/", 1)[-1] for p in stats.error_parts_written],
                "superseded_rows_removed": removed,
            }
        )
        await asyncio.to_thread(store.write_run, run_id, document)
        if error is not None:
            raise error
        return document
    finally:
        await conn.close()


async def _drive(
    ctx: RunContext, source: InputSource, options: RunOptions, total_rows: int, runner: ChunkRunner
) -> None:
    """Read chunks and run ``chunks_in_flight`` of them at once, more while the limiter is starved.

    Memory is bounded by the chunks in flight. ``chunks_in_flight`` is the usual number; when the rate
    and the latency need more rows in flight than those chunks hold (embeddings: 100 rows a request,
    at 5 s latency), more chunks start, up to ``MAX_CHUNKS_IN_FLIGHT``.
    """
    chunks = source.iter_chunks(
        [options.id_col, *ctx.job.input_columns], options.chunk_size, string_columns=ctx.job.string_columns
    )
    # Finished chunks are let go (a 10-million-row run has 5,000 of them); only their first error is kept.
    active: set[asyncio.Task] = set()
    failures: list[BaseException] = []
    cancelled: list[BaseException] = []
    started = 0
    first_row = 0

    def settle() -> None:
        for task in [t for t in active if t.done()]:
            active.discard(task)
            if task.cancelled():
                cancelled.append(asyncio.CancelledError())
            elif task.exception() is not None:
                failures.append(task.exception())

    try:
        while first_row < total_rows and not ctx.stop_event.is_set():
            while not _room_for_chunk(ctx, len(active), options.chunks_in_flight):
                await asyncio.wait(active, timeout=STARVED_POLL_S, return_when=asyncio.FIRST_COMPLETED)
                settle()
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None or ctx.stop_event.is_set():
                break
            chunk = chunk.slice(0, total_rows - first_row)
            number, first = started, first_row
            started += 1
            first_row += chunk.num_rows
            if number % TRIM_EVERY_CHUNKS == TRIM_EVERY_CHUNKS - 1:
                release_free_memory()  # chunks free many small blocks: see tasks/engine/memory.py
            if not await precheck_chunk(ctx, chunk, number):
                continue  # nothing to send or write: counted, no task
            task = asyncio.create_task(runner(ctx, chunk, number, first))
            active.add(task)
            settle()
            if failures:
                break
    finally:
        results = await asyncio.gather(*active, return_exceptions=True)
        chunks.close()
    for result in [*failures, *results, *cancelled]:
        if isinstance(result, BaseException):
            raise result


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


def _status(ctx: RunContext, error: BaseException | None, options: RunOptions) -> tuple[str, str]:
    if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
        return "interrupted", "the run was interrupted; rerun the same command to resume"
    if isinstance(error, GembatchError):
        return "failed: " + type(error).__name__, str(error)
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
