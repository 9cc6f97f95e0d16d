"""The live path: a chunk's rows fanned out as rate-limited requests, retried, and written as parts.

A job (see :class:`tasks.engine.job.Job`) says how a row becomes a request and a response becomes typed
columns; everything else — skipping done rows, sharing identical contents, retries, limits, atomic writes,
counts — lives here and in the modules it imports: the requests in send_rows.py, the parts in
write_parts.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.engine.job import Item, Outcome
from tasks.engine.plan.key_table import member
from tasks.engine.plan.rows import (
    DONE,
    INVALID,
    NEW,
    OWN,
    PEER,
    PREV_ERROR,
    SAME,
    STORED,
    PreparedChunk,
    nothing_to_do,
    prepare_chunk,
)
from tasks.engine.send.context import ChunkReport, RunContext
from tasks.engine.send.send_rows import send_all
from tasks.engine.send.write_parts import write_chunk
from tasks.engine.store.part_files import write_in_thread


def count_skipped(ctx: RunContext, status: np.ndarray) -> None:
    ctx.stats.skipped_done += int(np.count_nonzero(status == DONE))
    ctx.stats.failed += int(np.count_nonzero(status == PREV_ERROR))
    ctx.progress.advance(len(status))


def prepare_and_look_up(ctx: RunContext, chunk: pa.Table) -> PreparedChunk:
    """Hash a chunk and ask the output which of its rows are done (reading the parts the index points
    to): the slow half of :func:`chunk_statuses`, on a worker thread."""
    ready = prepare_chunk(ctx.job, chunk, ctx.on_hand.hash_processes)
    if len(ctx.output.index.results):
        ready.done = ctx.output.index.pairs_done(ready.keys, chunk.column(ctx.output.id_col))
    return ready


async def precheck_chunk(ctx: RunContext, chunk: pa.Table, index: int, ready: PreparedChunk | None = None) -> bool:
    """Prepare a chunk ahead of its task: False if none of its rows needs a request or a write.

    Such a chunk (every row done, or failed before) is counted here and needs no Prefect task: a
    rerun of 10 million rows would otherwise create 5,000 empty task runs, which costs more than the
    check itself. Otherwise the prepared rows wait in ``ctx`` for :func:`process_chunk`. ``ready``:
    :func:`prepare_and_look_up` of the chunk, if the caller had it done ahead.
    """
    if ready is None:
        ready = await asyncio.to_thread(prepare_and_look_up, ctx, chunk)
    keys = ctx.output.statuses(chunk.column(ctx.output.id_col), ready)
    if nothing_to_do(keys.status):
        count_skipped(ctx, keys.status)
        return False
    ctx.on_hand.prechecked[index] = ready
    return True


async def process_chunk(ctx: RunContext, chunk: pa.Table, index: int, first_row: int) -> ChunkReport:
    """Send what this chunk still needs, then write one results part and at most one errors part."""
    id_array = chunk.column(ctx.output.id_col)
    n = chunk.num_rows
    ready = await _ready(ctx, chunk, index)
    # Deciding who owns which content is synchronous: no other chunk runs in between. (Which rows are
    # done was asked on a worker thread: no other chunk of this run writes this chunk's ids.)
    keys = ctx.output.statuses(id_array, ready)
    if nothing_to_do(keys.status):
        # Nothing to send or write (a rerun's chunk): count and go.
        count_skipped(ctx, keys.status)
        return ChunkReport(index=index, rows=n, written=0, errors=0)
    todo = np.flatnonzero(keys.status == NEW)
    if len(todo) > 0 and any(ready.prepared[pos] is None for pos in todo.tolist()):
        await asyncio.to_thread(ready.fill, ctx.job, chunk, todo)
    claims = _Claims(ctx, keys.status, ready, id_array.to_pylist())
    stored_before = ctx.output.index.results.has_keys(keys.keys[todo])
    for pos, known in zip(todo.tolist(), stored_before.tolist()):
        claims.claim(pos, known)
    outcomes: dict[str, Outcome | None] = {}
    try:
        if claims.stored:
            await _take_stored(ctx, claims, keys.keys, todo, outcomes)
        await send_all(ctx, list(claims.own.values()), outcomes)
        for h, future in claims.peers.items():
            outcomes[h] = await future
        id_type = chunk.schema.field(ctx.output.id_col).type
        report = await write_in_thread(
            write_chunk,
            ctx,
            index,
            first_row,
            claims.ids,
            id_type,
            claims.hashes,
            claims.source.tolist(),
            claims.invalid,
            outcomes,
        )
        _learn(ctx, claims, keys.keys, outcomes, report)
    finally:
        for h in claims.own:
            future = ctx.on_hand.inflight.pop(h)
            if not future.done():
                future.set_result(outcomes.get(h))
    ctx.progress.advance(n)
    return report


async def _ready(ctx: RunContext, chunk: pa.Table, index: int) -> PreparedChunk:
    """The chunk's prepared rows: its precheck's, or prepared now."""
    ready = ctx.on_hand.prechecked.pop(index, None)
    if ready is None or ready.rows != chunk.num_rows:
        ctx.on_hand.preparing += 1
        try:
            ready = await asyncio.to_thread(prepare_and_look_up, ctx, chunk)
        finally:
            ctx.on_hand.preparing -= 1
    return ready


class _Claims:
    """Who sends each content of a chunk's new rows: this chunk (its first row with it), a chunk
    in flight (a peer), or nobody (the output holds its result)."""

    def __init__(self, ctx: RunContext, status: np.ndarray, ready: PreparedChunk, ids: list[Any]) -> None:
        self.ctx = ctx
        self.ids = ids
        self.prepared = ready.prepared
        self.hashes = ready.hex(np.flatnonzero((status != DONE) & (status != PREV_ERROR)))
        self.source = status.astype(np.int64)
        self.invalid = {int(pos): str(self.prepared[pos]) for pos in np.flatnonzero(self.source == INVALID)}
        self.own: dict[str, Item] = {}
        self.peers: dict[str, asyncio.Future[Outcome | None]] = {}
        self.stored: set[str] = set()
        self.stored_pos: list[int] = []

    def claim(self, pos: int, known: bool) -> None:
        """Decide the row at ``pos``: ``known``: the index holds a result of its content (32 bits of it)."""
        h = self.hashes[pos]
        if h in self.own:
            self.source[pos] = SAME
        elif h in self.ctx.on_hand.inflight:
            self.source[pos], self.peers[h] = PEER, self.ctx.on_hand.inflight[h]
        elif known:
            self.source[pos] = STORED
            if h not in self.stored:
                self.stored.add(h)
                self.stored_pos.append(pos)
        else:
            self.source[pos] = OWN
            self.own[h] = Item(pos, self.ids[pos], h, self.prepared[pos])
            self.ctx.on_hand.inflight[h] = asyncio.get_running_loop().create_future()


async def _take_stored(
    ctx: RunContext, claims: _Claims, keys: np.ndarray, todo: np.ndarray, outcomes: dict[str, Outcome | None]
) -> None:
    """The stored results of the chunk's contents the index knows; the others are claimed after all."""
    hashes, stored_pos = claims.hashes, claims.stored_pos
    found, served_of = await asyncio.to_thread(_stored_results, ctx, [hashes[p] for p in stored_pos], keys[stored_pos])
    outcomes.update({h: Outcome(result=found[h], served_model=served_of.get(h)) for h in claims.stored if h in found})
    # The index matches 32 bits of a content: one it pointed at that isn't there is sent after all.
    for pos in todo.tolist():
        if claims.source[pos] == STORED and hashes[pos] not in found:
            claims.claim(pos, False)


