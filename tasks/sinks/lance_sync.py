"""When a LanceDB table is synced, and what a failed sync leaves: the rows done, the error recorded.

The last run at work on the staging folder syncs it (as it compacts the folder); with ``--shards N``, the
parent, once every shard is over. A sync that fails leaves the parts pending, so the next run applies them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.engine.plan.claims import ClaimBook
    from tasks.engine.plan.input import InputSource
    from tasks.engine.store.output import OutputStore
    from tasks.sinks.lance import TableSink

__all__ = ["SYNC_FAILED", "sync_after_shards", "sync_failed", "sync_if_last"]

log = logging.getLogger("gembatch.lance")

SYNC_FAILED = "failed"  # ``output.table.sync`` of a run whose table was not updated


async def sync_if_last(
    sink: TableSink,
    claims: ClaimBook,
    store: OutputStore,
    source: InputSource | None,
    *,
    run_id: str,
    compacted: bool,
) -> dict[str, Any]:
    """Sync the table when no other run works on the staging folder, under the compaction claim (the
    last run to finish does it, as it does compaction); say what happened, for ``output.table``."""
    from tasks.engine.plan.claims import COMPACT_KEY

    if others := await asyncio.to_thread(claims.other_runs):
        return {"sync": f"left to the last run: {others[0].describe()} still works on this folder"}
    if (holder := await asyncio.to_thread(claims.acquire, COMPACT_KEY)) is not None:
        return {"sync": f"left to {holder.describe()}, which is compacting"}
    try:
        if others := await asyncio.to_thread(claims.other_runs):
            return {"sync": f"left to the last run: {others[0].describe()} started on this folder"}
        return await _sync(sink, store, source, run_id=run_id, compacted=compacted)
    finally:
        await asyncio.to_thread(claims.release, COMPACT_KEY)


async def sync_after_shards(
    sink: TableSink, store: OutputStore, source: InputSource | None, *, run_id: str
) -> dict[str, Any]:
    """The parent of ``--shards N`` syncs the table once, after every shard ended and the parent compacted
    the folder where it needed to (the shards leave both to it)."""
    return await _sync(sink, store, source, run_id=run_id, compacted=True)


async def _sync(
    sink: TableSink, store: OutputStore, source: InputSource | None, *, run_id: str, compacted: bool
) -> dict[str, Any]:
    started = time.monotonic()
    try:
        document = await asyncio.to_thread(sink.sync, store, source, run_id=run_id, compacted=compacted)
    except Exception as exc:  # noqa: BLE001 - whatever the table did, the rows are done: the next run applies them
        return sync_failed(sink, store, exc)
    return {"sync": "done"} | document | {"sync_s": round(time.monotonic() - started, 3)}


def sync_failed(sink: TableSink, store: OutputStore, exc: BaseException) -> dict[str, Any]:
    """``output.table`` of a run whose table was not updated. The parts not applied stay pending in
    ``_lance/applied.json``, so any later run on this output applies them (one with nothing to send too)."""
    where = f"{sink.location.database.rstrip('/')}/{sink.location.table}"
    message = (
        f"the LanceDB table {sink.location.table} ({where}) was not updated: {type(exc).__name__}: {exc}. "
        f"The rows are done and kept in {store.url}; fix what stopped the update, then rerun the same command: "
        "it sends nothing for those rows and brings the table in step"
    )
    log.error("%s", message)
    return {
        "sync": SYNC_FAILED,
        "database": sink.location.database,
        "table": sink.location.table,
        "staging": store.url,
        "error": f"{type(exc).__name__}: {exc}",
        "message": message,
    }
