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
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tasks.engine.plan.claims import ClaimBook
from tasks.engine.plan.claims import log as claims_log
from tasks.engine.send.batch.fallback import send_rest_live
from tasks.engine.send.batch.left import waiting_for
from tasks.engine.send.batch.poll import Poller
from tasks.engine.send.batch.reattach import adopt_records
from tasks.engine.send.batch.records import BATCHES_DIR, Book, remove_scratch
from tasks.engine.send.batch.results import ResultWriter
from tasks.engine.send.batch.routes import BatchRoutes
from tasks.engine.send.batch.shared import BatchShared
from tasks.engine.send.batch.submit import SubmitPass
from tasks.engine.send.batch.totals import BatchTotals
from tasks.engine.send.batch.watch import RecordWatch
from tasks.engine.send.context import RunContext
from tasks.errors import RunStopped
from tasks.provider.batches import BatchApi
from tasks.provider.client import Connection

__all__ = ["BatchRun"]

WAIT_NOTE_S = 30.0  # while waiting for rows other runs hold, say so this often


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
        auto = options.batch.mode == "auto"
        book = Book(ctx.output.store)
        self.shared = BatchShared(
            ctx=ctx,
            options=options,
            conn=conn,
            api=BatchApi(conn.client, conn.base_url, conn.api_key, timeout_s=max(300.0, options.provider.timeout_s)),
            book=book,
            claims=claims,
            routes=BatchRoutes(ctx, conn, auto=auto),
            results=ResultWriter(ctx, conn, auto=auto, flush_rows=options.chunk_size),
            totals=BatchTotals(),
            watch=RecordWatch(ctx, book, claims),
            left={},
        )
        self.source = source
        self.total_rows = total_rows
        self.drive_live = drive_live
        self.chunk_runner = chunk_runner
        self.submit = SubmitPass(self.shared, source, total_rows)
        self.poller = Poller(self.shared)

    @property
    def totals(self) -> BatchTotals:
        return self.shared.totals

    # -- the whole run ------------------------------------------------------------------------------

    async def drive(self) -> None:
        shared = self.shared
        ctx = shared.ctx
        try:
            await adopt_records(shared)
            first = True
            while not ctx.stop.event.is_set():
                ended_before = shared.totals.lines_ended()
                submitted = await self.submit.run(first)
                first = False
                pending = shared.watch.my_submitted()
                if not pending and not submitted:
                    break
                await self.poller.until_written(pending)
                if shared.auto or ctx.stop.event.is_set():
                    break
                if shared.totals.lines_ended() == ended_before:
                    problems = "; ".join(sorted({r.get("errors") or r.get("status", "") for r in pending}))
                    ctx.request_stop(
                        RunStopped(
                            "failed: batch",
                            f"the provider answered none of the lines of {len(pending)} batch(es) ({problems}); "
                            f"see {shared.options.output}/{BATCHES_DIR}/ and rerun, or use --mode live",
                        )
                    )
                    break
            if shared.left and not ctx.stop.event.is_set():
                await self._finish_left()
            if (shared.auto or self.submit.live_only) and not ctx.stop.event.is_set():
                await self._live_remainder()
        finally:
            await shared.routes.close()
            await shared.results.close()
            remove_scratch(shared.book)

    # -- rows left to other runs ------------------------------------------------------------------------

    async def _finish_left(self) -> None:
        """Wait for the rows left to other runs; then look at each chunk again: rows written meanwhile are
        counted as skipped, rows still to send (their holder is gone, or its batch expired) are claimed
        and sent here. A batch record whose run is gone is re-attached to and polled by this run."""
        shared = self.shared
        ctx, claims, watch, left = shared.ctx, shared.claims, shared.watch, shared.left
        waited_from = time.monotonic()
        next_note = 0.0
        try:
            while left and not ctx.stop.event.is_set():
                await adopt_records(shared)
                pending = watch.my_submitted()
                if pending:
                    await self.poller.until_written(pending)
                    continue
                await watch.look_again()
                holders = await asyncio.to_thread(claims.holders_of, [one.key for one in left.values()])
                ready = set()
                for number, one in left.items():
                    one.holder = holders[one.key]
                    in_theirs = len(watch.others_pending) and watch.others_pending.has_keys(one.keys).any()
                    if one.holder is None and not in_theirs:
                        ready.add(number)
                if ready:
                    await self.submit.run(False, only=ready)
                    continue
                if time.monotonic() >= next_note:
                    next_note = time.monotonic() + WAIT_NOTE_S
                    claims_log.warning("waiting for %s", waiting_for(left, claims))
                try:
                    await asyncio.wait_for(ctx.stop.event.wait(), timeout=claims.policy.poll_s)
                except TimeoutError:
                    pass
            pending = watch.my_submitted()
            if pending and not ctx.stop.event.is_set():
                await self.poller.until_written(pending)
        finally:
            claims.waited_s += time.monotonic() - waited_from

    # -- 4. auto: the rest live ------------------------------------------------------------------------

    async def _live_remainder(self) -> None:
        shared = self.shared
        await send_rest_live(
            shared.ctx,
            shared.totals,
            self.source,
            shared.options,
            self.total_rows,
            self.drive_live,
            self.chunk_runner,
            shared.claims,
        )

    # -- metadata ---------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        shared = self.shared
        t = shared.totals
        return {
            "mode": shared.policy.mode,
            "flavor": shared.api.flavor,
            "batches_created": t.created,
            "batches_reattached": t.reattached,
            "batches_lost": t.lost,
            "batches_written": self.poller.written,
            "requests_submitted": t.lines_submitted,
            "requests_answered": t.lines_answered,
            "requests_failed": t.lines_failed,
            "requests_unfinished": t.lines_unfinished,
            "rows_live": t.live_rows,
            "rows_live_only": self.submit.live_only,
            "unavailable": shared.unavailable,
            "tokens": t.tokens.as_dict(),
            "records": f"{shared.options.output}/{BATCHES_DIR}/",
        }
