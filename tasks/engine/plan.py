"""`--dry-run`: what a run would send and cost, from the input and the output folder alone."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np

from tasks.engine.chunk import DONE, INVALID, NEW, PREV_ERROR, Job, chunk_statuses, prepare_chunk
from tasks.engine.index import KeyTable
from tasks.engine.io import InputSource, check_ids
from tasks.engine.run import RunOptions
from tasks.engine.store import OutputStore
from tasks.provider.prices import estimate_cost_usd

__all__ = ["plan_job"]

COUNT_OF = {DONE: "skipped_done", PREV_ERROR: "failed_before", INVALID: "invalid"}


async def plan_job(job: Job, options: RunOptions) -> dict[str, Any]:
    """Read the input, skip done rows and duplicates as a run would, and estimate — no request, no key."""
    source = InputSource.open(options.input)
    source.require_columns([options.id_col, *job.input_columns])
    store = OutputStore(options.output)
    # The id check first: its key table is freed before the index is built.
    total_rows = await asyncio.to_thread(check_ids, source, options.id_col, limit=options.limit)
    index = await asyncio.to_thread(store.scan, options.id_col)
    counts = {"input_rows": total_rows, "skipped_done": 0, "deduplicated": 0, "invalid": 0, "failed_before": 0}
    would_send = tokens = requests = 0
    planned = KeyTable(payload=False)  # contents this dry run would send: 8 bytes each
    chunks = source.iter_chunks(
        [options.id_col, *job.input_columns], options.chunk_size, string_columns=job.string_columns
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
        fresh &= ~planned.has_keys(new_keys) & ~index.results.has_keys(new_keys)
        counts["deduplicated"] += int(len(new) - np.count_nonzero(fresh))
        own = new[fresh]
        planned.add(keys.keys[own])
        would_send += len(own)
        ready.fill(job, chunk, own)
        tokens += sum(ready.prepared[pos].tokens for pos in own.tolist())
        requests += math.ceil(len(own) / job.max_items_per_request)
        if seen >= total_rows:
            break
    limits = options.limits
    minutes = [
        m
        for m in (requests / limits.rpm if limits.rpm else None, tokens / limits.tpm if limits.tpm else None)
        if m is not None
    ]
    cost = estimate_cost_usd(job.model, prompt_tokens=tokens, total_tokens=tokens)
    per_image = getattr(job, "per_image_usd", None)
    images: dict[str, Any] = {}
    if job.name == "images":
        # Each request asks for n images, each billed at the table's price for the size and quality.
        count = would_send * job.n
        image_cost = None if per_image is None else count * per_image
        images = {
            "images": count,
            "usd_per_image": per_image,
            "image_cost_usd": None if image_cost is None else round(image_cost, 6),
            "cost_usd": None if image_cost is None or cost is None else round(image_cost + cost, 6),
        }
    return {
        "status": "dry run",
        "job": job.name,
        "model": job.model,
        "input": {"path": source.path, "rows": total_rows},
        "output": {"path": options.output},
        "counts": {**counts, "would_send": would_send},
        "estimate": {
            "requests": requests,
            "input_tokens": tokens,
            "input_cost_usd": None if cost is None else round(cost, 6),
            **images,
            "minutes_at_limits": round(max(minutes), 2) if minutes else None,
            "limits": {"rpm": limits.rpm, "tpm": limits.tpm},
        },
    }
