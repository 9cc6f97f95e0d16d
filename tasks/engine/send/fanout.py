"""The live path's chunk fan-out: several chunks in flight, each started once this run holds its claim.

The input is read chunk by chunk; more chunks run while the limiter is starved; a chunk another run
holds is looked at again once that run has let it go."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from tasks.engine.memory import release_free_memory
from tasks.engine.plan.claims import ClaimBook, Holder, chunk_key
from tasks.engine.plan.claims import log as claims_log
from tasks.engine.plan.done import KnownParts
from tasks.engine.plan.input import InputSource
from tasks.engine.plan.rows import PreparedChunk, nothing_to_do
from tasks.engine.send.chunk import ChunkRunner, count_skipped, precheck_chunk, prepare_and_look_up
from tasks.engine.send.context import RunContext

if TYPE_CHECKING:
    from tasks.engine.options import RunOptions

__all__ = ["LOOK_AHEAD", "MAX_CHUNKS_IN_FLIGHT", "drive_chunks"]

MAX_CHUNKS_IN_FLIGHT = 32
STARVED_POLL_S = 0.1
WAIT_NOTE_S = 30.0  # while waiting for chunks other runs hold, say so this often
TRIM_EVERY_CHUNKS = 50
LOOK_AHEAD = 2  # chunks hashed and checked ahead of the one offered (worker threads)


async def drive_chunks(
    ctx: RunContext,
    source: InputSource,
    options: RunOptions,
    total_rows: int,
    runner: ChunkRunner,
    *,
    claims: ClaimBook | None = None,
) -> None:
    """Read chunks and run ``chunks_in_flight`` of them at once, more while the limiter is starved.

    Memory is bounded by the chunks in flight. ``chunks_in_flight`` is the usual number; when the rate
    and the latency need more rows in flight than those chunks hold (embeddings: 100 rows a request,
    at 5 s latency), more chunks start, up to ``MAX_CHUNKS_IN_FLIGHT``.

    With ``claims``, a chunk starts only once this run holds its claim; a chunk another live run holds
    is left to it and looked at again at the end, when that run has let it go (see :class:`_Chunks`).
    """
    driver = _Chunks(ctx, source, options, total_rows, runner, claims)
    try:
        await driver.first_pass()
        if driver.deferred:
            await driver.finish_deferred()
    finally:
        results = await asyncio.gather(*driver.active, return_exceptions=True)
    for result in [*driver.failures, *results, *driver.cancelled]:
        if isinstance(result, BaseException):
            raise result


@dataclass
class _Deferred:
    """A chunk left to another run: where it is in the input, its claim, who held it."""

    first_row: int
    key: str
    holder: Holder


class _Chunks:
    """The chunk fan-out of one run (see :func:`drive_chunks`)."""

    def __init__(
        self,
        ctx: RunContext,
        source: InputSource,
        options: RunOptions,
        total_rows: int,
        runner: ChunkRunner,
        claims: ClaimBook | None,
    ) -> None:
        self.ctx, self.source, self.options, self.total_rows = ctx, source, options, total_rows
        self.runner, self.claims = runner, claims
        # Finished chunks are let go (a 10-million-row run has 5,000 of them); only their first error is kept.
        self.active: set[asyncio.Task] = set()
        self.failures: list[BaseException] = []
        self.cancelled: list[BaseException] = []
        self.deferred: dict[int, _Deferred] = {}
        # This run's own parts are in ``parts_written``: the index learns only the recurring contents.
        self._known_parts = KnownParts(ctx.output.index, ctx.stats.parts_written, ctx.stats.error_parts_written)

    def _chunks(self):
        ctx, options = self.ctx, self.options
        return self.source.iter_chunks(
            # A job may read the id too (generate's template can name it): each column once.
            list(dict.fromkeys([options.id_col, *ctx.job.input_columns])),
            options.chunk_size,
            string_columns=ctx.job.string_columns,
        )

    def settle(self) -> None:
        for task in [t for t in self.active if t.done()]:
            self.active.discard(task)
            if task.cancelled():
                self.cancelled.append(asyncio.CancelledError())
            elif task.exception() is not None:
                self.failures.append(task.exception())

    async def room(self) -> None:
        while not _room_for_chunk(self.ctx, len(self.active), self.options.chunks_in_flight):
            await asyncio.wait(self.active, timeout=STARVED_POLL_S, return_when=asyncio.FIRST_COMPLETED)
            self.settle()

    async def first_pass(self) -> None:
        """Offer every chunk in order. The next ``LOOK_AHEAD`` chunks are read, hashed and looked up in
        the output meanwhile on worker threads (a rerun's whole work: reading Parquet and the parts it
        checks against runs beside the hashing of another chunk)."""
        ctx, total_rows = self.ctx, self.total_rows
        chunks = self._chunks()
        ahead: deque[tuple[pa.Table, int, int, asyncio.Future[PreparedChunk]]] = deque()
        started = 0
        first_row = 0
        pool = ThreadPoolExecutor(max_workers=LOOK_AHEAD, thread_name_prefix="gembatch-check")
        loop = asyncio.get_running_loop()
        try:
            while not ctx.stop.event.is_set():
                while len(ahead) < LOOK_AHEAD and first_row < total_rows:
                    chunk = await asyncio.to_thread(next, chunks, None)
                    if chunk is None:
                        total_rows = first_row
                        break
                    chunk = chunk.slice(0, total_rows - first_row)
                    future = loop.run_in_executor(pool, prepare_and_look_up, ctx, chunk)
                    ahead.append((chunk, started, first_row, future))
                    started += 1
                    first_row += chunk.num_rows
                if not ahead:
                    break
                await self.room()
                chunk, number, first, future = ahead.popleft()
                ready = await future
                if ctx.stop.event.is_set():
                    break
                if number % TRIM_EVERY_CHUNKS == TRIM_EVERY_CHUNKS - 1:
                    release_free_memory()  # chunks free many small blocks: see tasks/engine/memory.py
                await self.offer(chunk, number, first, ready)
                self.settle()
                if self.failures:
                    break
        finally:
            for *_, future in ahead:
                future.cancel()
            await asyncio.gather(*(f for *_, f in ahead), return_exceptions=True)
            pool.shutdown(wait=True)
            chunks.close()

    async def offer(self, chunk: pa.Table, number: int, first: int, ready: PreparedChunk | None = None) -> None:
        """Start the chunk's task if it has work and this run gets its claim; else count it or defer it."""
        ctx, claims = self.ctx, self.claims
        if not await precheck_chunk(ctx, chunk, number, ready):
            return  # nothing to send or write: counted, no task
        key = None
        if claims is not None:
            ready = ctx.on_hand.prechecked[number]
            key = chunk_key(chunk.column(ctx.output.id_col).to_pylist(), ready.hashes)
            holder = await asyncio.to_thread(claims.acquire, key)
            if holder is not None:
                ctx.on_hand.prechecked.pop(number, None)
                self._defer(number, first, chunk.num_rows, key, holder)
                return
            try:
                # Other runs may have written this chunk's rows since this run read the output.
                new = await asyncio.to_thread(
                    ctx.output.store.read_new_parts, self._known_parts(), ctx.output.id_col, run_id=ctx.run_id
                )
                new.add_to(ctx.output.index)
                if new.results:
                    ready.done = await asyncio.to_thread(
                        ctx.output.index.pairs_done, ready.keys, chunk.column(ctx.output.id_col)
                    )
                keys = ctx.output.statuses(chunk.column(ctx.output.id_col), ready)
            except BaseException:
                await asyncio.to_thread(claims.release, key)
                raise
            if nothing_to_do(keys.status):
                ctx.on_hand.prechecked.pop(number, None)
                count_skipped(ctx, keys.status)
                await asyncio.to_thread(claims.release, key)
                return
        self.active.add(asyncio.create_task(self._run(chunk, number, first, key)))

    async def _run(self, chunk: pa.Table, number: int, first: int, key: str | None):
        try:
            return await self.runner(self.ctx, chunk, number, first)
        finally:
            if key is not None:
                # The chunk's parts are written (or it failed): let other runs see it, check and go on.
                self.claims.release(key)

    def _defer(self, number: int, first: int, rows: int, key: str, holder: Holder) -> None:
        self.deferred[number] = _Deferred(first, key, holder)
        self.claims.decline(holder, f"chunk {number} (rows {first}-{first + rows - 1})", "sent")

    async def finish_deferred(self) -> None:
        """Wait for the chunks other runs held; then check each against the output: done → skipped,
        holder gone (its claim stale) → this run takes the claim over and sends what is missing."""
        ctx, claims = self.ctx, self.claims
        waited_from = time.monotonic()
        next_note = 0.0
        stopping = asyncio.ensure_future(ctx.stop.event.wait())
        try:
            while self.deferred and not ctx.stop.event.is_set() and not self.failures:
                keys = {n: d.key for n, d in self.deferred.items()}
                holders = await asyncio.to_thread(claims.holders_of, list(keys.values()))
                free = sorted(n for n, key in keys.items() if holders[key] is None)
                if free:
                    await self._second_pass(set(free))
                    continue
                for n, key in keys.items():
                    self.deferred[n].holder = holders[key]
                if time.monotonic() >= next_note:
                    next_note = time.monotonic() + WAIT_NOTE_S
                    claims_log.warning("waiting for %s", self._waiting_for(claims.policy.ttl_s))
                await asyncio.wait(
                    {*self.active, stopping},
                    timeout=claims.policy.poll_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                self.settle()
        finally:
            stopping.cancel()
            claims.waited_s += time.monotonic() - waited_from

    def _waiting_for(self, ttl_s: float) -> str:
        by_run: dict[str, list[int]] = {}
        holders: dict[str, Holder] = {}
        for n, d in sorted(self.deferred.items()):
            by_run.setdefault(d.holder.run_id, []).append(n)
            holders[d.holder.run_id] = d.holder
        parts = []
        for run_id, numbers in by_run.items():
            shown = ", ".join(str(n) for n in numbers[:8]) + (", …" if len(numbers) > 8 else "")
            parts.append(f"{len(numbers)} chunk(s) held by {holders[run_id].describe()} (chunks {shown})")
        return (
            "; ".join(parts) + f". When a holder finishes they are checked against the output; a claim not renewed for "
            f"{ttl_s:g} s counts as abandoned and this run sends its missing rows."
        )

    async def _second_pass(self, wanted: set[int]) -> None:
        """Read the input again for the chunks in ``wanted`` (memory stays bounded: chunks are not kept
        while they wait) and offer each once more."""
        ctx, total_rows = self.ctx, self.total_rows
        chunks = self._chunks()
        number = 0
        first_row = 0
        last = max(wanted)
        try:
            while first_row < total_rows and number <= last and not ctx.stop.event.is_set():
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                chunk = chunk.slice(0, total_rows - first_row)
                if number in wanted:
                    await self.room()
                    del self.deferred[number]
                    await self.offer(chunk, number, first_row)
                    self.settle()
                    if self.failures:
                        break
                number += 1
                first_row += chunk.num_rows
        finally:
            chunks.close()


def _room_for_chunk(ctx: RunContext, active: int, usual: int) -> bool:
    if active < usual:
        return True
    # A chunk still preparing its rows will soon queue requests: wait for it before judging.
    # No more rows on hand while the provider is down: nothing is being sent anyway.
    return (
        active < MAX_CHUNKS_IN_FLIGHT and ctx.on_hand.preparing == 0 and ctx.limiter.starved and not ctx.outage.is_open
    )
