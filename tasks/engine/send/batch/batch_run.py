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
import json
import logging
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.defaults import DEFAULT_AUTO_MIN_REQUESTS, DEFAULT_BATCH_POLL_S, MAX_BATCH_REQUESTS
from tasks.engine.plan.claims import ClaimBook, Holder, batch_key, chunk_key
from tasks.engine.plan.claims import log as claims_log
from tasks.engine.plan.index import KeyTable, hash_keys, id_tags
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
    read_records,
    read_rows,
    remove_scratch,
    request_line,
)
from tasks.engine.send.chunk import (
    DONE,
    INVALID,
    NEW,
    PREV_ERROR,
    BadReply,
    Item,
    Outcome,
    RowFailure,
    RunContext,
    chunk_statuses,
    prepare_and_look_up,
    rerouted_stop,
)
from tasks.engine.store.output import RETRY_AUTO, RETRY_ON_REQUEST, KnownParts
from tasks.errors import ConfigError, RunStopped
from tasks.provider.batches import (
    BatchApi,
    BatchInfo,
    CapturingTransport,
    ReplayTransport,
    RequestCaptured,
    endpoint_of,
    normalise_body,
    offline_client,
)
from tasks.provider.catalog import same_model
from tasks.provider.client import Connection, classify_failure

__all__ = ["BatchPolicy", "BatchRun", "BATCHES_DIR", "MODES", "check_batch_capable", "read_records"]

MODES = ("live", "batch", "auto")
log = logging.getLogger("gembatch.batch")
# Tries of an upload or a batch creation that fails with a 5xx, a timeout or a broken connection.
BATCH_ROUTE_ATTEMPTS = 4
# A body saying the server has nowhere to keep files (LiteLLM without files_settings, a proxy without a store).
_NO_STORAGE = re.compile(r"files_settings|file storage|storage (?:is )?not (?:set|configured)|no storage", re.I)
# OpenAI's documented caps per input file; Gemini's (2 GB a file) are larger. Bytes are kept lower on
# purpose: the OpenAI SDK sends a file in one request body.
MAX_LINES_PER_FILE = MAX_BATCH_REQUESTS
MAX_EMBEDDING_INPUTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 100 * 1024 * 1024
DEFAULT_POLL_S = DEFAULT_BATCH_POLL_S
# Result rows written together: one part file per this many rows (at least a chunk's worth).
WRITE_RESULT_ROWS = 2000
WAIT_NOTE_S = 30.0  # while waiting for rows other runs hold, say so this often


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    """How a run uses the provider's batch API (the ``--mode`` and ``--batch-*`` options)."""

    mode: str = "live"
    poll_s: float = DEFAULT_POLL_S
    max_lines: int = MAX_LINES_PER_FILE
    max_inputs: int = MAX_EMBEDDING_INPUTS_PER_FILE
    max_bytes: int = MAX_BYTES_PER_FILE
    auto_min_requests: int = DEFAULT_AUTO_MIN_REQUESTS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.poll_s <= 0:
            raise ValueError(f"--batch-poll must be positive, got {self.poll_s}")
        if self.max_lines < 1:
            raise ValueError(f"--batch-max-requests must be at least 1, got {self.max_lines}")
        if self.auto_min_requests < 1:
            raise ValueError(f"--auto-min-requests must be at least 1, got {self.auto_min_requests}")


