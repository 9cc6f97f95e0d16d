"""`--mode batch|auto`: the same rows through the provider's batch API, at its price, into the same output.

A batch run (docs/how-to/batch-mode.md):

1. Re-attach: every batch recorded in ``OUTPUT/_batches/`` and not yet written is polled again, and its
   rows are not put into any new batch. A record that never reached the provider (no batch id) is
   matched against the provider's batch list by its input file, or dropped (nothing was paid).
2. Submit: the input is read chunk by chunk with the live run's checks (done rows, earlier errors,
   invalid rows, contents already in the output or already in a batch), and each content still to do
   becomes part of a request line, built by the job's own ``send`` (the SDK's request body, recorded by
   :class:`CapturingTransport`). Lines stream into a JSONL file on disk, cut at the provider's limits
   (lines, embedding inputs, bytes); which rows each line holds streams into a rows file beside it.
   Both are written, and the record ``<name>.json`` saved, before the file is uploaded; the batch id is
   recorded as soon as the provider gives it.
3. Poll every ``poll_s`` seconds; a batch that ends is downloaded (streamed to disk) and its lines are
   parsed by the job's own ``send`` (:class:`ReplayTransport`), then written as part files and
   ``_errors/`` rows exactly as live results are.
4. Lines that never ran (the batch expired or was cancelled) are sent again: in a new batch (``batch``)
   or live, right after (``auto``, which also sends live what failed in a batch and a remainder too
   small to be worth a batch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.job import Item, Outcome
from tasks.engine.plan.claims import ClaimBook, Holder, batch_key, chunk_key
from tasks.engine.plan.claims import log as claims_log
from tasks.engine.plan.done import KnownParts
from tasks.engine.plan.key_table import KeyTable, hash_keys, id_tags
from tasks.engine.plan.rows import DONE, INVALID, NEW, PREV_ERROR, chunk_statuses
from tasks.engine.send.batch.fallback import send_rest_live
from tasks.engine.send.batch.manage import PollBar
from tasks.engine.send.batch.policy import BatchPolicy
from tasks.engine.send.batch.records import (
    BATCHES_DIR,
    LOST,
    PREPARED,
    SUBMITTED,
    UPLOADED,
    WRITTEN,
    Book,
    LineRows,
    RequestFile,
    now,
    read_rows,
    remove_scratch,
    request_line,
)
from tasks.engine.send.batch.results import ResultWriter
from tasks.engine.send.batch.routes import BatchRoutes
from tasks.engine.send.chunk import prepare_and_look_up
from tasks.engine.send.context import RunContext
from tasks.errors import RunStopped
from tasks.provider.batches import (
    BatchApi,
    BatchInfo,
)
from tasks.provider.client import Connection, classify_failure

__all__ = ["BatchRun", "BatchTotals"]

log = logging.getLogger("gembatch.batch")
WAIT_NOTE_S = 30.0  # while waiting for rows other runs hold, say so this often


# -- the run --------------------------------------------------------------------------------------------


@dataclass
class BatchTotals:
    created: int = 0
    reattached: int = 0
    lines_submitted: int = 0
    lines_answered: int = 0
    lines_failed: int = 0
    lines_unfinished: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    live_rows: int = 0
    lost: int = 0


@dataclass
class _Left:
    """Rows of a chunk this run left to another run: the chunk's claim was held (``holder``), or the rows
    are in another live run's batch (``holder`` None). Checked again at the end (:meth:`BatchRun._finish_left`)."""

    first_row: int
    key: str  # the chunk's claim
    positions: np.ndarray  # the rows left, as positions in the chunk
    keys: np.ndarray  # their content keys (to see whether another run's batch still holds them)
    tags: np.ndarray  # their id tags (to see whether a batch this run takes over holds them)
    holder: Holder | None


