"""A batch run's submit pass: the input chunk by chunk, each chunk's rows still to send under its claim, as lines."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.engine.job import Outcome
from tasks.engine.plan.claims import chunk_key
from tasks.engine.plan.rows import DONE, INVALID, NEW, PREV_ERROR
from tasks.engine.send.batch.left import leave
from tasks.engine.send.batch.request_files import RequestFiles, one_item_per_content
from tasks.engine.send.batch.shared import BatchShared
from tasks.engine.send.chunk import prepare_and_look_up
from tasks.engine.store.part_files import write_in_thread


class SubmitPass:
    """Passes over the input that turn rows still to send into request files (see request_files.py).

    ``live_only``: rows with no single batch line (the job splits them), sent live after the batches."""

    def __init__(self, shared: BatchShared, source: Any, total_rows: int) -> None:
        self.shared = shared
        self.source = source
        self.total_rows = total_rows
        self.files = RequestFiles(shared)
        self.live_only = 0

    async def run(self, first_round: bool, only: set[int] | None = None) -> int:
        """One pass over the input: every chunk with rows to send gets its claim and its lines.

        ``only``: just these chunks, and in them just the rows left to other runs before (counted now)."""
        shared = self.shared
        ctx, job, options = shared.ctx, shared.ctx.job, shared.options
        chunks = self.source.iter_chunks(
            list(dict.fromkeys([options.id_col, *job.input_columns])),
            options.chunk_size,
            string_columns=job.string_columns,
        )
        shared.watch.restart_pending()
        if only is None:
            self.live_only = 0  # counted again by each pass: the rows are still to send
        self.files.start_pass()
        seen = 0
        number = -1
        try:
            for chunk in chunks:
                number += 1
                if ctx.stop.event.is_set() or shared.unavailable is not None or seen >= self.total_rows:
                    break
                chunk = chunk.slice(0, self.total_rows - seen)
                first_row = seen
                seen += chunk.num_rows
                if shared.results.id_type is None:
                    shared.results.id_type = chunk.schema.field(options.id_col).type
                if only is not None:
                    if number not in only:
                        continue
                    within: np.ndarray | None = shared.left.pop(number).positions
                elif number in shared.left:
                    continue  # left to another run: looked at again at the end
                else:
                    within = None
                await self._add_chunk(chunk, number, first_row, count=first_round or only is not None, within=within)
            await self.files.end_pass()
        finally:
            chunks.close()
            self.files.drop_current()
        return self.files.submitted

    async def _add_chunk(
        self, chunk: pa.Table, number: int, first_row: int, *, count: bool, within: np.ndarray | None
    ) -> None:
        """A chunk's rows still to send, as lines of the current request file, under the chunk's claim.

        ``count``: the rows are seen for the first time in this run (skipped and failed ones are counted);
        ``within``: only these positions of the chunk."""
        shared = self.shared
        ctx, claims, watch = shared.ctx, shared.claims, shared.watch
        ready = await asyncio.to_thread(prepare_and_look_up, ctx, chunk)
        id_array = chunk.column(shared.options.id_col)
        keys = ctx.output.statuses(id_array, ready)
        status = keys.status
        in_play = np.ones(chunk.num_rows, bool)
        if within is not None:
            in_play[:] = False
            in_play[within] = True
        if count:
            self._count_seen(status, in_play)
        work = in_play & ((status == NEW) | (status == INVALID))
        if not count:
            work &= status == NEW  # invalid rows were written by the first pass
        work &= ~self._pending_mine(keys, status)
        if not work.any():
            return
        key = chunk_key(id_array.to_pylist(), ready.hashes)
        holder = await asyncio.to_thread(claims.acquire, key)
        if holder is not None:
            leave(shared.left, claims, number, first_row, key, np.flatnonzero(work), keys, holder)
            return
        try:
            # Other runs may have written or submitted these rows since this run looked.
            await watch.look_again()
            if watch.new_parts.results:
                ready.done = await asyncio.to_thread(ctx.output.index.pairs_done, ready.keys, id_array)
            keys = ctx.output.statuses(id_array, ready)
            status = keys.status
            # Rows of ``work`` another run wrote meanwhile: counted here (this run never counted them).
            self._count_seen(status, work)
            work &= (status == NEW) | (status == INVALID)
            theirs = work & watch.others_pending.has_keys(keys.keys) if len(watch.others_pending) else None
            if theirs is not None and theirs.any():
                leave(shared.left, claims, number, first_row, key, np.flatnonzero(theirs), keys, None)
                work &= ~theirs
            added = await self._lines_of(chunk, ready, keys, work, first_row, count=count, key=key)
        except BaseException:
            await asyncio.to_thread(claims.release, key)
            raise
        if not added:
            await asyncio.to_thread(claims.release, key)  # nothing in a request file: nothing to hold

    def _count_seen(self, status: np.ndarray, where: np.ndarray) -> None:
        ctx = self.shared.ctx
        skipped = int(np.count_nonzero(where & (status == DONE)))
        failed = int(np.count_nonzero(where & (status == PREV_ERROR)))
        ctx.stats.skipped_done += skipped
        ctx.stats.failed += failed
        if skipped or failed:
            ctx.progress.advance(skipped + failed)

    def _pending_mine(self, keys: Any, status: np.ndarray) -> np.ndarray:
        """Rows in a batch this run polls (or failed in this run's batches): written by this run."""
        pending_keys, failed_now = self.shared.watch.pending_keys, self.shared.results.failed_now
        mine = np.zeros(len(status), bool)
        new = status == NEW
        if len(pending_keys):
            mine |= new & pending_keys.has_keys(keys.keys)
        if len(failed_now):
            mine |= new & failed_now.has_pairs(keys.keys, keys.tags)
        return mine

    async def _lines_of(
        self,
        chunk: pa.Table,
        ready: Any,
        keys: Any,
        work: np.ndarray,
        first_row: int,
        *,
        count: bool,
        key: str,
    ) -> bool:
        """Write the ``work`` rows of a claimed chunk: invalid ones to ``_errors/``, stored contents
        copied, the rest as lines of the current request file. True if any line holds them (then the
        claim is held until the files holding them are submitted)."""
        shared = self.shared
        ctx, job, results = shared.ctx, shared.ctx.job, shared.results
        status = keys.status
        # Text jobs' rows were only hashed: prepared (and their hashes spelled out) if they are sent.
        hashes = ready.hex(np.flatnonzero(work))
        ids = chunk.column(shared.options.id_col).to_pylist()
        invalid = np.flatnonzero(work & (status == INVALID))
        if len(invalid) and count and not shared.auto:  # auto: the live pass writes them
            outcomes = [Outcome(error_type="invalid_input", error_message=str(ready.prepared[p])) for p in invalid]
            rows = [(ids[p], hashes[p], first_row + p) for p in invalid]
            await write_in_thread(results.write_rows, rows, outcomes, [True] * len(rows))
        new = np.flatnonzero(work & (status == NEW))
        if not len(new):
            return False
        batchable = getattr(job, "fits_one_line", None)
        if batchable is not None:
            # A row the job sends as several requests (a long recording's segments) has no single
            # batch line: it is sent live after the batches, in batch mode too.
            one_line = np.array([batchable(ready.prepared[p]) for p in new.tolist()], dtype=bool)
            if not one_line.all():
                self.live_only += int(np.count_nonzero(~one_line))
                new = new[one_line]
        stored = ctx.output.index.results.has_keys(keys.keys[new])
        if stored.any():
            missing = await results.copy_stored(new[stored], ids, hashes, keys.keys, first_row)
            stored[np.isin(new, missing)] = False  # the index only seemed to hold them: sent
        new = new[~stored]
        if not len(new):
            return False
        await asyncio.to_thread(ready.fill, job, chunk, new)
        owners = one_item_per_content(new, ids, hashes, ready.prepared, first_row)
        files = self.files
        if files.current is not None:
            files.current.claims.add(key)
        groups = [
            (item, members)
            for item, members in owners.values()
            if files.current is None or not files.current.join(item.content_hash, members)
        ]
        files.in_progress = key
        try:
            return await files.add_lines(groups, key)
        finally:
            files.in_progress = None
