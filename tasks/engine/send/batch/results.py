"""Writing a batch's answers: each result line parsed by the job's own ``send``, written as live rows are."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.engine.job import BadReply, Item, Outcome, RowFailure
from tasks.engine.plan.key_table import KeyTable
from tasks.engine.plan.keys import hash_keys, id_tags
from tasks.engine.send.batch.records import LineRows
from tasks.engine.send.batch.routes import offline_connection
from tasks.engine.send.batch.totals import LineTally
from tasks.engine.send.context import RunContext, rerouted_stop
from tasks.engine.store.error_rows import RETRY_AUTO, RETRY_ON_REQUEST
from tasks.engine.store.part_files import write_in_thread
from tasks.provider.batches import ReplayTransport, normalise_body
from tasks.provider.catalog import same_model
from tasks.provider.client import Connection
from tasks.provider.failures import classify_failure

# Result rows written together: one part file per this many rows (at least a chunk's worth).
WRITE_RESULT_ROWS = 2000


@dataclass
class _Pending:
    """Rows parsed and not yet written: (id, content_hash, input_row), their outcomes, first of their content."""

    rows: list[tuple[Any, str, int]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    firsts: list[bool] = field(default_factory=list)


class ResultWriter:
    """Rows of a batch run into the output: parsed result lines, invalid rows, contents copied from the output.

    ``failed_now``: the (content, id) pairs written to ``_errors/`` by this run (not sent again in it);
    ``fatal``: a failure every line would meet (a refused schema, a key without access), set by a line."""

    def __init__(self, ctx: RunContext, conn: Connection, *, auto: bool, flush_rows: int) -> None:
        self.ctx = ctx
        self.conn = conn
        self.auto = auto
        self.flush_rows = max(WRITE_RESULT_ROWS, flush_rows)
        self.id_type: pa.DataType | None = None
        self.failed_now = KeyTable()
        self.fatal: Any = None
        self._replay = ReplayTransport()
        self._replay_conn = offline_connection(conn, self._replay)

    async def close(self) -> None:
        await self._replay_conn.client.close()

    async def write_lines(self, downloads: list[Path], lines: LineRows) -> LineTally:
        """Parse and write every answered line of the downloaded result files; lines that never ran are left."""
        tally = LineTally()
        pending = _Pending()
        for path in downloads:
            with path.open("rb") as f:
                for raw in f:
                    if raw.strip():
                        await self._take_line(json.loads(raw), lines, tally, pending)
                    if len(pending.rows) >= self.flush_rows:
                        await write_in_thread(self.write_rows, pending.rows, pending.outcomes, pending.firsts)
                        pending = _Pending()
        if pending.rows:
            await write_in_thread(self.write_rows, pending.rows, pending.outcomes, pending.firsts)
        return tally

    async def _take_line(self, line: dict[str, Any], lines: LineRows, tally: LineTally, pending: _Pending) -> None:
        custom_id = line.get("custom_id")
        members = lines.get(custom_id)
        if members is None or custom_id in tally.seen:
            return
        response = line.get("response")
        if not isinstance(response, dict) or response.get("status_code") is None:
            return  # never ran (expired, cancelled): sent again
        tally.seen.add(custom_id)
        items, rows = members
        outcomes, reply = await self.parse_line(custom_id, response, items)
        if reply is not None:
            tally.tokens.add(*reply)
        if outcomes[0] is None:
            tally.seen.discard(custom_id)
            return
        if all(not o.ok for o in outcomes):
            tally.failed += 1
        else:
            tally.answered += 1
        if self.auto and any(not o.ok for o in outcomes):
            # auto: what failed in the batch is sent live after; nothing of it is written now.
            outcomes = [o if o.ok else None for o in outcomes]
        firsts: set[int] = set()
        for item_index, row_id, input_row in rows:
            outcome = outcomes[item_index]
            if outcome is None:
                continue
            pending.rows.append((row_id, items[item_index].content_hash, input_row))
            pending.outcomes.append(outcome)
            pending.firsts.append(item_index not in firsts)
            firsts.add(item_index)

    async def parse_line(
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
                self.fatal = failure
                return [None] * len(items), None
            message = redact(failure.message) + " (batch line)"
            return [
                Outcome(error_type=failure.kind, error_message=message, attempts=1, retry_auto=failure.retryable)
            ] * len(items), None
        job, served = self.ctx.job, reply.served_model
        wrong = getattr(job, "stop_for", None)
        stop = wrong(reply, self.ctx.output.store.url) if wrong is not None else None
        if stop is not None:
            # As live: nothing of a reply the job can't take as asked is written; the rows stay to send.
            self.ctx.request_stop(stop)
            return [None] * len(items), None
        if served is not None and not same_model(job.model, served):
            stats = self.ctx.stats
            stats.rerouted[served] = stats.rerouted.get(served, 0) + len(items)
            if getattr(job, "stop_on_reroute", False):
                # As live: no vector of another model is written; the rows stay to send.
                self.ctx.request_stop(rerouted_stop(job, served, self.ctx.output.store.url))
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

    async def copy_stored(
        self, positions: np.ndarray, ids: list[Any], hashes: list[str], keys: np.ndarray, first_row: int
    ) -> np.ndarray:
        """Rows whose content the output already holds under another id: copied, as a live run does.
        Returns the positions whose content was not there after all (the index matches a prefix)."""
        ctx = self.ctx
        wanted = {hashes[p] for p in positions.tolist()}
        files = ctx.output.index.parts_holding(keys[positions])
        table = await asyncio.to_thread(ctx.output.store.read_results_for, wanted, ctx.output.id_col, files=files)
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
            await write_in_thread(self.write_rows, rows, outcomes, [False] * len(rows))
        return np.array(missing, np.intp)

    def write_rows(self, rows: list[tuple[Any, str, int]], outcomes: list[Outcome], firsts: list[bool]) -> None:
        """Write rows (id, content_hash, input_row) with their outcomes: one results part, one errors part,
        the same columns as a live chunk's (send/write_parts.py, write_chunk); the done-key index learns them."""
        ctx = self.ctx
        # A row already in the output (a run killed after writing, before marking the batch written).
        keys = hash_keys([h for _, h, _ in rows])
        ids = pa.array([r for r, _, _ in rows], self.id_type) if self.id_type is not None else [r for r, _, _ in rows]
        done = ctx.output.index.pairs_done(keys, ids) if len(ctx.output.index.results) else np.zeros(len(rows), bool)
        ok = [i for i, o in enumerate(outcomes) if o.ok and not done[i]]
        bad = [i for i, o in enumerate(outcomes) if not o.ok and not done[i]]
        ctx.stats.skipped_done += int(done.sum())
        if ok:
            self._write_results(ok, rows, outcomes, firsts, keys)
        if bad:
            self._write_errors(bad, rows, outcomes, keys, id_tags(ids))
        ctx.progress.advance(len(ok) + len(bad))

    def _write_results(
        self, ok: list[int], rows: list[tuple[Any, str, int]], outcomes: list[Outcome], firsts: list[bool], keys: Any
    ) -> None:
        ctx, job, stats = self.ctx, self.ctx.job, self.ctx.stats
        results = [outcomes[i].result for i in ok]
        table = pa.table(
            {
                ctx.output.id_col: pa.array([rows[i][0] for i in ok], self.id_type or pa.int64()),
                **job.result_arrays(results),
                "content_hash": pa.array([rows[i][1] for i in ok], pa.string()),
                "model": pa.array([job.model] * len(ok), pa.string()),
            }
        )
        if ctx.output.served_column and not getattr(job, "stop_on_reroute", False):
            table = table.append_column(
                pa.field("served_model", pa.string()),
                pa.array([outcomes[i].served_model for i in ok], pa.string()),
            )
        part = ctx.output.store.write_part(table, errors=False, run_id=ctx.run_id, id_col=ctx.output.id_col)
        stats.parts_written.append(part)
        ctx.output.index.results.add(keys[ok], ctx.output.index.part_ordinal(part))
        for i in ok:
            if firsts[i]:
                stats.succeeded += 1
            else:
                stats.deduplicated += 1

    def _write_errors(
        self, bad: list[int], rows: list[tuple[Any, str, int]], outcomes: list[Outcome], keys: Any, tags: Any
    ) -> None:
        ctx, job, stats = self.ctx, self.ctx.job, self.ctx.stats
        table = pa.table(
            {
                ctx.output.id_col: pa.array([rows[i][0] for i in bad], self.id_type or pa.int64()),
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
        path = ctx.output.store.write_part(table, errors=True, run_id=ctx.run_id, id_col=ctx.output.id_col)
        stats.error_parts_written.append(path)
        # Not sent again in this run (a plain rerun resends the transient ones, as after a live run).
        ctx.output.index.errors.add(keys[bad], tags[bad])
        self.failed_now.add(keys[bad], tags[bad])
        stats.failed += len(bad)
        stats.failed_retry_auto += sum(1 for i in bad if outcomes[i].retry_auto)
