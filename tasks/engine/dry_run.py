"""`--dry-run`: what a run would send and cost, from the input and the output folder alone."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.engine.job import Job
from tasks.engine.plan.input import InputSource, check_ids
from tasks.engine.plan.key_table import KeyTable
from tasks.engine.plan.rows import DONE, INVALID, NEW, PREV_ERROR, chunk_statuses, prepare_chunk
from tasks.engine.preflight import check_input_columns
from tasks.engine.run import RunOptions
from tasks.engine.send.batch.policy import check_batch_capable, files_needed
from tasks.engine.store.output import OutputStore
from tasks.jobs.media import folder_extensions
from tasks.provider.prices import estimate_cost_usd, how_to_price, price_of
from tasks.sinks.lance import TableSink

__all__ = ["plan_job"]

COUNT_OF = {DONE: "skipped_done", PREV_ERROR: "failed_before", INVALID: "invalid"}


@dataclass
class _Tally:
    """What a dry run counts as it reads the input: rows by what a run would do with them, and the
    requests, tokens and measures (audio seconds) of the rows it would send."""

    counts: dict[str, int]
    would_send: int = 0
    tokens: int = 0
    requests: int = 0
    measured: dict[str, float] = field(default_factory=dict)


async def plan_job(job: Job, options: RunOptions, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read the input, skip done rows and duplicates as a run would, and estimate — no request, no key.
    ``parameters`` (the run's recorded options) are checked as a run checks them: a dry run refuses
    what the run would refuse (``--keep-text`` with a Parquet output, say)."""
    TableSink.for_run(job.name, options.output, options.id_col, parameters or {})
    if options.batch.mode != "live":
        check_batch_capable(job, options.provider.provider, options.provider.base_url)
    source = InputSource.open(options.input, media_extensions=folder_extensions(job))
    check_input_columns(job, source)
    source.require_columns([options.id_col, *job.input_columns])
    store = OutputStore(options.output)
    owner = await asyncio.to_thread(
        store.check_claim, job=job.name, model=job.model, force=options.force, change_model=options.change_model
    )
    # The id check first: its key table is freed before the index is built.
    total_rows = await asyncio.to_thread(check_ids, source, options.id_col, limit=options.limit)
    index = await asyncio.to_thread(store.scan, options.id_col, keep_keys=False)
    tally = await _count(job, options, source, index, total_rows)
    change: dict[str, Any] = {}
    if owner is not None and owner.get("job") == job.name and owner.get("model") != job.model:
        # --change-model: every row of the old model is sent again (its content hash names the model).
        change = {
            "model_change": {
                "from": owner.get("model"),
                "to": job.model,
                "rows_in_output": index.result_rows,
                "rows_to_resend": tally.would_send,
            }
        }
    return {
        "status": "dry run",
        "job": job.name,
        "model": job.model,
        "price": price_note(job),
        **change,
        "input": {"path": source.path, "rows": total_rows},
        "output": {"path": options.output},
        "counts": {**tally.counts, "would_send": tally.would_send},
        "estimate": _estimate(job, options, tally),
    }


async def _count(job: Job, options: RunOptions, source: InputSource, index: Any, total_rows: int) -> _Tally:
    """Go through the input chunk by chunk as a run would, counting instead of sending."""
    counts = {"input_rows": total_rows, "skipped_done": 0, "deduplicated": 0, "invalid": 0, "failed_before": 0}
    tally = _Tally(counts)
    planned = KeyTable(payload=False)  # contents this dry run would send: 8 bytes each
    chunks = source.iter_chunks(
        # A job may read the id too (generate's template can name it): each column once.
        list(dict.fromkeys([options.id_col, *job.input_columns])),
        options.chunk_size,
        string_columns=job.string_columns,
    )
    seen = 0
    for chunk in chunks:
        chunk = chunk.slice(0, total_rows - seen)
        seen += chunk.num_rows
        ready = await asyncio.to_thread(prepare_chunk, job, chunk)
        keys = chunk_statuses(
            index, chunk.column(options.id_col), ready.keys, ready.invalid, retry_errors=options.retry_errors
        )
        for status, name in COUNT_OF.items():
            counts[name] += int(np.count_nonzero(keys.status == status))
        new = np.flatnonzero(keys.status == NEW)
        new_keys = keys.keys[new]
        # The first row of each content in this chunk, if neither planned before nor in the output.
        _, first = np.unique(new_keys, return_index=True)
        fresh = np.zeros(len(new), bool)
        fresh[first] = True
        fresh &= ~planned.has_keys(new_keys)
        if len(index.results) and fresh.any():
            fresh[fresh] = ~index.contents_stored(new_keys[fresh])
        counts["deduplicated"] += int(len(new) - np.count_nonzero(fresh))
        own = new[fresh]
        planned.add(keys.keys[own])
        ready.fill(job, chunk, own)  # text jobs' rows are only hashed until they are to be sent
        _add_sent(job, tally, ready.prepared, own, valid=np.flatnonzero(keys.status != INVALID))
        if seen >= total_rows:
            break
    return tally