def check_batch_capable(job: Any, provider: str, base_url: str | None) -> None:
    """Refuse, before any work, a job whose route has no batch form at this provider."""
    if job.name == "images":
        raise ConfigError(
            "--mode batch/auto: image generation has no batch form here (Gemini's OpenAI-compatible batches "
            "take only /v1/chat/completions and /v1/embeddings); run images with --mode live"
        )
    if getattr(job, "api", "chat") == "transcriptions":
        raise ConfigError(
            "--mode batch/auto: audio/transcriptions has no batch form (batches take /v1/chat/completions and "
            "/v1/embeddings); use --api chat, or --mode live"
        )


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
        self.failed_now = KeyTable()  # (content, id) pairs written to _errors/ by this run
        self.written: list[str] = []
        self.live_only = 0  # rows with no single batch line (the job splits them), sent live
        self._capture = CapturingTransport()
        self._capture_conn = Connection(
            client=offline_client(conn.base_url, self._capture),
            base_url=conn.base_url,
            provider=conn.provider,
            api_key="",
        )
        self._replay = ReplayTransport()
        self._replay_conn = Connection(
            client=offline_client(conn.base_url, self._replay),
            base_url=conn.base_url,
            provider=conn.provider,
            api_key="",
        )
        self._files = 0
        self._endpoint = ""
        self._id_type: pa.DataType | None = None
        self._new_parts: Any = None
        self._current: RequestFile | None = None
        self._submitted = 0
        self._in_progress: str | None = None
        self._fatal: Any = None  # a Failure every line would meet (see _parse_line)
        # Why the provider's Files/Batches routes can't be used (a gateway without file storage, a
        # server without batches): ``auto`` sends the rest live, ``batch`` stops. None: usable so far.
        self.unavailable: str | None = None

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
            await self._capture_conn.client.close()
            await self._replay_conn.client.close()
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
                if self._id_type is None:
                    self._id_type = chunk.schema.field(options.id_col).type
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
        if len(self.failed_now):
            mine |= new & self.failed_now.has_pairs(keys.keys, keys.tags)
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
            await asyncio.to_thread(self._write_rows, rows, outcomes, [True] * len(rows))
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
            missing = await self._copy_stored(new[stored], ids, hashes, keys.keys, first_row)
            stored[np.isin(new, missing)] = False  # the index only seemed to hold them: sent
        new = new[~stored]
        if not len(new):
            return False
        await asyncio.to_thread(ready.fill, job, chunk, new)
        # One item per content; every row of that content rides on it.
        owners: dict[str, tuple[Item, list[tuple[Any, int]]]] = {}
        for pos in new.tolist():
            h = hashes[pos]
            if h in owners:
                owners[h][1].append((ids[pos], first_row + pos))
            else:
                owners[h] = (Item(pos, ids[pos], h, ready.prepared[pos]), [(ids[pos], first_row + pos)])
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
            size = job.max_items_per_request
            for start in range(0, len(groups), size):
                part = groups[start : start + size]
                items = [item for item, _ in part]
                endpoint, body = await self._request_of(items)
                if current is None:
                    current = self._current = self._new_file(key)
                custom_id = f"{current.name}-{current.lines:05d}"
                line = request_line(custom_id, endpoint, body)
                if not current.fits(len(items), len(line), self.policy, endpoint):
                    self._current = None
                    self._submitted += await self._submit(current, endpoint)
                    if self.unavailable is not None:
                        return False  # the request file was dropped: nothing holds these rows
                    if ctx.stop_event.is_set():
                        return True
                    current = self._current = self._new_file(key)
                    custom_id = f"{current.name}-{current.lines:05d}"
                    line = request_line(custom_id, endpoint, body)
                rows = [(i, row_id, input_row) for i, (_, members) in enumerate(part) for row_id, input_row in members]
                current.add_line(line, items, rows, custom_id)
                self._endpoint = endpoint
        finally:
            self._in_progress = None
        return True

    def _discard(self, request_file: RequestFile) -> None:
        """A request file not submitted: its rows are free again for any run (live, in auto mode)."""
        request_file.discard(self.book)
        for key in request_file.claims:
            if key != self._in_progress:
                self.claims.release(key)

    def _new_file(self, key: str) -> RequestFile:
        self._files += 1
        request_file = RequestFile(self.book, f"{self.ctx.run_id}-{self._files:04d}", self._id_type or pa.int64())
        request_file.claims.add(key)
        return request_file

    async def _request_of(self, items: list[Item]) -> tuple[str, dict[str, Any]]:
        """The body the job's ``send`` would POST for these items, and the batch endpoint of its route."""
        try:
            await self.ctx.job.send(self._capture_conn, items)
        except RequestCaptured:
            pass
        except Exception as exc:  # noqa: BLE001 - the SDK wraps the transport's exception
            if not isinstance(exc.__cause__, RequestCaptured):
                raise
        else:
            raise ConfigError(f"{self.ctx.job.name}: building a batch request sent nothing")
        endpoint = endpoint_of(self._capture.path)
        if endpoint is None or self._capture.body is None:
            raise ConfigError(
                f"--mode batch: the {self.ctx.job.name} job's route {self._capture.path} has no batch form "
                "(batches take /v1/chat/completions and /v1/embeddings); use --mode live"
            )
        return endpoint, self._capture.body

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
        record = {
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
        self.book.save(record)
        file_id = await self._on_batch_route(
            "POST files (upload of the request file)", lambda: self.api.upload(request_file.path, request_file.name)
        )
        info = None
        if file_id is not None:
            record["file_id"] = file_id
            record["state"] = UPLOADED
            self.book.save(record)
            info = await self._on_batch_route(
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

    async def _on_batch_route(self, route: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call``'s answer; None when the route can't be used (then ``unavailable`` says why, and a
        ``batch`` run is stopped). Transient failures are retried as requests are."""
        ctx = self.ctx
        attempts = 0
        while True:
            attempts += 1
            try:
                return await call()
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - classified below; a bug is re-raised
                try:
                    failure = classify_failure(exc)
                except Exception:  # noqa: BLE001 - not a server's answer
                    if isinstance(exc, ConfigError):
                        failure = None
                        message = str(exc)
                    else:
                        raise
                else:
                    message = self.conn.redact(failure.message)
            if failure is not None and failure.retryable and attempts < BATCH_ROUTE_ATTEMPTS:
                try:
                    await asyncio.wait_for(ctx.stop_event.wait(), timeout=ctx.retry.delay(attempts, failure))
                except TimeoutError:
                    pass
                if not ctx.stop_event.is_set():
                    continue
            self._unusable(route, message, failure)
            return None

    def _unusable(self, route: str, message: str, failure: Any) -> None:
        where = f"{self.conn.host} ({self.conn.base_url})"
        said = message.rstrip(".")
        if failure is not None and failure.kind == "auth":
            cause = "the key may not use the files or batches routes"
        elif _NO_STORAGE.search(said):
            cause = "the server or gateway has no file storage configured (LiteLLM: files_settings in its config.yaml)"
        else:
            cause = "the server or gateway offers no usable Files/Batches API"
        self.unavailable = f"{route} at {where} answered {said}: {cause}"
        if self.auto:
            log.warning(
                "--mode auto: %s; sending every row live instead (at the live price; nothing was sent as a batch)",
                self.unavailable,
            )
            return
        self.ctx.request_stop(
            RunStopped(
                "failed: batch unavailable",
                f"--mode batch: {self.unavailable}. No batch was created and no row was marked as sent. Run the "
                "same command with --mode live (or --mode auto, which falls back to live by itself)",
            )
        )

    async def _copy_stored(
        self, positions: np.ndarray, ids: list[Any], hashes: list[str], keys: np.ndarray, first_row: int
    ) -> np.ndarray:
        """Rows whose content the output already holds under another id: copied, as a live run does.
        Returns the positions whose content was not there after all (the index matches a prefix)."""
        ctx = self.ctx
        wanted = {hashes[p] for p in positions.tolist()}
        files = ctx.index.parts_holding(keys[positions])
        table = await asyncio.to_thread(ctx.store.read_results_for, wanted, ctx.id_col, files=files)
        found = ctx.job.results_from_table(table)
        served: dict[str, Any] = {}
        if "served_model" in table.column_names:
            served = dict(zip(table.column("content_hash").to_pylist(), table.column("served_model").to_pylist()))
        rows, outcomes, missing = [], [], []
        for p in positions.tolist():
            if hashes[p] in found:
                rows.append((ids[p], hashes[p], first_row + p))
                outcomes.append(Outcome(result=found[hashes[p]], served_model=served.get(hashes[p])))
            else:
                missing.append(p)
        if rows:
            await asyncio.to_thread(self._write_rows, rows, outcomes, [False] * len(rows))
        return np.array(missing, np.intp)

    # -- 3. poll and write -----------------------------------------------------------------------------

    async def _poll_until_written(self, pending: list[dict[str, Any]]) -> None:
        ctx = self.ctx
        bar = _PollBar(enabled=self.options.progress)
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
        seen: set[str] = set()
        answered = failed = 0
        buffer_rows: list[tuple[Any, str, int]] = []
        buffer_out: list[Outcome] = []
        buffer_first: list[bool] = []
        prompt = completion = total = 0
        for path in downloads:
            with path.open("rb") as f:
                for raw in f:
                    if not raw.strip():
                        continue
                    line = json.loads(raw)
                    custom_id = line.get("custom_id")
                    members = lines.get(custom_id)
                    if members is None or custom_id in seen:
                        continue
                    response = line.get("response")
                    if not isinstance(response, dict) or response.get("status_code") is None:
                        continue  # never ran (expired, cancelled): sent again
                    seen.add(custom_id)
                    items, rows = members
                    outcomes, reply = await self._parse_line(custom_id, response, items)
                    if reply is not None:
                        prompt += reply[0]
                        completion += reply[1]
                        total += reply[2]
                    if outcomes[0] is None:
                        seen.discard(custom_id)
                        continue
                    line_failed = all(not o.ok for o in outcomes)
                    if line_failed:
                        failed += 1
                    else:
                        answered += 1
                    if self.auto and any(not o.ok for o in outcomes):
                        # auto: what failed in the batch is sent live after; nothing of it is written now.
                        outcomes = [o if o.ok else None for o in outcomes]
                    firsts: set[int] = set()
                    for item_index, row_id, input_row in rows:
                        outcome = outcomes[item_index]
                        if outcome is None:
                            continue
                        buffer_rows.append((row_id, items[item_index].content_hash, input_row))
                        buffer_out.append(outcome)
                        buffer_first.append(item_index not in firsts)
                        firsts.add(item_index)
                    if len(buffer_rows) >= max(WRITE_RESULT_ROWS, self.options.chunk_size):
                        await asyncio.to_thread(self._write_rows, buffer_rows, buffer_out, buffer_first)
                        buffer_rows, buffer_out, buffer_first = [], [], []
        if buffer_rows:
            await asyncio.to_thread(self._write_rows, buffer_rows, buffer_out, buffer_first)
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
        if self._fatal is not None:
            ctx.request_stop(self._fatal.stop())

    async def _parse_line(
        self, custom_id: str, response: dict[str, Any], items: list[Item]
    ) -> tuple[list[Outcome | None], tuple[int, int, int] | None]:
        """One result line through the job's own ``send`` (the SDK parses it as a live reply)."""
        self._replay.status = int(response["status_code"])
        self._replay.body = normalise_body(response.get("body"), custom_id)
        redact = self.conn.redact
        try:
            reply = await self.ctx.job.send(self._replay_conn, items)
            if len(reply.results) != len(items):
                raise BadReply(f"the reply had {len(reply.results)} results for {len(items)} inputs")
        except BadReply as exc:
            raw = exc.raw_reply[:4000] if exc.raw_reply else None
            return [
                Outcome(error_type="bad_reply", error_message=f"bad reply: {exc}", attempts=1, raw_reply=raw)
            ] * len(items), None
        except Exception as exc:  # noqa: BLE001 - classify_failure re-raises what it doesn't know
            failure = classify_failure(exc)
            if failure.fatal:
                # Every line would fail so (a refused schema, a key without access): stop as live does,
                # and leave the rows unwritten.
                self._fatal = failure
                return [None] * len(items), None
            message = redact(failure.message) + " (batch line)"
            return [
                Outcome(error_type=failure.kind, error_message=message, attempts=1, retry_auto=failure.retryable)
            ] * len(items), None
        job, served = self.ctx.job, reply.served_model
        if served is not None and not same_model(job.model, served):
            stats = self.ctx.stats
            stats.rerouted[served] = stats.rerouted.get(served, 0) + len(items)
            if getattr(job, "stop_on_reroute", False):
                # As live: no vector of another model is written; the rows stay to send.
                self.ctx.request_stop(rerouted_stop(job, served, self.ctx.store.url))
                return [None] * len(items), None
        outcomes = []
        finish = getattr(self.ctx.job, "finish_line", None)  # a job that completes a row after its reply
        for item, result in zip(items, reply.results, strict=True):
            if isinstance(result, RowFailure):
                outcomes.append(
                    Outcome(
                        error_type=result.kind,
                        error_message=redact(result.message),
                        attempts=1,
                        raw_reply=result.raw_reply,
                    )
                )
            elif finish is not None:
                outcomes.append(await finish(item, Outcome(result=result, attempts=1, served_model=served)))
            else:
                outcomes.append(Outcome(result=result, attempts=1, served_model=served))
        return outcomes, (reply.prompt_tokens, reply.completion_tokens, reply.total_tokens)

    def _write_rows(self, rows: list[tuple[Any, str, int]], outcomes: list[Outcome], firsts: list[bool]) -> None:
        """Write rows (id, content_hash, input_row) with their outcomes: one results part, one errors part,
        the same columns as a live chunk's (engine.chunk._write_chunk); the done-key index learns them."""
        ctx, job, stats = self.ctx, self.ctx.job, self.ctx.stats
        id_type = self._id_type or pa.int64()
        # A row already in the output (a run killed after writing, before marking the batch written).
        keys = hash_keys([h for _, h, _ in rows])
        ids = pa.array([r for r, _, _ in rows], self._id_type) if self._id_type is not None else [r for r, _, _ in rows]
        done = ctx.index.pairs_done(keys, ids) if len(ctx.index.results) else np.zeros(len(rows), bool)
        tags = id_tags(ids)
        ok = [i for i, o in enumerate(outcomes) if o.ok and not done[i]]
        bad = [i for i, o in enumerate(outcomes) if not o.ok and not done[i]]
        stats.skipped_done += int(done.sum())
        if ok:
            results = [outcomes[i].result for i in ok]
            table = pa.table(
                {
                    ctx.id_col: pa.array([rows[i][0] for i in ok], id_type),
                    **job.result_arrays(results),
                    "content_hash": pa.array([rows[i][1] for i in ok], pa.string()),
                    "model": pa.array([job.model] * len(ok), pa.string()),
                }
            )
            if ctx.served_column and not getattr(job, "stop_on_reroute", False):
                table = table.append_column(
                    pa.field("served_model", pa.string()),
                    pa.array([outcomes[i].served_model for i in ok], pa.string()),
                )
            part = ctx.store.write_part(table, errors=False, run_id=ctx.run_id, id_col=ctx.id_col)
            stats.parts_written.append(part)
            ctx.index.results.add(keys[ok], ctx.index.part_ordinal(part))
            for i in ok:
                if firsts[i]:
                    stats.succeeded += 1
                else:
                    stats.deduplicated += 1
        if bad:
            table = pa.table(
                {
                    ctx.id_col: pa.array([rows[i][0] for i in bad], id_type),
                    "content_hash": pa.array([rows[i][1] for i in bad], pa.string()),
                    "error_type": pa.array([outcomes[i].error_type for i in bad], pa.string()),
                    "error_message": pa.array([outcomes[i].error_message or "" for i in bad], pa.string()),
                    "attempts": pa.array([outcomes[i].attempts for i in bad], pa.int32()),
                    "raw_reply": pa.array([outcomes[i].raw_reply for i in bad], pa.string()),
                    "retry": pa.array(
                        [RETRY_AUTO if outcomes[i].retry_auto else RETRY_ON_REQUEST for i in bad], pa.string()
                    ),
                    "input_row": pa.array([rows[i][2] for i in bad], pa.int64()),
                    "model": pa.array([job.model] * len(bad), pa.string()),
                    "run_id": pa.array([ctx.run_id] * len(bad), pa.string()),
                }
            )
            path = ctx.store.write_part(table, errors=True, run_id=ctx.run_id, id_col=ctx.id_col)
            stats.error_parts_written.append(path)
            # Not sent again in this run (a plain rerun resends the transient ones, as after a live run).
            ctx.index.errors.add(keys[bad], tags[bad])
            self.failed_now.add(keys[bad], tags[bad])
            stats.failed += len(bad)
            stats.failed_retry_auto += sum(1 for i in bad if outcomes[i].retry_auto)
        ctx.on_progress(len(ok) + len(bad))

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
        """Send live what no batch answered: a small remainder, failed and unfinished lines, invalid rows.

        A second pass over the input with the live engine and its own counts; only what it sends or
        writes is added to the run's counts (rows it finds done were counted already)."""
        ctx = self.ctx
        if ctx.budget is not None:
            ctx.budget.price_factor = 1.0
        live = RunContext(
            job=ctx.job,
            conn=ctx.conn,
            limiter=ctx.limiter,
            store=ctx.store,
            index=ctx.index,
            run_id=ctx.run_id,
            id_col=ctx.id_col,
            retry_errors=ctx.retry_errors,
            retry=ctx.retry,
            budget=ctx.budget,
            outage=ctx.outage,
        )
        try:
            await self.drive_live(
                live, self.source, self.options, self.total_rows, self.chunk_runner, claims=self.claims
            )
        finally:
            s, t = live.stats, ctx.stats
            new_errors = sum(pq.read_metadata(p, filesystem=ctx.store.fs).num_rows for p in s.error_parts_written)
            t.succeeded += s.succeeded
            t.deduplicated += s.deduplicated
            t.failed += new_errors
            t.failed_retry_auto += s.failed_retry_auto
            for name in ("requests", "items_sent", "retries", "rate_limited", "transient_errors", "prompt_tokens",
                         "completion_tokens", "total_tokens", "estimated_tokens", "images"):  # fmt: skip
                setattr(t, name, getattr(t, name) + getattr(s, name))
            t.parts_written += s.parts_written
            t.error_parts_written += s.error_parts_written
            self.totals.live_rows = s.succeeded + s.deduplicated + new_errors
            ctx.on_progress(self.totals.live_rows)
            if live.stopped is not None:
                ctx.request_stop(live.stopped)

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


class _PollBar:
    """While batches run: their states and request counts, on stderr."""

    def __init__(self, *, enabled: bool) -> None:
        self._progress = None
        self._tasks: dict[str, Any] = {}
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("requests · {task.fields[state]} · failed {task.fields[failed]}"),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
            )
            self._progress.start()

    def show(self, record: dict[str, Any]) -> None:
        if self._progress is None:
            return
        counts = record.get("request_counts") or {}
        done = (counts.get("completed") or 0) + (counts.get("failed") or 0)
        name = record["batch_id"]
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(
                f"batch {name}", total=record.get("requests") or counts.get("total"), state="", failed=0
            )
        self._progress.update(
            self._tasks[name], completed=done, state=record.get("status"), failed=counts.get("failed") or 0
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def files_needed(requests: int, inputs: int, policy: BatchPolicy, embeddings: bool) -> int:
    """How many request files (batches) ``requests`` lines of ``inputs`` items make under the limits."""
    if requests == 0:
        return 0
    by_lines = math.ceil(requests / policy.max_lines)
    by_inputs = math.ceil(inputs / policy.max_inputs) if embeddings else 1
    return max(by_lines, by_inputs)


async def manage_batches(output: str, settings: Any | None, *, refresh: bool, cancel: bool) -> list[dict[str, Any]]:
    """`gembatch batches OUTPUT`: the recorded batches, their states asked again (``refresh``) or cancelled.

    ``settings`` (a ProviderSettings) says where they were sent; None: as each record says (its provider
    and base URL, the key from that provider's usual variable)."""
    from tasks.engine.store.output import OutputStore
    from tasks.provider.client import ProviderSettings, open_connection

    store = OutputStore(output)
    records = read_records(store)
    if not records:
        raise ConfigError(f"no batches are recorded in {output}/{BATCHES_DIR}/ (a --mode batch run records them)")
    if not (refresh or cancel):
        return records
    book = Book(store)
    connections: dict[tuple[str, str], tuple[Connection, BatchApi]] = {}
    try:
        for record in records:
            if record["state"] != SUBMITTED:
                continue
            where = settings or ProviderSettings(
                provider=record["provider"],
                base_url=record["base_url"] if record["provider"] != "gemini" else None,
            )
            key = (where.provider, where.base_url or "")
            if key not in connections:
                conn = open_connection(where)
                connections[key] = (conn, BatchApi(conn.client, conn.base_url, conn.api_key))
            conn, api = connections[key]
            try:
                info = await (api.cancel(record["batch_id"]) if cancel else api.retrieve(record["batch_id"]))
            except Exception as exc:  # noqa: BLE001 - shown per batch; the others are still asked
                record["error"] = conn.redact(classify_failure(exc).message)
                continue
            record.update(
                status=info.status,
                request_counts={"total": info.total, "completed": info.completed, "failed": info.failed},
            )
            book.save(record)
    finally:
        for conn, _ in connections.values():
            await conn.close()
    return records