class BatchRun:
    """One run's batch side (see the module docstring). ``drive_live`` is the live engine's driver.

    Two runs on one output (see claims.py): a chunk's rows go into a request file only while this run holds
    the chunk's claim (``claims``, the same claims as live chunks), and the claim is held until every
    request file holding its lines is recorded SUBMITTED; from then on the batch record is what other
    runs see (its rows are pending: not sent again). Each batch record has a claim of its own, taken
    before it is first saved and held until it is written: only its holder uploads, polls, downloads
    and writes it; another run re-attaches to it only when its holder is gone (claim stale).
    """

    def __init__(
        self,
        ctx: RunContext,
        source: Any,
        options: Any,
        total_rows: int,
        conn: Connection,
        drive_live: Callable[..., Awaitable[None]],
        chunk_runner: Any,
        claims: ClaimBook,
    ) -> None:
        self.ctx = ctx
        self.source = source
        self.options = options
        self.policy: BatchPolicy = options.batch
        self.total_rows = total_rows
        self.conn = conn
        self.api = BatchApi(conn.client, conn.base_url, conn.api_key, timeout_s=max(300.0, options.provider.timeout_s))
        self.book = Book(ctx.store)
        self.drive_live = drive_live
        self.chunk_runner = chunk_runner
        self.claims = claims
        self.totals = BatchTotals()
        self.pending_keys = KeyTable(payload=False)  # contents in batches this run polls
        self.mine: set[str] = set()  # batch records whose claim this run holds
        # Contents in batches other live runs poll (SUBMITTED records whose claim another run holds).
        self.others_pending = KeyTable(payload=False)
        self._others_submitted: frozenset[str] = frozenset()
        self._states: dict[str, str] = {}  # record name -> state last read (final ones are not read again)
        self.left: dict[int, _Left] = {}  # chunk number -> rows left to other runs
        self._known_parts = KnownParts(ctx.index, ctx.stats.parts_written, ctx.stats.error_parts_written)
        self.written: list[str] = []
        self.live_only = 0  # rows with no single batch line (the job splits them), sent live
        self.routes = BatchRoutes(ctx, conn, auto=self.auto)
        self.results = ResultWriter(ctx, conn, auto=self.auto, flush_rows=options.chunk_size)
        self._files = 0
        self._endpoint = ""
        self._new_parts: Any = None
        self._current: RequestFile | None = None
        self._submitted = 0
        self._in_progress: str | None = None

    @property
    def unavailable(self) -> str | None:
        return self.routes.unavailable

    @property
    def auto(self) -> bool:
        return self.policy.mode == "auto"

    # -- the whole run ------------------------------------------------------------------------------

    async def drive(self) -> None:
        try:
            await self._adopt_records()
            first = True
            while not self.ctx.stop_event.is_set():
                answered_before = self.totals.lines_answered + self.totals.lines_failed + self.totals.lost
                submitted = await self._submit_pass(first)
                first = False
                pending = self._my_submitted()
                if not pending and not submitted:
                    break
                await self._poll_until_written(pending)
                if self.auto or self.ctx.stop_event.is_set():
                    break
                if self.totals.lines_answered + self.totals.lines_failed + self.totals.lost == answered_before:
                    problems = "; ".join(sorted({r.get("errors") or r.get("status", "") for r in pending}))
                    self.ctx.request_stop(
                        RunStopped(
                            "failed: batch",
                            f"the provider answered none of the lines of {len(pending)} batch(es) ({problems}); "
                            f"see {self.options.output}/{BATCHES_DIR}/ and rerun, or use --mode live",
                        )
                    )
                    break
            if self.left and not self.ctx.stop_event.is_set():
                await self._finish_left()
            if (self.auto or self.live_only) and not self.ctx.stop_event.is_set():
                await self._live_remainder()
        finally:
            await self.routes.close()
            await self.results.close()
            remove_scratch(self.book)

    # -- 1. re-attach ---------------------------------------------------------------------------------

    async def _adopt_records(self) -> None:
        """Take the records nobody live holds: this run polls them (and any batch created from them).

        A record another live run holds is left to it: that run is submitting or polling it."""
        claims = self.claims
        listed: list[BatchInfo] | None = None
        for name in await asyncio.to_thread(self.book.names):
            if name in self.mine or self._states.get(name) in (WRITTEN, LOST):
                continue
            record = await asyncio.to_thread(self.book.read, name)
            if record is None or record["state"] in (WRITTEN, LOST):
                if record is not None:
                    self._states[name] = record["state"]
                continue
            if await asyncio.to_thread(claims.acquire, batch_key(name)) is not None:
                continue  # another live run submits or polls it
            record = await asyncio.to_thread(self.book.read, name)  # as it is now that this run holds it
            if record is None or record["state"] in (WRITTEN, LOST):
                await asyncio.to_thread(claims.release, batch_key(name))
                continue
            if record["state"] == PREPARED:
                await self._drop(record)  # never uploaded: nothing was paid, its rows are sent again
                continue
            if record["state"] == UPLOADED:
                # Created but the id not recorded (killed in between)? The provider's list knows.
                if listed is None:
                    try:
                        listed = await self.api.list()
                    except Exception:  # noqa: BLE001 - no list route: the file is sent again
                        listed = []
                match = [b for b in listed if b.input_file_id == record["file_id"]]
                if not match:
                    await self._drop(record)
                    continue
                record.update(state=SUBMITTED, batch_id=match[0].id, status=match[0].status)
                self.book.save(record)
            self.mine.add(name)
            self._states[name] = SUBMITTED
            self.totals.reattached += 1
            if self.left:
                await asyncio.to_thread(self._take_back, name)
            if record.get("run_id") != self.ctx.run_id:
                claims_log.warning(
                    "re-attaching to batch %s (%s) of run %s: that run is gone, this run polls and writes it",
                    record["batch_id"],
                    name,
                    record.get("run_id"),
                )

    def _take_back(self, name: str) -> None:
        """Rows left to another run that are in its batch ``name``, which this run now polls and writes
        (and counts then): no longer left."""
        rows = self.book.rows_path(name)
        if not self.book.fs.exists(rows):
            return
        table = KeyTable()
        with self.book.fs.open(rows, "rb") as f:
            parquet = pq.ParquetFile(f)
            for batch in parquet.iter_batches(columns=["content_hash", "id"], batch_size=65536):
                table.add(hash_keys(batch.column(0)), id_tags(batch.column(1)))
        for number, left in list(self.left.items()):
            theirs = table.has_pairs(left.keys, left.tags)
            if theirs.all():
                del self.left[number]
            elif theirs.any():
                keep = ~theirs
                left.positions, left.keys, left.tags = left.positions[keep], left.keys[keep], left.tags[keep]

    async def _drop(self, record: dict[str, Any]) -> None:
        await asyncio.to_thread(self.book.remove, record)
        self._states.pop(record["name"], None)
        await asyncio.to_thread(self.claims.release, batch_key(record["name"]))

    def _my_submitted(self) -> list[dict[str, Any]]:
        return [r for r in self.book.records() if r["state"] == SUBMITTED and r["name"] in self.mine]

    def _add_pending(self, record: dict[str, Any], table: KeyTable | None = None) -> None:
        rows = self.book.rows_path(record["name"])
        if not self.book.fs.exists(rows):
            return
        with self.book.fs.open(rows, "rb") as f:
            parquet = pq.ParquetFile(f)
            for batch in parquet.iter_batches(columns=["content_hash"], batch_size=65536):
                (self.pending_keys if table is None else table).add(hash_keys(batch.column(0)))

    def _refresh(self) -> None:
        """What other runs did since this run last looked (worker thread): their new parts go into the
        index, and the contents of their submitted batches into ``others_pending``."""
        ctx = self.ctx
        new = ctx.store.read_new_parts(self._known_parts(), ctx.id_col)
        self._new_parts = new
        submitted = set()
        for name in self.book.names():
            if name in self.mine:
                continue
            state = self._states.get(name)
            if state not in (WRITTEN, LOST):
                record = self.book.read(name)
                if record is None:
                    continue
                state = self._states[name] = record["state"]
            if state == SUBMITTED:
                submitted.add(name)
        if submitted != self._others_submitted:
            table = KeyTable(payload=False)
            for name in submitted:
                self._add_pending({"name": name}, table)
            self.others_pending, self._others_submitted = table, frozenset(submitted)

    async def _look_again(self) -> None:
        await asyncio.to_thread(self._refresh)
        self._new_parts.add_to(self.ctx.index)

    # -- 2. submit --------------------------------------------------------------------------------------

    async def _submit_pass(self, first_round: bool, only: set[int] | None = None) -> int:
        """One pass over the input: every chunk with rows to send gets its claim and its lines.

        ``only``: just these chunks, and in them just the rows left to other runs before (counted now)."""
        ctx, job, options = self.ctx, self.ctx.job, self.options
        chunks = self.source.iter_chunks(
            list(dict.fromkeys([options.id_col, *job.input_columns])),
            options.chunk_size,
            string_columns=job.string_columns,
        )
        # Contents in a batch this run polls (re-attached, or submitted earlier in this run): not sent again.
        self.pending_keys = KeyTable(payload=False)
        if only is None:
            self.live_only = 0  # counted again by each pass: the rows are still to send
        for record in self._my_submitted():
            self._add_pending(record)
        self._current: RequestFile | None = None
        self._submitted = 0
        self._in_progress: str | None = None  # the claim of the chunk whose lines are being added
        seen = 0
        number = -1
        try:
            for chunk in chunks:
                number += 1
                if ctx.stop_event.is_set() or self.unavailable is not None or seen >= self.total_rows:
                    break
                chunk = chunk.slice(0, self.total_rows - seen)
                first_row = seen
                seen += chunk.num_rows
                if self.results.id_type is None:
                    self.results.id_type = chunk.schema.field(options.id_col).type
                if only is not None:
                    if number not in only:
                        continue
                    within: np.ndarray | None = self.left.pop(number).positions
                elif number in self.left:
                    continue  # left to another run: looked at again at the end
                else:
                    within = None
                await self._add_chunk(chunk, number, first_row, count=first_round or only is not None, within=within)
            current = self._current
            if current is not None and current.lines:
                if self.auto and current.lines < self.policy.auto_min_requests and not ctx.stop_event.is_set():
                    self._discard(current)  # too small to be worth a batch: sent live after
                elif not ctx.stop_event.is_set():
                    self._submitted += await self._submit(current, self._endpoint)
                else:
                    self._discard(current)
                self._current = None
        finally:
            chunks.close()
            if self._current is not None:
                self._discard(self._current)
                self._current = None
        return self._submitted

    async def _add_chunk(
        self, chunk: pa.Table, number: int, first_row: int, *, count: bool, within: np.ndarray | None
    ) -> None:
        """A chunk's rows still to send, as lines of the current request file, under the chunk's claim.

        ``count``: the rows are seen for the first time in this run (skipped and failed ones are counted);
        ``within``: only these positions of the chunk."""
        ctx, options = self.ctx, self.options
        ready = await asyncio.to_thread(prepare_and_look_up, ctx, chunk)
        id_array = chunk.column(options.id_col)
        keys = chunk_statuses(
            ctx.index, id_array, ready.keys, ready.invalid, retry_errors=ctx.retry_errors, done=ready.done
        )
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
        holder = await asyncio.to_thread(self.claims.acquire, key)
        if holder is not None:
            self._leave(number, first_row, key, np.flatnonzero(work), keys, holder)
            return
        try:
            # Other runs may have written or submitted these rows since this run looked.
            await self._look_again()
            if self._new_parts.results:
                ready.done = await asyncio.to_thread(ctx.index.pairs_done, ready.keys, id_array)
            keys = chunk_statuses(
                ctx.index, id_array, ready.keys, ready.invalid, retry_errors=ctx.retry_errors, done=ready.done
            )
            status = keys.status
            # Rows of ``work`` another run wrote meanwhile: counted here (this run never counted them).
            self._count_seen(status, work)
            work &= (status == NEW) | (status == INVALID)
            theirs = work & self.others_pending.has_keys(keys.keys) if len(self.others_pending) else None
            if theirs is not None and theirs.any():
                self._leave(number, first_row, key, np.flatnonzero(theirs), keys, None)
                work &= ~theirs
            added = await self._lines_of(chunk, ready, keys, work, first_row, count=count, key=key)
        except BaseException:
            await asyncio.to_thread(self.claims.release, key)
            raise
        if not added:
            await asyncio.to_thread(self.claims.release, key)  # nothing in a request file: nothing to hold

    def _count_seen(self, status: np.ndarray, where: np.ndarray) -> None:
        ctx = self.ctx
        skipped = int(np.count_nonzero(where & (status == DONE)))
        failed = int(np.count_nonzero(where & (status == PREV_ERROR)))
        ctx.stats.skipped_done += skipped
        ctx.stats.failed += failed
        if skipped or failed:
            ctx.on_progress(skipped + failed)

    def _pending_mine(self, keys: Any, status: np.ndarray) -> np.ndarray:
        """Rows in a batch this run polls (or failed in this run's batches): written by this run."""
        mine = np.zeros(len(status), bool)
        new = status == NEW
        if len(self.pending_keys):
            mine |= new & self.pending_keys.has_keys(keys.keys)
        if len(self.results.failed_now):
            mine |= new & self.results.failed_now.has_pairs(keys.keys, keys.tags)
        return mine

    def _leave(
        self, number: int, first_row: int, key: str, positions: np.ndarray, keys: Any, holder: Holder | None
    ) -> None:
        """Leave rows of chunk ``number`` to the run that holds its claim, or whose batch holds them."""
        left = self.left.get(number)
        if left is not None:  # the chunk's other rows were left before in this pass
            positions = np.union1d(left.positions, positions)
        self.left[number] = _Left(first_row, key, positions, keys.keys[positions], keys.tags[positions], holder)
        if holder is not None:
            self.claims.decline(holder, f"chunk {number} (rows from {first_row})", "submitted")

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
        ctx, job, options = self.ctx, self.ctx.job, self.options
        status = keys.status
        id_array = chunk.column(options.id_col)
        # Text jobs' rows were only hashed: prepared (and their hashes spelled out) if they are sent.
        hashes = ready.hex(np.flatnonzero(work))
        ids = id_array.to_pylist()
        invalid = np.flatnonzero(work & (status == INVALID))
        if len(invalid) and count and not self.auto:  # auto: the live pass writes them
            outcomes = [Outcome(error_type="invalid_input", error_message=str(ready.prepared[p])) for p in invalid]
            rows = [(ids[p], hashes[p], first_row + p) for p in invalid]
            await asyncio.to_thread(self.results.write_rows, rows, outcomes, [True] * len(rows))
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
        stored = ctx.index.results.has_keys(keys.keys[new])
        if stored.any():
            missing = await self.results.copy_stored(new[stored], ids, hashes, keys.keys, first_row)
            stored[np.isin(new, missing)] = False  # the index only seemed to hold them: sent
        new = new[~stored]
        if not len(new):
            return False
        await asyncio.to_thread(ready.fill, job, chunk, new)
        owners = _one_item_per_content(new, ids, hashes, ready.prepared, first_row)
        current = self._current
        if current is not None:
            current.claims.add(key)
        groups = [
            (item, members)
            for item, members in owners.values()
            if current is None or not current.join(item.content_hash, members)
        ]
        self._in_progress = key
        try:
            return await self._add_lines(groups, key)
        finally:
            self._in_progress = None

    async def _add_lines(self, groups: list[tuple[Item, list[tuple[Any, int]]]], key: str) -> bool:
        """Add the items as lines of the current request file (a new one when it is full: the full one is
        submitted). False if the request file was dropped (nothing holds the rows), else True."""
        current, size = self._current, self.ctx.job.max_items_per_request
        for start in range(0, len(groups), size):
            part = groups[start : start + size]
            items = [item for item, _ in part]
            endpoint, body = await self.routes.request_of(items)
            if current is None:
                current = self._current = self._new_file(key)
            custom_id = f"{current.name}-{current.lines:05d}"
            line = request_line(custom_id, endpoint, body)
            if not current.fits(len(items), len(line), self.policy, endpoint):
                self._current = None
                self._submitted += await self._submit(current, endpoint)
                if self.unavailable is not None:
                    return False  # the request file was dropped: nothing holds these rows
                if self.ctx.stop_event.is_set():
                    return True
                current = self._current = self._new_file(key)
                custom_id = f"{current.name}-{current.lines:05d}"
                line = request_line(custom_id, endpoint, body)
            rows = [(i, row_id, input_row) for i, (_, members) in enumerate(part) for row_id, input_row in members]
            current.add_line(line, items, rows, custom_id)
            self._endpoint = endpoint
        return True

    def _discard(self, request_file: RequestFile) -> None:
        """A request file not submitted: its rows are free again for any run (live, in auto mode)."""
        request_file.discard(self.book)
        for key in request_file.claims:
            if key != self._in_progress:
                self.claims.release(key)

    def _new_file(self, key: str) -> RequestFile:
        self._files += 1
        name = f"{self.ctx.run_id}-{self._files:04d}"
        request_file = RequestFile(self.book, name, self.results.id_type or pa.int64())
        request_file.claims.add(key)
        return request_file

    async def _submit(self, request_file: RequestFile, endpoint: str) -> int:
        """Record, upload and create one batch; the record is saved before each step that may cost."""
        ctx = self.ctx
        request_file.close()
        reservation = None
        if ctx.budget is not None:
            reservation = ctx.budget.reserve(request_file.tokens)
            if reservation is None:
                self._discard(request_file)
                ctx.request_stop(ctx.budget.stop())
                return 0
        # The record's own claim, before anyone can see the record: no other run re-attaches to it while
        # this run uploads, creates and polls it.
        held = await asyncio.to_thread(self.claims.acquire, batch_key(request_file.name))
        if held is not None:
            raise RuntimeError(f"batch record {request_file.name} is claimed by {held.describe()}")
        self.mine.add(request_file.name)
        record = self._record_of(request_file, endpoint, reservation)
        self.book.save(record)
        file_id = await self.routes.call(
            "POST files (upload of the request file)", lambda: self.api.upload(request_file.path, request_file.name)
        )
        info = None
        if file_id is not None:
            record["file_id"] = file_id
            record["state"] = UPLOADED
            self.book.save(record)
            info = await self.routes.call(
                "POST batches", lambda: self.api.create(file_id, endpoint, {"gembatch": request_file.name})
            )
        if info is None:
            # Nothing was created, so nothing is paid: the record goes, and its rows are free again.
            await asyncio.to_thread(self.book.remove, record)
            self.mine.discard(request_file.name)
            await asyncio.to_thread(self.claims.release, batch_key(request_file.name))
            self._discard(request_file)
            if reservation is not None and ctx.budget is not None:
                ctx.budget.release(reservation)
            return 0
        record.update(state=SUBMITTED, batch_id=info.id, status=info.status)
        self.book.save(record)
        request_file.path.unlink(missing_ok=True)
        self.pending_keys.add(hash_keys(request_file.hashes))
        self._states[request_file.name] = SUBMITTED
        # The batch record holds these rows now (other runs see it): the chunks' claims can go, except
        # the claim of a chunk whose next lines go into the next file.
        for key in request_file.claims:
            if key != self._in_progress:
                await asyncio.to_thread(self.claims.release, key)
        self.totals.created += 1
        self.totals.lines_submitted += request_file.lines
        return request_file.lines

    def _record_of(self, request_file: RequestFile, endpoint: str, reservation: float | None) -> dict[str, Any]:
        """The batch record of a request file about to be uploaded (state PREPARED)."""
        ctx = self.ctx
        return {
            "name": request_file.name,
            "run_id": ctx.run_id,
            "job": ctx.job.name,
            "model": ctx.job.model,
            "provider": self.conn.provider,
            # Credentials in the URL are never written (`gembatch batches --base-url URL` gives them again).
            "base_url": self.conn.shown_url,
            "flavor": self.api.flavor,
            "endpoint": endpoint,
            "state": PREPARED,
            "requests": request_file.lines,
            "items": request_file.inputs,
            "rows": request_file.rows,
            "estimated_tokens": request_file.tokens,
            "request_bytes": request_file.bytes,
            "reserved_usd": reservation,
            "file_id": None,
            "batch_id": None,
            "status": None,
            "request_counts": None,
            "created_at": now(),
        }

    # -- 3. poll and write -----------------------------------------------------------------------------

    async def _poll_until_written(self, pending: list[dict[str, Any]]) -> None:
        ctx = self.ctx
        bar = PollBar(enabled=self.options.progress)
        try:
            # After a budget stop the batches already submitted are paid for: they are still awaited.
            while pending and (not ctx.stop_event.is_set() or _budget_stop(ctx)):
                still = []
                for record in pending:
                    try:
                        info = await self.api.retrieve(record["batch_id"])
                    except Exception as exc:  # noqa: BLE001 - a failed poll is tried again next time
                        failure = classify_failure(exc)
                        if failure.kind == "not_found":
                            # The provider no longer knows it (deleted, past its retention, or a local
                            # emulator that is gone): nothing can be fetched, so its rows are sent again.
                            record.update(state=LOST, status="not found", errors=self.conn.redact(failure.message))
                            self.book.save(record)
                            self.book.remove(record, keep_record=True)
                            self._states[record["name"]] = LOST
                            await asyncio.to_thread(self.claims.release, batch_key(record["name"]))
                            self.totals.lost += 1
                            continue
                        if failure.fatal:
                            ctx.request_stop(failure.stop())
                            return
                        if not failure.retryable:
                            # Asking again would get the same answer: stop; the record keeps the batch.
                            ctx.request_stop(
                                RunStopped(
                                    "failed: batch unavailable",
                                    f"GET batches/{record['batch_id']} at {self.conn.host} answered "
                                    f"{self.conn.redact(failure.message).rstrip('.')}. The batch stays recorded in "
                                    f"{self.options.output}/{BATCHES_DIR}/ and the next run polls it again; "
                                    "`gembatch batches OUTPUT --cancel` gives it up",
                                )
                            )
                            return
                        still.append(record)
                        continue
                    counts = {"total": info.total, "completed": info.completed, "failed": info.failed}
                    changed = (info.status, counts) != (record.get("status"), record.get("request_counts"))
                    record.update(status=info.status, request_counts=counts, errors=info.errors)
                    if info.final:
                        await self._write_batch(record, info)
                    else:
                        if changed:
                            self.book.save(record)
                        still.append(record)
                    bar.show(record)
                pending = still
                if pending and ctx.stop_event.is_set():
                    await asyncio.sleep(self.policy.poll_s)
                elif pending:
                    try:
                        await asyncio.wait_for(ctx.stop_event.wait(), timeout=self.policy.poll_s)
                    except TimeoutError:
                        pass
        finally:
            bar.close()

    async def _write_batch(self, record: dict[str, Any], info: BatchInfo) -> None:
        """Download a finished batch's results and write them like live ones; then mark it written."""
        ctx, book = self.ctx, self.book
        name = record["name"]
        downloads = []
        for file_id, suffix in ((info.output_file_id, ".output.jsonl"), (info.error_file_id, ".errors.jsonl")):
            if file_id:
                dest = book.scratch / f"{name}{suffix}"
                await self.api.download(file_id, dest)
                downloads.append(dest)
        rows_table = await asyncio.to_thread(read_rows, book, name)
        lines = LineRows(rows_table)
        tally = await self.results.write_lines(downloads, lines)
        seen, answered, failed = tally.seen, tally.answered, tally.failed
        prompt, completion, total = tally.prompt, tally.completion, tally.total
        stats = ctx.stats
        stats.prompt_tokens += prompt
        stats.completion_tokens += completion
        stats.total_tokens += total
        stats.requests += len(seen)
        stats.items_sent += sum(len(lines.get(c)[0]) for c in seen)
        self.totals.prompt_tokens += prompt
        self.totals.completion_tokens += completion
        self.totals.total_tokens += total
        self.totals.lines_answered += answered
        self.totals.lines_failed += failed
        unfinished = len(lines) - len(seen)
        self.totals.lines_unfinished += unfinished
        if ctx.budget is not None:
            ctx.budget.release(record.get("reserved_usd") or 0.0)
            ctx.budget.charge(prompt, total)
        record.update(
            state=WRITTEN,
            status=info.status,
            written_at=now(),
            written_by_run=ctx.run_id,
            lines_answered=answered,
            lines_failed=failed,
            lines_unfinished=unfinished,
            tokens={"prompt": prompt, "completion": completion, "total": total},
        )
        book.save(record)
        book.remove(record, keep_record=True)
        self._states[name] = WRITTEN
        await asyncio.to_thread(self.claims.release, batch_key(name))
        self.written.append(name)
        if self.results.fatal is not None:
            ctx.request_stop(self.results.fatal.stop())

    # -- rows left to other runs ------------------------------------------------------------------------

    async def _finish_left(self) -> None:
        """Wait for the rows left to other runs; then look at each chunk again: rows written meanwhile are
        counted as skipped, rows still to send (their holder is gone, or its batch expired) are claimed
        and sent here. A batch record whose run is gone is re-attached to and polled by this run."""
        ctx, claims = self.ctx, self.claims
        waited_from = time.monotonic()
        next_note = 0.0
        try:
            while self.left and not ctx.stop_event.is_set():
                await self._adopt_records()
                pending = self._my_submitted()
                if pending:
                    await self._poll_until_written(pending)
                    continue
                await self._look_again()
                holders = await asyncio.to_thread(claims.holders_of, [left.key for left in self.left.values()])
                ready = set()
                for number, left in self.left.items():
                    left.holder = holders[left.key]
                    in_theirs = len(self.others_pending) and self.others_pending.has_keys(left.keys).any()
                    if left.holder is None and not in_theirs:
                        ready.add(number)
                if ready:
                    await self._submit_pass(False, only=ready)
                    continue
                if time.monotonic() >= next_note:
                    next_note = time.monotonic() + WAIT_NOTE_S
                    claims_log.warning("waiting for %s", self._waiting_for())
                try:
                    await asyncio.wait_for(ctx.stop_event.wait(), timeout=claims.policy.poll_s)
                except TimeoutError:
                    pass
            pending = self._my_submitted()
            if pending and not ctx.stop_event.is_set():
                await self._poll_until_written(pending)
        finally:
            claims.waited_s += time.monotonic() - waited_from

    def _waiting_for(self) -> str:
        held: dict[str, tuple[Holder, int]] = {}
        in_batches = 0
        for left in self.left.values():
            if left.holder is None:
                in_batches += 1
            else:
                holder, n = held.get(left.holder.run_id, (left.holder, 0))
                held[left.holder.run_id] = (holder, n + 1)
        parts = [f"{n} chunk(s) held by {holder.describe()}" for holder, n in held.values()]
        if in_batches:
            parts.append(f"{in_batches} chunk(s) with rows in batches other runs poll")
        ttl = self.claims.policy.ttl_s
        return (
            "; ".join(parts) + f". When they are written they are counted as skipped; a claim not renewed for "
            f"{ttl:g} s counts as abandoned and this run sends (or polls) what is missing."
        )

    # -- 4. auto: the rest live ------------------------------------------------------------------------

    async def _live_remainder(self) -> None:
        await send_rest_live(
            self.ctx,
            self.totals,
            self.source,
            self.options,
            self.total_rows,
            self.drive_live,
            self.chunk_runner,
            self.claims,
        )

    # -- metadata ---------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        t = self.totals
        return {
            "mode": self.policy.mode,
            "flavor": self.api.flavor,
            "batches_created": t.created,
            "batches_reattached": t.reattached,
            "batches_lost": t.lost,
            "batches_written": self.written,
            "requests_submitted": t.lines_submitted,
            "requests_answered": t.lines_answered,
            "requests_failed": t.lines_failed,
            "requests_unfinished": t.lines_unfinished,
            "rows_live": t.live_rows,
            "rows_live_only": self.live_only,
            "unavailable": self.unavailable,
            "tokens": {"prompt": t.prompt_tokens, "completion": t.completion_tokens, "total": t.total_tokens},
            "records": f"{self.options.output}/{BATCHES_DIR}/",
        }


def _budget_stop(ctx: RunContext) -> bool:
    return ctx.stopped is not None and ctx.stopped.status == "stopped: budget"


def _one_item_per_content(
    positions: np.ndarray, ids: list[Any], hashes: list[str], prepared: Any, first_row: int
) -> dict[str, tuple[Item, list[tuple[Any, int]]]]:
    """One item per content, by content hash; every row of that content (id, input row) rides on it."""
    owners: dict[str, tuple[Item, list[tuple[Any, int]]]] = {}
    for pos in positions.tolist():
        h = hashes[pos]
        if h in owners:
            owners[h][1].append((ids[pos], first_row + pos))
        else:
            owners[h] = (Item(pos, ids[pos], h, prepared[pos]), [(ids[pos], first_row + pos)])
    return owners
