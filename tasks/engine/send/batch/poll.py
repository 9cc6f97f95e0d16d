"""Polling a run's batches until they end; a batch that ends is downloaded and written like live results."""

from __future__ import annotations

import asyncio
from typing import Any

from tasks.engine.send.batch.manage import PollBar
from tasks.engine.send.batch.records import BATCHES_DIR, LOST, WRITTEN, LineRows, now, read_rows
from tasks.engine.send.batch.shared import BatchShared
from tasks.engine.send.context import RunContext
from tasks.errors import RunStopped
from tasks.provider.batches import BatchInfo
from tasks.provider.failures import classify_failure


class Poller:
    """Polls the batches this run holds; ``written``: the records it wrote, by name."""

    def __init__(self, shared: BatchShared) -> None:
        self.shared = shared
        self.written: list[str] = []

    async def until_written(self, pending: list[dict[str, Any]]) -> None:
        shared = self.shared
        ctx = shared.ctx
        bar = PollBar(enabled=shared.options.progress)
        try:
            # After a budget stop the batches already submitted are paid for: they are still awaited.
            while pending and (not ctx.stop.event.is_set() or _budget_stop(ctx)):
                still = []
                for record in pending:
                    try:
                        info = await shared.api.retrieve(record["batch_id"])
                    except Exception as exc:  # noqa: BLE001 - a failed poll is tried again next time
                        if not await self._poll_failed(record, exc):
                            return
                        if record["state"] != LOST:
                            still.append(record)
                        continue
                    counts = {"total": info.total, "completed": info.completed, "failed": info.failed}
                    changed = (info.status, counts) != (record.get("status"), record.get("request_counts"))
                    record.update(status=info.status, request_counts=counts, errors=info.errors)
                    if info.final:
                        await self._write_batch(record, info)
                    else:
                        if changed:
                            shared.book.save(record)
                        still.append(record)
                    bar.show(record)
                pending = still
                if pending and ctx.stop.event.is_set():
                    await asyncio.sleep(shared.policy.poll_s)
                elif pending:
                    try:
                        await asyncio.wait_for(ctx.stop.event.wait(), timeout=shared.policy.poll_s)
                    except TimeoutError:
                        pass
        finally:
            bar.close()

    async def _poll_failed(self, record: dict[str, Any], exc: Exception) -> bool:
        """A poll that failed: the batch is lost (404), the run stops (False), or it is polled again."""
        shared = self.shared
        ctx, conn = shared.ctx, shared.conn
        failure = classify_failure(exc)
        if failure.kind == "not_found":
            # The provider no longer knows it (deleted, past its retention, or a local emulator that is
            # gone): nothing can be fetched, so its rows are sent again.
            record.update(status="not found", errors=conn.redact(failure.message))
            await shared.watch.close(record, LOST)
            shared.totals.lost += 1
            return True
        if failure.fatal:
            ctx.request_stop(failure.stop())
            return False
        if not failure.retryable:
            # Asking again would get the same answer: stop; the record keeps the batch.
            ctx.request_stop(
                RunStopped(
                    "failed: batch unavailable",
                    f"GET batches/{record['batch_id']} at {conn.host} answered "
                    f"{conn.redact(failure.message).rstrip('.')}. The batch stays recorded in "
                    f"{shared.options.output}/{BATCHES_DIR}/ and the next run polls it again; "
                    "`gembatch batches OUTPUT --cancel` gives it up",
                )
            )
            return False
        return True

    async def _write_batch(self, record: dict[str, Any], info: BatchInfo) -> None:
        """Download a finished batch's results and write them like live ones; then mark it written."""
        shared = self.shared
        ctx, book = shared.ctx, shared.book
        name = record["name"]
        downloads = []
        for file_id, suffix in ((info.output_file_id, ".output.jsonl"), (info.error_file_id, ".errors.jsonl")):
            if file_id:
                dest = book.scratch / f"{name}{suffix}"
                await shared.api.download(file_id, dest)
                downloads.append(dest)
        rows_table = await asyncio.to_thread(read_rows, book, name)
        lines = LineRows(rows_table)
        tally = await shared.results.write_lines(downloads, lines)
        unfinished = tally.add_into(shared.totals, ctx.stats, lines)
        tokens = tally.tokens
        if ctx.budget is not None:
            ctx.budget.release(record.get("reserved_usd") or 0.0)
            ctx.budget.charge(tokens.prompt_tokens, tokens.total_tokens)
        record.update(
            status=info.status,
            written_at=now(),
            written_by_run=ctx.run_id,
            lines_answered=tally.answered,
            lines_failed=tally.failed,
            lines_unfinished=unfinished,
            tokens=tokens.as_dict(),
        )
        await shared.watch.close(record, WRITTEN)
        self.written.append(name)
        if shared.results.fatal is not None:
            ctx.request_stop(shared.results.fatal.stop())


def _budget_stop(ctx: RunContext) -> bool:
    return ctx.stop.reason is not None and ctx.stop.reason.status == "stopped: budget"
