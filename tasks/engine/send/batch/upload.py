"""Submitting a request file: its record saved, the file uploaded, the batch created, each step recorded first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tasks.engine.plan.claims import batch_key
from tasks.engine.plan.keys import hash_keys
from tasks.engine.send.batch.records import PREPARED, SUBMITTED, UPLOADED, RequestFile, now
from tasks.engine.send.batch.shared import BatchShared
from tasks.provider.batches import BatchInfo


async def submit_file(
    shared: BatchShared,
    request_file: RequestFile,
    endpoint: str,
    *,
    keep: str | None,
    discard: Callable[[RequestFile], None],
) -> int:
    """Record, upload and create one batch; the record is saved before each step that may cost.

    ``keep``: the claim of a chunk whose next lines go into the next file (not given back yet);
    ``discard``: what becomes of a file not submitted. Returns the lines submitted."""
    ctx, book, claims, watch = shared.ctx, shared.book, shared.claims, shared.watch
    request_file.close()
    reservation = None
    if ctx.budget is not None:
        reservation = ctx.budget.reserve(request_file.counts.tokens)
        if reservation is None:
            discard(request_file)
            ctx.request_stop(ctx.budget.stop())
            return 0
    # The record's own claim, before anyone can see the record: no other run re-attaches to it while
    # this run uploads, creates and polls it.
    held = await asyncio.to_thread(claims.acquire, batch_key(request_file.name))
    if held is not None:
        raise RuntimeError(f"batch record {request_file.name} is claimed by {held.describe()}")
    watch.mine.add(request_file.name)
    record = record_of(shared, request_file, endpoint, reservation)
    book.save(record)
    info = await _upload_and_create(shared, record, request_file, endpoint)
    if info is None:
        # Nothing was created, so nothing is paid: the record goes, and its rows are free again.
        await asyncio.to_thread(book.remove, record)
        watch.mine.discard(request_file.name)
        await asyncio.to_thread(claims.release, batch_key(request_file.name))
        discard(request_file)
        if reservation is not None and ctx.budget is not None:
            ctx.budget.release(reservation)
        return 0
    record.update(state=SUBMITTED, batch_id=info.id, status=info.status)
    book.save(record)
    request_file.path.unlink(missing_ok=True)
    watch.pending_keys.add(hash_keys(request_file.hashes))
    watch.states[request_file.name] = SUBMITTED
    # The batch record holds these rows now (other runs see it): the chunks' claims can go, except
    # the claim of a chunk whose next lines go into the next file.
    for key in request_file.claims:
        if key != keep:
            await asyncio.to_thread(claims.release, key)
    shared.totals.created += 1
    shared.totals.lines_submitted += request_file.counts.lines
    return request_file.counts.lines


async def _upload_and_create(
    shared: BatchShared, record: dict[str, Any], request_file: RequestFile, endpoint: str
) -> BatchInfo | None:
    """Upload the file (its id recorded at once) and create the batch; None if either route failed."""
    file_id = await shared.routes.call(
        "POST files (upload of the request file)", lambda: shared.api.upload(request_file.path, request_file.name)
    )
    if file_id is None:
        return None
    record["file_id"] = file_id
    record["state"] = UPLOADED
    shared.book.save(record)
    return await shared.routes.call(
        "POST batches", lambda: shared.api.create(file_id, endpoint, {"gembatch": request_file.name})
    )


def record_of(
    shared: BatchShared, request_file: RequestFile, endpoint: str, reservation: float | None
) -> dict[str, Any]:
    """The batch record of a request file about to be uploaded (state PREPARED)."""
    ctx, conn, counts = shared.ctx, shared.conn, request_file.counts
    return {
        "name": request_file.name,
        "run_id": ctx.run_id,
        "job": ctx.job.name,
        "model": ctx.job.model,
        "provider": conn.provider,
        # Credentials in the URL are never written (`gembatch batches --base-url URL` gives them again).
        "base_url": conn.shown_url,
        "flavor": shared.api.flavor,
        "endpoint": endpoint,
        "state": PREPARED,
        "requests": counts.lines,
        "items": counts.inputs,
        "rows": counts.rows,
        "estimated_tokens": counts.tokens,
        "request_bytes": counts.bytes,
        "reserved_usd": reservation,
        "file_id": None,
        "batch_id": None,
        "status": None,
        "request_counts": None,
        "created_at": now(),
    }
