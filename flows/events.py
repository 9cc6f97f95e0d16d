"""A tracked run as an operator sees it in Prefect: its name, its live progress, its events.

- The flow run is named after what it does (``embed corpus.parquet → s3://bucket/emb``, a shard
  ``… shard 2/4``) instead of Prefect's random ``winged-moth``, from its first log line on
  (flows/prefect_flow.py).
- While it works, a progress artifact (percent of rows settled) and a one-row table (rows done,
  failed and left, requests, 429s, tokens, cost so far, rate, ETA) are updated every few seconds
  (tasks/engine/report/live.py); a sharded run's parent adds up its shards' tables, one row each.
- Events that automations trigger on (docs/reference/events.md): ``gembatch.run.started``; one end
  event, ``gembatch.run.completed`` / ``.completed-with-errors`` / ``.stopped`` / ``.failed``; a stop
  at the moment it happens (``gembatch.run.stopping.daily-quota`` …); ``gembatch.run.cost-passed``
  at 1, 2, 5, 10, 20, 50 … USD.

Only tracked runs import this module (it imports Prefect). Nothing here may fail a run: every call to
the Prefect API is best effort (a warning, then the run goes on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import PurePosixPath
from typing import Any
from uuid import UUID

from tasks.engine.report.live import Snapshot, watch_every_s
from tasks.redact import redact_text, redact_url

__all__ = [
    "EVENT_PREFIX",
    "PrefectObserver",
    "end_event",
    "end_payload",
    "live_row",
    "quiet_chunk_logs",
    "resource_of",
    "run_title",
    "stop_event",
    "ShardsWatch",
]

log = logging.getLogger("gembatch.events")

EVENT_PREFIX = "gembatch.run"
MAX_SHOWN_PATH = 48  # characters of an input or output path shown in a flow run's name
LIVE_COLUMNS = ("run", "done", "failed", "left", "percent", "requests", "429s", "tokens", "cost USD", "rows/s", "ETA")


def _short(path: str) -> str:
    """``path`` (redacted) short enough for a name: a long one keeps its start and its last part."""
    shown = redact_url(path)
    if len(shown) <= MAX_SHOWN_PATH:
        return shown
    head, _, last = shown.rstrip("/").rpartition("/")
    scheme, sep, rest = head.partition("://")
    start = f"{scheme}{sep}{rest.split('/', 1)[0]}" if sep else head.split("/", 1)[0]
    return f"{start}/…/{last}"


def run_title(job: str, input_path: str, output: str, shard: str | None = None) -> str:
    """A flow run's name: the job, the input's file name, the output (``embed corpus.parquet → out/emb``)."""
    source = PurePosixPath(redact_url(input_path).rstrip("/")).name or _short(input_path)
    title = f"{job} {source} → {_short(output)}"
    return f"{title} shard {shard}" if shard else title


def quiet_chunk_logs() -> None:
    """Leave out each chunk task run's "Finished in state Completed()" line (INFO): a 10-million-row run
    has 5,000 chunks, and those lines bury the run's own. A chunk that fails still logs (ERROR)."""
    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def end_event(status: str) -> str:
    """The event a run that ended with ``status`` sends (docs/reference/events.md)."""
    if status == "completed":
        return f"{EVENT_PREFIX}.completed"
    if status == "completed with errors":
        return f"{EVENT_PREFIX}.completed-with-errors"
    if status.startswith("stopped") or status == "interrupted":
        return f"{EVENT_PREFIX}.stopped"
    return f"{EVENT_PREFIX}.failed"


def stop_event(status: str) -> str | None:
    """The event sent the moment a run decides to stop: ``stopped: daily quota`` →
    ``gembatch.run.stopping.daily-quota``; None for a status that is not a stop."""
    if not status.startswith("stopped:"):
        return None
    return f"{EVENT_PREFIX}.stopping.{_slug(status.removeprefix('stopped:')) or 'other'}"


def _reason(status: str) -> str | None:
    if status.startswith("stopped:"):
        return status.removeprefix("stopped:").strip()
    if status.startswith("failed:"):
        return status.removeprefix("failed:").strip()
    return "interrupted" if status == "interrupted" else None


def resource_of(job: str, output: str, *, run_id: str, model: str | None = None, shard: str | None = None) -> dict:
    """The resource every event of a run is about: its output (redacted), labelled with the job, model,
    run id and shard, so that an automation can match on any of them."""
    shown = redact_url(output)
    resource = {
        "prefect.resource.id": f"gembatch.output.{shown}",
        "prefect.resource.name": shown,
        "gembatch.job": job,
        "gembatch.run-id": run_id,
    }
    if model:
        resource["gembatch.model"] = model
    if shard:
        resource["gembatch.shard"] = shard
    return resource


