"""`--dry-run`: what a run would send and cost, from the input and the output folder alone."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from tasks.engine.chunk import DONE, INVALID, NEW, PREV_ERROR, Job, prepare_rows, row_status
from tasks.engine.io import InputSource, check_ids
from tasks.engine.run import RunOptions
from tasks.engine.store import OutputStore, hash_key
from tasks.provider.prices import estimate_cost_usd

__all__ = ["plan_job"]

COUNT_OF = {DONE: "skipped_done", PREV_ERROR: "failed_before", INVALID: "invalid"}


async def plan_job(job: Job, options: RunOptions) -> dict[str, Any]:
    """Read the input, skip done rows and duplicates as a run would, and estimate — no request, no key."""
    source = InputSource.open(options.input)
    source.require_columns([options.id_col, *job.input_columns])
    store = OutputStore(options.output)
    index = await asyncio.to_thread(store.scan, options.id_col)
    total_rows = await asyncio.to_thread(check_ids, source, options.id_col, limit=options.limit)
    counts = {"input_rows": total_rows, "skipped_done": 0, "deduplicated": 0, "invalid": 0, "failed_before": 0}
    would_send = tokens = requests = 0
    planned: set[int] = set()
    chunks = source.iter_chunks(
        [options.id_col, *job.input_columns], options.chunk_size, string_columns=job.string_columns
    )
    seen = 0
    for chunk in chunks:
        chunk = chunk.slice(0, total_rows - seen)
        seen += chunk.num_rows
        ids = chunk.column(options.id_col).to_pylist()
        payloads = chunk.select(list(job.input_columns)).to_pylist()
        prepared = await asyncio.to_thread(prepare_rows, job, payloads)
        own_in_chunk = 0
        for row_id, payload, prep in zip(ids, payloads, prepared):
            h, status = row_status(index, job, row_id, payload, prep, retry_errors=options.retry_errors)
            if status != NEW:
                counts[COUNT_OF[status]] += 1
            elif hash_key(h) in planned or hash_key(h) in index.known_hashes:
                counts["deduplicated"] += 1
            else:
                planned.add(hash_key(h))
                would_send += 1
                own_in_chunk += 1
                tokens += prep.tokens
        requests += math.ceil(own_in_chunk / job.max_items_per_request)
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
