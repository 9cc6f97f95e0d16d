"""``--shards N``: one job over many workers, as flow runs of the job's deployment on its work pool.

The job's flow, given ``options.shards`` > 1, becomes the parent: it checks the input once, starts one
flow run per shard (``run_deployment`` of the job's deployment with ``--shard I/N``), watches them, runs
a crashed shard again, compacts the output once when every shard is over (and syncs a ``lancedb://``
output's table: the shards leave it to the parent), and writes one summary in ``OUTPUT/_runs/`` that
adds the shards up.

A shard whose process died is found two ways. While its worker lives, the worker sees the process end
and Prefect marks the run Crashed. When the worker died with it (a machine lost, ``kill -9`` of the
worker) the run stays Running or Pending on the server with nobody behind it: so every shard stamps a
heartbeat label on its flow run every ``HEARTBEAT_S`` seconds, and the parent marks Crashed a shard
whose worker (its ``prefect.worker.name`` label) has stopped sending its own heartbeats and that gave
no sign of life itself (a stamp, a change of state) for ``STALE_S`` seconds. Both must hold: a busy
machine delays stamps by tens of seconds, and a worker killed alone leaves its flow runs running.
A crashed shard is started again (flow ``retries`` don't cover Crashed runs) and resumes from the
parts it wrote: rows already in the output are skipped, not sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from flows.params import CommonOptions
from flows.shard_summary import rows_written_by, shard_documents, sharded_summary
from tasks.engine.report.metadata import input_record, new_run_id, package_versions, utc_now
from tasks.errors import ConfigError
from tasks.redact import redact_data
from tasks.sinks.lance import TableSink
from tasks.sinks.lance_sync import sync_after_shards

if TYPE_CHECKING:
    from flows.jobs import FlowJob

__all__ = ["BASE_URL_SECRET_PREFIX", "HEARTBEAT_LABEL", "heartbeat", "run_sharded", "sharded"]

HEARTBEAT_LABEL = "gembatch.heartbeat"
# The Prefect Secret block that hands the shards a base URL with credentials in it.
BASE_URL_SECRET_PREFIX = "gembatch-base-url-"
HEARTBEAT_S = 3.0
# A shard with no sign of life for this long is taken for dead (see the module's text).
STALE_S = 20.0
# A worker that missed this many of its heartbeats is gone.
WORKER_MISSED_BEATS = 4
# A shard with no sign of life for this long is taken for dead whatever its worker says.
START_TIMEOUT_S = 900.0
POLL_S = 1.0
# A shard is started at most this many times (the first run and its restarts after crashes).
MAX_ATTEMPTS = 4


async def heartbeat(flow_run_id: str) -> None:
    """Stamp the time on this flow run every ``HEARTBEAT_S`` seconds, until cancelled."""
    from uuid import UUID

    from prefect import get_run_logger
    from prefect.client.orchestration import get_client

    failures = 0
    while True:
        try:
            async with get_client() as client:
                while True:
                    stamp = {HEARTBEAT_LABEL: f"{time.time():.1f}"}
                    await client.update_flow_run_labels(UUID(flow_run_id), stamp)
                    failures = 0
                    await asyncio.sleep(HEARTBEAT_S)
        except Exception as exc:  # noqa: BLE001 - a missed stamp is tried again; the run goes on
            failures += 1
            if failures in (1, 10):
                get_run_logger().warning("heartbeat not stamped (%s): %s", failures, exc)
            await asyncio.sleep(HEARTBEAT_S)


@dataclass
class _Shard:
    number: int
    count: int
    flow_run_ids: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    current: Any = None  # the FlowRun being watched
    done: bool = False
    started_at: float = 0.0
    restarts: int = 0

    @property
    def spec(self) -> str:
        return f"{self.number}/{self.count}"


async def run_sharded(flow_job: FlowJob) -> dict[str, Any]:
    """Run the job as ``options.shards`` flow runs of its deployment; returns the summary document."""
    from prefect.runtime import flow_run

    from flows.engine_options import options_of
    from flows.events import emit_started
    from tasks.engine.plan.input import check_ids
    from tasks.engine.preflight import preflight
    from tasks.engine.store.lease import claim_output
    from tasks.engine.store.output import OutputStore

    job, options, count = flow_job.job, options_of(flow_job), flow_job.options.shards
    if options.limit is not None:
        raise ConfigError("--limit and --shards don't go together: shard the whole input, or run --limit alone")
    started = utc_now()
    run_id = new_run_id(started)
    source = preflight(job, options)
    sink = TableSink.for_run(job.name, options.output, options.id_col, flow_job.recorded())
    total_rows = await asyncio.to_thread(check_ids, source, options.id_col, limit=None)
    store = OutputStore(options.output)
    await asyncio.to_thread(store.prepare)
    await claim_output(store, job, run_id, options)
    had_rows = bool(store.result_files() or store.error_files())
    deployment_id = await _deployment_of_this_flow()
    document = {
        "run_id": run_id,
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        **await _parent_record(flow_job, source, total_rows, options.output),
        "started_at": started.isoformat(),
        "deployment_id": deployment_id,
    }
    await asyncio.to_thread(store.write_run, run_id, document)
    emit_started(document, total_rows)  # the parent's own start, before its shards'
    shards = [_Shard(i, count) for i in range(1, count + 1)]
    await _drive(shards, deployment_id, flow_job)
    removed = 0
    # A shard taken for dead may have lived on and written rows its rerun wrote too: compaction keeps one.
    if had_rows or any(s.restarts for s in shards):
        removed = await asyncio.to_thread(store.compact, options.id_col)
    # The shards left the output's key cache to this parent (OUTPUT/_index/): one file for the next run.
    await asyncio.to_thread(store.refresh_key_cache, options.id_col)
    if sink is not None:
        document["output"]["table"] = await sync_after_shards(sink, store, source, run_id=run_id)
    finished = utc_now()
    docs = await asyncio.to_thread(shard_documents, store, shards)
    crashed = {d["run_id"] for s in shards for fid in s.flow_run_ids[:-1] if (d := docs.get(fid))}
    written = await asyncio.to_thread(rows_written_by, store, crashed) if crashed else {}
    summary = sharded_summary(shards, docs, (finished - started).total_seconds(), written)
    document["output"].update(summary.pop("parts"), superseded_rows_removed=removed)
    document.update(summary, finished_at=finished.isoformat())
    if document["provider"]["model"] is None:
        document["provider"]["model"] = job.model
    await asyncio.to_thread(store.write_run, run_id, document)
    return document


async def _parent_record(flow_job: FlowJob, source: Any, total_rows: int, output: str) -> dict[str, Any]:
    """The parent's run metadata as it starts: the job, its parameters (redacted), input and output."""
    return {
        "job": flow_job.job.name,
        "status": "running",
        "message": "",
        "parameters": redact_data(flow_job.recorded()),
        "job_parameters": flow_job.job.parameters(),
        "input": await asyncio.to_thread(input_record, source, total_rows),
        "output": {"path": output},
        "versions": package_versions(),
    }