def _document_resource(document: dict[str, Any]) -> dict[str, str]:
    return resource_of(
        document["job"],
        document["output"]["path"],
        run_id=document["run_id"],
        model=(document.get("provider") or {}).get("model") or (document.get("job_parameters") or {}).get("model"),
        shard=document.get("shard"),
    )


def end_payload(document: dict[str, Any]) -> dict[str, Any]:
    """What an end event carries, from the run document (``_runs/<run-id>.json``): status, reason,
    message, counts, requests, tokens, cost, duration. Secrets in URLs are redacted."""
    status = document["status"]
    requests = document.get("requests") or {}
    return {
        "run_id": document["run_id"],
        "flow_run_id": document.get("flow_run_id"),
        "job": document["job"],
        "model": (document.get("provider") or {}).get("model"),
        "status": status,
        "reason": _reason(status),
        "message": redact_text(document.get("message") or ""),
        "counts": dict(document.get("counts") or {}),
        "requests": requests.get("sent"),
        "rate_limited_429": requests.get("rate_limited_429"),
        "tokens": (document.get("tokens") or {}).get("total"),
        "cost_usd": (document.get("cost") or {}).get("estimated_usd"),
        "duration_s": document.get("duration_s"),
        "input": redact_url((document.get("input") or {}).get("path") or ""),
        "output": redact_url(document["output"]["path"]),
        **({"shard": document["shard"]} if document.get("shard") else {}),
    }


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def live_row(label: str, now: Snapshot) -> dict[str, Any]:
    """One row of the live table (numbers stay numbers: a sharded run's parent adds them up)."""
    return {
        "run": label,
        "done": now.done,
        "failed": now.failed,
        "left": now.left,
        "percent": now.percent,
        "requests": now.requests,
        "429s": now.rate_limited,
        "tokens": now.tokens,
        "cost USD": "n/a" if now.cost_usd is None else round(now.cost_usd, 4),
        "rows/s": now.rows_per_s if now.rows_per_s is not None else "-",
        "ETA": _eta(now.eta_s),
    }


def _description(job: str, now: Snapshot) -> str:
    rate = f"{now.rows_per_s:,.0f} rows/s" if now.rows_per_s else "rate: -"
    cost = "" if now.cost_usd is None else f", ${now.cost_usd:,.4f} so far"
    return (
        f"{now.percent:g}% · {job}: {now.settled:,} of {now.total:,} rows settled ({now.failed:,} failed), {rate}, "
        f"ETA {_eta(now.eta_s)}, {now.rate_limited:,} 429s{cost}"
    )


def _emit(event: str, resource: dict[str, str], payload: dict[str, Any]) -> None:
    from prefect.events import emit_event

    try:
        emit_event(event=event, resource=resource, payload=payload)
    except Exception as exc:  # noqa: BLE001 - best effort
        log.warning("could not send event %s (the run goes on): %s", event, exc)