def _add_sent(job: Job, tally: _Tally, prepared: Any, own: np.ndarray, *, valid: np.ndarray) -> None:
    """Count the rows at ``own`` as sent. A job whose rows take several requests (a recording's
    segments) says how many, and what else it measures (audio seconds from the files' headers): for all
    ``valid`` rows and for those to send."""
    tally.would_send += len(own)
    tally.tokens += sum(prepared[pos].tokens for pos in own.tolist())
    requests_for = getattr(job, "requests_for", None)
    if requests_for is not None:
        tally.requests += sum(requests_for(prepared[pos]) for pos in own.tolist())
    else:
        tally.requests += math.ceil(len(own) / job.max_items_per_request)
    measure = getattr(job, "measure", None)
    if measure is None:
        return
    measured, sending = tally.measured, set(own.tolist())
    for pos in valid.tolist():  # jobs without a column-at-once hash: every row is prepared
        name, amount = measure(prepared[pos])
        measured[name] = measured.get(name, 0.0) + amount
        if pos in sending:
            measured[f"{name}_to_send"] = measured.get(f"{name}_to_send", 0.0) + amount


def _estimate(job: Job, options: RunOptions, tally: _Tally) -> dict[str, Any]:
    """The plan's ``estimate``: requests, tokens, cost (input, capped output, images, batches), minutes."""
    requests, tokens, limits = tally.requests, tally.tokens, options.limits
    minutes = [
        m
        for m in (requests / limits.rpm if limits.rpm else None, tokens / limits.tpm if limits.tpm else None)
        if m is not None
    ]
    audio_input = getattr(job, "audio_input", False)
    cost = estimate_cost_usd(job.model, prompt_tokens=tokens, total_tokens=tokens, audio_input=audio_input)
    # A job that caps its answers (generate --max-tokens) bounds the output too.
    output: dict[str, Any] = {}
    max_output = getattr(job, "max_output_tokens", None)
    if max_output is not None:
        out_cost = estimate_cost_usd(job.model, prompt_tokens=0, total_tokens=requests * max_output)
        output = {
            "max_output_tokens": requests * max_output,
            "max_output_cost_usd": None if out_cost is None else round(out_cost, 6),
        }
    images = _images_estimate(job, tally.would_send, cost)
    batches = _batch_plan(job, options, requests, tally.would_send, tokens)
    if batches:
        cost = batches.pop("cost_usd")
    return {
        "requests": requests,
        "input_tokens": tokens,
        "input_cost_usd": None if cost is None else round(cost, 6),
        **output,
        **images,
        **{name: round(amount, 3) for name, amount in tally.measured.items()},
        "minutes_at_limits": round(max(minutes), 2) if minutes else None,
        "limits": {"rpm": limits.rpm, "tpm": limits.tpm},
        **batches,
    }


def _images_estimate(job: Job, would_send: int, cost: float | None) -> dict[str, Any]:
    """The images job: each request asks for n images, each billed at the table's price for the size and quality."""
    if job.name != "images":
        return {}
    per_image = getattr(job, "per_image_usd", None)
    count = would_send * job.n
    image_cost = None if per_image is None else count * per_image
    return {
        "images": count,
        "usd_per_image": per_image,
        "image_cost_usd": None if image_cost is None else round(image_cost, 6),
        "cost_usd": None if image_cost is None or cost is None else round(image_cost + cost, 6),
    }


def price_note(job: Job) -> str:
    """The price the estimate uses and where it comes from, or what to do when there is none."""
    price = price_of(job.model)
    if price is None:
        return f"unknown: no price for {job.model} today; {how_to_price(job.model)}"
    since = f" since {price.since}" if price.since else ""
    return f"{price.describe()}{since} ({price.source})"


def _batch_plan(job: Job, options: RunOptions, requests: int, items: int, tokens: int) -> dict[str, Any]:
    """--mode batch|auto: how many request files (batches) the run would make, and what goes live.

    auto sends a last request file of fewer than --auto-min-requests requests live (a small run: all)."""
    policy = options.batch
    if policy.mode == "live":
        return {}
    embeddings = job.name == "embed"
    files = files_needed(requests, items, policy, embeddings)
    batch_requests, live_requests = requests, 0
    if policy.mode == "auto" and files:
        last = requests - (files - 1) * policy.max_lines
        if last < policy.auto_min_requests:
            files -= 1
            batch_requests, live_requests = requests - last, last
    share = batch_requests / requests if requests else 0.0
    batch_tokens = round(tokens * share)
    live_cost = estimate_cost_usd(job.model, prompt_tokens=tokens - batch_tokens, total_tokens=tokens - batch_tokens)
    batch_cost = estimate_cost_usd(job.model, prompt_tokens=batch_tokens, total_tokens=batch_tokens, batch=True)
    cost = None if live_cost is None or batch_cost is None else live_cost + batch_cost
    return {
        "mode": policy.mode,
        "batches": files,
        "request_files": files,
        "batch_requests": batch_requests,
        "live_requests": live_requests,
        "batch_price_factor": 0.5,
        "cost_usd": cost,
    }