def _learn(
    ctx: RunContext, claims: _Claims, keys: np.ndarray, outcomes: dict[str, Outcome | None], report: ChunkReport
) -> None:
    """Point the index at the part holding the results this chunk sent for."""
    added = [item.position for h, item in claims.own.items() if (o := outcomes.get(h)) is not None and o.ok]
    if added and report.part is not None:
        learnt = keys[np.array(added, np.intp)]
        if ctx.output.recurring is not None:
            learnt = learnt[member(ctx.output.recurring, learnt)]
        if len(learnt):
            ctx.output.index.results.add(learnt, ctx.output.index.part_ordinal(report.part))


def _stored_results(
    ctx: RunContext, hashes: list[str], keys: np.ndarray
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """The stored results of these contents (the index matched their first 32 bits). The parts' keys
    confirm the match first: a false one (a run's own results make them common at corpus scale) costs
    a read of the parts' key columns, not of their results."""
    confirmed = ctx.output.index.contents_stored(keys)
    if not confirmed.any():
        return {}, {}
    wanted = [h for h, ok in zip(hashes, confirmed.tolist()) if ok]
    files = ctx.output.index.parts_holding(keys[confirmed])
    table = ctx.output.store.read_results_for(wanted, ctx.output.id_col, files=files)
    served: dict[str, str | None] = {}
    if "served_model" in table.column_names:  # the stored row's served model goes with its result
        served = dict(zip(table.column("content_hash").to_pylist(), table.column("served_model").to_pylist()))
    return ctx.job.results_from_table(table), served


ChunkRunner = Callable[[RunContext, pa.Table, int, int], Awaitable[ChunkReport]]