async def _drive(shards: list[_Shard], deployment_id: str, flow_job: FlowJob) -> None:
    """Start every shard's flow run and watch them to the end (restarting a dead one)."""
    handed = await _base_url_by_secret(flow_job)
    try:
        await asyncio.gather(*(_start(s, deployment_id, handed) for s in shards))
        await _watch(shards, deployment_id, handed)
    except BaseException:
        # Interrupted (Ctrl-C, the parent's flow run cancelled): the shards stop too, resumable.
        await asyncio.shield(_cancel(shards))
        raise


async def _deployment_of_this_flow() -> str:
    """The deployment the shards run as: this flow run's own, or the only deployment of this flow."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.runtime import deployment, flow_run

    if deployment.id:
        return str(deployment.id)
    name = flow_run.flow_name
    async with get_client() as client:
        found = await client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
    if len(found) == 1:
        return str(found[0].id)
    if not found:
        raise ConfigError(
            f"--shards runs the shards as flow runs of a deployment of {name}, and there is none: deploy it "
            "(prefect deploy --prefect-file deployments.yaml) and start workers on its pool (docs/how-to/scale-out.md)"
        )
    names = ", ".join(sorted(f"{name}/{d.name}" for d in found))
    raise ConfigError(
        f"--shards: {name} has {len(found)} deployments ({names}); run the one to shard with "
        f"`prefect deployment run {name}/<name> --param options='{{\"shards\": N}}'`"
    )


async def _base_url_by_secret(flow_job: FlowJob) -> FlowJob:
    """The job the shards are started with: a base URL with credentials in it goes by a Prefect Secret block.

    Prefect keeps a flow run's parameters in clear, and a shard may run on another machine, which must
    still reach the gateway with the credentials. So the parent saves the URL in a Secret block (kept
    encrypted by the server, never shown in full) named after the URL's hash, and the shards get the
    URL with its credentials redacted (where it points: the host, the path) plus the block's name.
    """
    from prefect.blocks.system import Secret

    from tasks.redact import redact_url

    options = flow_job.options
    url = options.base_url
    if not url or options.base_url_secret or redact_url(url) == url:
        return flow_job
    name = f"{BASE_URL_SECRET_PREFIX}{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    await Secret(value=url).asave(name, overwrite=True)
    handed = options.model_copy(update={"base_url": redact_url(url), "base_url_secret": name})
    return replace(flow_job, options=handed)


def _child_parameters(flow_job: FlowJob, shard: _Shard) -> dict[str, Any]:
    """The shard's flow arguments: the parent's own (its model the one chosen) and its options for one part."""
    options = flow_job.options.model_copy(update={"shards": 1, "shard": shard.spec, "progress": False})
    return dict(flow_job.arguments) | {"options": options.model_dump(exclude_defaults=True)}


async def _start(shard: _Shard, deployment_id: str, flow_job: FlowJob) -> None:
    from prefect.deployments import run_deployment

    flow_run = await run_deployment(
        deployment_id,
        parameters=_child_parameters(flow_job, shard),
        timeout=0,
        flow_run_name=f"shard-{shard.number}-of-{shard.count}" + (f"-retry-{shard.restarts}" if shard.restarts else ""),
        tags=["gembatch-shard"],
    )
    shard.current = flow_run
    shard.flow_run_ids.append(str(flow_run.id))
    shard.started_at = time.monotonic()


async def _watch(shards: list[_Shard], deployment_id: str, flow_job: FlowJob) -> None:
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    logger = get_run_logger()
    async with get_client() as client:
        while not all(s.done for s in shards):
            await asyncio.sleep(POLL_S)
            for shard in [s for s in shards if not s.done]:
                run = await client.read_flow_run(shard.current.id)
                state = run.state
                if state is None:
                    continue
                why = await _dead(client, run) if state.is_running() or state.is_pending() else None
                if why is not None:
                    await client.set_flow_run_state(run.id, Crashed(message=f"shard {shard.spec}: {why}"), force=True)
                    state = (await client.read_flow_run(run.id)).state
                if not state.is_final():
                    continue
                shard.states.append(state.type.value)
                if state.is_crashed() and len(shard.flow_run_ids) < MAX_ATTEMPTS:
                    shard.restarts += 1
                    logger.warning(
                        "shard %s crashed (%s); starting it again (attempt %s): it resumes from what it wrote",
                        shard.spec,
                        state.message,
                        shard.restarts + 1,
                    )
                    await _start(shard, deployment_id, flow_job)
                    continue
                shard.done = True
                logger.info("shard %s: %s", shard.spec, state.type.value)


async def _cancel(shards: list[_Shard]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    async with get_client() as client:
        for shard in shards:
            if shard.done or shard.current is None:
                continue
            try:
                await client.set_flow_run_state(shard.current.id, Cancelling(message="the parent run stopped"))
            except Exception:  # noqa: BLE001 - best effort: the shard can also be cancelled in the UI
                pass


async def _dead(client: Any, run: Any) -> str | None:
    """Why a Running or Pending shard is taken for dead, or None while it lives (or may)."""
    labels = run.labels or {}
    try:
        stamp = float(labels.get(HEARTBEAT_LABEL, 0.0))
    except ValueError:
        stamp = 0.0
    changed = run.state.timestamp.timestamp() if run.state and run.state.timestamp else 0.0
    silent = time.time() - max(stamp, changed)
    if silent <= STALE_S:
        return None
    worker = labels.get("prefect.worker.name")
    if worker and run.work_pool_name and await _worker_gone(client, run.work_pool_name, worker):
        return f"its worker {worker} stopped sending heartbeats, and the shard gave no sign of life for {silent:.0f} s"
    if silent > START_TIMEOUT_S:
        return f"no sign of life for {silent:.0f} s"
    return None


async def _worker_gone(client: Any, pool: str, name: str) -> bool:
    found = [w for w in await client.read_workers_for_work_pool(pool) if w.name == name]
    if not found:
        return True
    worker = found[0]
    if worker.status.value == "OFFLINE" or worker.last_heartbeat_time is None:
        return True
    interval = worker.heartbeat_interval_seconds or 30
    age = time.time() - worker.last_heartbeat_time.timestamp()
    return age > WORKER_MISSED_BEATS * interval + POLL_S


def sharded(options: CommonOptions) -> bool:
    """Is this run the parent of shards?"""
    return options.shards > 1 and options.shard is None and not options.dry_run