class _Artifacts:
    """The run's progress artifact and live table: made once, then updated in place."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.progress_id: UUID | None = None
        self.table_id: UUID | None = None

    async def show(self, rows: list[dict[str, Any]], now: Snapshot) -> None:
        from prefect.artifacts import acreate_progress_artifact, acreate_table_artifact, aupdate_progress_artifact
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        description = _description(self.job, now)
        # Each is made once (again at the next update if the API did not answer), then updated in place.
        if self.progress_id is None:
            self.progress_id = await acreate_progress_artifact(
                now.percent, key=f"gembatch-{self.job}-progress", description=description
            )
        else:
            await aupdate_progress_artifact(self.progress_id, now.percent, description=description)
        if self.table_id is None:
            self.table_id = await acreate_table_artifact(rows, key=f"gembatch-{self.job}-live", description=description)
            return
        async with get_client() as client:
            await client.update_artifact(self.table_id, ArtifactUpdate(data=json.dumps(rows), description=description))


class PrefectObserver:
    """A :class:`tasks.engine.report.live.RunObserver` that shows a run in Prefect (artifacts, events)."""

    def __init__(self, job: str, *, label: str = "this run") -> None:
        self.job = job
        self.label = label
        self.artifacts = _Artifacts(job)
        self.resource: dict[str, str] = {}

    async def started(self, document: dict[str, Any], first: Snapshot) -> None:
        self.resource = emit_started(document, first.total)
        await self.artifacts.show([live_row(self.label, first)], first)

    async def progress(self, now: Snapshot) -> None:
        await self.artifacts.show([live_row(self.label, now)], now)

    async def cost_passed(self, mark_usd: int, now: Snapshot) -> None:
        _emit(
            f"{EVENT_PREFIX}.cost-passed",
            {**self.resource, "gembatch.cost-mark-usd": str(mark_usd)},
            {"job": self.job, "mark_usd": mark_usd, **now.counts()},
        )

    async def stopping(self, status: str, message: str, now: Snapshot) -> None:
        if stop_event(status) is None:
            return  # a failure (``failed: …``) is told by the end event, moments later
        _emit(
            stop_event(status),
            self.resource,
            {"status": status, "reason": _reason(status), "message": redact_text(message), **now.counts()},
        )

    async def finished(self, document: dict[str, Any], last: Snapshot) -> None:
        try:
            await self.artifacts.show([live_row(self.label, last)], last)
        finally:
            self.resource = self.resource or _document_resource(document)
            _emit(end_event(document["status"]), self.resource, end_payload(document))


def emit_started(document: dict[str, Any], rows_total: int) -> dict[str, str]:
    """``gembatch.run.started`` for the run of ``document`` (a run, a shard, or a sharded run's parent,
    before its shards start); returns the resource its other events are about."""
    resource = _document_resource(document)
    _emit(
        f"{EVENT_PREFIX}.started",
        resource,
        {
            "run_id": document["run_id"],
            "flow_run_id": document.get("flow_run_id"),
            "job": document["job"],
            "rows_total": rows_total,
            "input": redact_url((document.get("input") or {}).get("path") or ""),
            "output": redact_url(document["output"]["path"]),
        },
    )
    return resource


def emit_end(document: dict[str, Any]) -> None:
    """The end event of a run that had no observer (a sharded run's parent, a run refused before work)."""
    _emit(end_event(document["status"]), _document_resource(document), end_payload(document))


def emit_refused(job: str, parameters: dict[str, Any], message: str) -> None:
    """``gembatch.run.failed`` for a run refused before any work (a missing key, a bad input…)."""
    output = str(parameters.get("output") or "")
    _emit(
        f"{EVENT_PREFIX}.failed",
        resource_of(job, output, run_id="-", model=parameters.get("model")),
        {"job": job, "status": "failed: refused", "reason": "refused", "message": redact_text(message),
         "output": redact_url(output)},
    )  # fmt: skip


def _sum_rows(rows: list[dict[str, Any]]) -> Snapshot | None:
    """The shards' live rows added up, as one snapshot (None before any shard reported)."""
    if not rows:
        return None

    def total(key: str) -> float:
        return sum(r[key] for r in rows if isinstance(r.get(key), (int, float)))

    costs = [r["cost USD"] for r in rows if isinstance(r.get("cost USD"), (int, float))]
    rate = total("rows/s")
    return Snapshot(
        total=int(total("done") + total("failed") + total("left")),
        done=int(total("done")),
        failed=int(total("failed")),
        requests=int(total("requests")),
        rate_limited=int(total("429s")),
        tokens=int(total("tokens")),
        cost_usd=round(sum(costs), 6) if costs else None,
        rows_per_s=round(rate, 2) if rate else None,
        elapsed_s=0.0,
    )


async def _shard_rows(client: Any, parent_id: UUID, job: str) -> list[dict[str, Any]]:
    """The latest live row of each shard of ``parent_id`` (a restarted shard: its newest flow run)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    children = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
    )
    if not children:
        return []
    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[c.id for c in children]),
            key=ArtifactFilterKey(any_=[f"gembatch-{job}-live"]),
        ),
        sort=ArtifactSort.UPDATED_DESC,
    )
    latest: dict[str, dict[str, Any]] = {}
    for artifact in artifacts:
        data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        for row in data or []:
            latest.setdefault(str(row.get("run")), row)
    return [latest[k] for k in sorted(latest)]


class ShardsWatch:
    """A sharded run's parent: its shards' live rows and their sum, in the parent's own progress
    artifact and table, every few seconds while it waits (:meth:`run`) and once more at the end."""

    def __init__(self, job: str) -> None:
        from prefect.runtime import flow_run

        self.job = job
        self.parent = UUID(str(flow_run.id)) if flow_run.id else None
        self.artifacts = _Artifacts(job)

    async def update(self) -> None:
        from prefect.client.orchestration import get_client

        if self.parent is None:
            return
        try:
            async with get_client() as client:
                rows = await _shard_rows(client, self.parent, self.job)
            now = _sum_rows(rows)
            if now is not None:
                await self.artifacts.show([*rows, live_row("all shards", now)], now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("could not add up the shards' progress (the run goes on): %s", exc)

    async def run(self) -> None:
        every = watch_every_s()
        while True:
            await asyncio.sleep(every)
            await self.update()
