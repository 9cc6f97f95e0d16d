"""What every flow shares: the Prefect task per chunk, running the job (tracked or not), and the run summary artifact.

Prefect is imported only inside the flow's functions: the command line imports this module for the
options and for runs without a Prefect API (``run_untracked``), where importing Prefect would cost
seconds for nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from functools import cache
from typing import TYPE_CHECKING, Any

from flows.engine_options import options_of
from flows.local import local_provider
from tasks.engine.report.metadata import summary_rows
from tasks.engine.run import COMPLETED, run_job
from tasks.engine.send.chunk import process_chunk
from tasks.engine.send.limits import Limits
from tasks.errors import GembatchError, RunNotCompleted
from tasks.redact import redact_text

if TYPE_CHECKING:
    from flows.jobs import FlowJob
    from tasks.engine.options import RunOptions

__all__ = ["run_flow", "run_untracked"]


@cache
def _chunk_task():
    """One Prefect task per chunk, never per row. Called directly (not .submit()) so every chunk shares
    the flow's event loop, its AsyncOpenAI client and its limiter. Made on first use (``chunk_task``)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(
        process_chunk,
        name="chunk",
        task_run_name="chunk-{index}",
        cache_policy=NO_CACHE,
        persist_result=False,
    )


def __getattr__(name: str) -> Any:
    if name == "chunk_task":
        return _chunk_task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def run_flow(flow_job: FlowJob) -> dict[str, Any]:
    """Run a built job inside the current flow: chunks as Prefect tasks, summary as a table artifact.

    A :class:`GembatchError` (wrong key, unknown model, bad input…) fails the flow run with its message
    and is raised to the caller as it is. A run that ends other than ``completed`` (rows failed past
    --max-failed-pct, or stopped early) fails the flow run too, so schedules and alerts notice: the
    caller gets :class:`RunNotCompleted`, whose ``document`` is the run metadata.
    """
    from prefect import get_run_logger
    from prefect.states import Failed

    try:
        document = await _run(flow_job)
    except GembatchError as exc:
        # The message says what to do; Prefect's traceback would only bury it.
        message = redact_text(str(exc))
        get_run_logger().error("%s", message)
        from flows.events import emit_refused

        emit_refused(flow_job.job.name, flow_job.recorded(), message)
        return Failed(message=message, data=exc)
    if document["status"] not in (COMPLETED, "dry run"):
        problem = RunNotCompleted(document)
        return Failed(message=redact_text(str(problem)), data=problem)
    return document


async def run_untracked(flow_job: FlowJob) -> dict[str, Any]:
    """The same run (or dry run) as the job's flow, without Prefect: no flow run, no task runs, no
    artifact, ``flow_run_id`` null in the metadata. What `gembatch` does when no Prefect API is set."""
    options = options_of(flow_job)
    if options.dry_run:
        from tasks.engine.dry_run import plan_job

        return await plan_job(flow_job.job, options, flow_job.recorded())
    if flow_job.options.shards > 1 and not flow_job.options.shard:
        raise GembatchError(
            "--shards runs each part as a flow run on a Prefect work pool, and no Prefect API is configured: "
            "set PREFECT_API_URL to your server (docs/how-to/scale-out.md), or drop --shards"
        )
    with local_provider(options.provider) as provider:
        return await run_job(
            flow_job.job, dataclasses.replace(options, provider=provider), parameters=flow_job.recorded()
        )


async def _shared_limits(host: str, model: str, limits: Limits) -> Any:
    """A tracked run shares its quota with every other on the same host and model (docs/how-to/scale-out.md)."""
    from tasks.engine.send.shared_limits import open_shared_limits

    return await open_shared_limits(host, model, limits.rpm, limits.tpm, window_s=limits.window_s)


async def _run(flow_job: FlowJob) -> dict[str, Any]:
    from prefect import get_run_logger

    from flows.shards import sharded

    job, options = flow_job.job, options_of(flow_job)
    if options.dry_run:
        from tasks.engine.dry_run import plan_job

        document = await plan_job(job, options, flow_job.recorded())
        get_run_logger().info("dry run: %s", document["counts"] | document["estimate"])
        return document
    if sharded(flow_job.options):
        document = await _run_shards(flow_job)
    else:
        document = await _run_one(flow_job, options)
    await _report(job.name, document)
    return document


async def _run_shards(flow_job: FlowJob) -> dict[str, Any]:
    """The parent of ``--shards N``: its shards' flow runs, their live table added up, one end event."""
    from flows import events
    from flows.shards import run_sharded

    shards = events.ShardsWatch(flow_job.job.name)
    adding_up = asyncio.create_task(shards.run())
    try:
        document = await run_sharded(flow_job)
    finally:
        adding_up.cancel()
        await asyncio.gather(adding_up, return_exceptions=True)
    await shards.update()
    events.emit_end(document)
    return document


async def _run_one(flow_job: FlowJob, options: RunOptions) -> dict[str, Any]:
    """One run (or one shard) in this flow run: chunks as grouped task runs, progress and events told."""
    from prefect.runtime import flow_run

    from flows import events
    from flows.chunk_groups import tracked_chunk_groups
    from flows.shards import heartbeat

    job = flow_job.job
    shard = str(options.shard) if options.shard else None
    # A shard stamps its flow run while it lives: the parent tells a dead worker's shard by the silence.
    beat = asyncio.create_task(heartbeat(str(flow_run.id))) if options.shard and flow_run.id else None
    events.quiet_chunk_logs()
    # At most about a hundred chunk task runs, however large the input (flows/chunk_groups.py).
    chunks = tracked_chunk_groups(_chunk_task(), chunk_size=options.chunk_size)
    try:
        with local_provider(options.provider) as provider:
            return await run_job(
                job,
                dataclasses.replace(options, provider=provider),
                parameters=flow_job.recorded(),
                chunk_runner=chunks,
                flow_run_id=str(flow_run.id) if flow_run.id else None,
                shared_limits=_shared_limits,
                observer=events.PrefectObserver(job.name, label=f"shard {shard}" if shard else "this run"),
            )
    finally:
        await chunks.close()
        if beat is not None:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)


async def _report(job_name: str, document: dict[str, Any]) -> None:
    """The run's summary as a table artifact, and its counts (and any message) in the flow run's log."""
    from prefect import get_run_logger
    from prefect.artifacts import acreate_table_artifact

    await acreate_table_artifact(
        key=f"gembatch-{job_name}-run",
        table=summary_rows(document),
        description=f"gembatch {job_name} run {document['run_id']}: {document['status']}",
    )
    logger = get_run_logger()
    c = document["counts"]
    logger.info(
        "%s: %s rows in, %s skipped (done), %s deduplicated, %s succeeded, %s failed, %s not attempted; "
        "%s requests, %s 429s. Metadata: %s/_runs/%s.json",
        document["status"],
        c["input_rows"],
        c["skipped_done"],
        c["deduplicated"],
        c["succeeded"],
        c["failed"],
        c["not_attempted"],
        document["requests"]["sent"],
        document["requests"]["rate_limited_429"],
        redact_text(document["output"]["path"]),
        document["run_id"],
    )
    if document["status"] != COMPLETED:
        logger.error("%s — %s", document["status"], redact_text(document["message"]))
    elif document["message"]:
        logger.warning("%s", redact_text(document["message"]))
