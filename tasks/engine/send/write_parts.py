"""A live chunk's rows written: one results part and at most one errors part, and the counts they settle.

Rows count as succeeded or failed once their part file is written: a write that an interrupt cuts short
leaves them unaccounted, so the run counts them as not attempted (and a rerun sends them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tasks.engine.job import Outcome
from tasks.engine.plan.rows import DONE, INVALID, OWN, PREV_ERROR
from tasks.engine.send.context import ChunkReport, RunContext
from tasks.engine.store.error_rows import RETRY_AUTO, RETRY_ON_REQUEST

__all__ = ["write_chunk"]


@dataclass
class _Sorted:
    """A chunk's rows by what became of them, as positions in the chunk."""

    ok_rows: list[int] = field(default_factory=list)
    ok_results: list[Any] = field(default_factory=list)
    # (position, error type, message, attempts, raw reply)
    err_rows: list[tuple[int, str, str, int, str | None]] = field(default_factory=list)
    auto: set[int] = field(default_factory=set)  # positions of error rows the next plain run sends again


def write_chunk(
    ctx: RunContext,
    index: int,
    first_row: int,
    ids: list[Any],
    id_type: pa.DataType,
    hashes: list[str],
    source: list[int],
    invalid: dict[int, str],
    outcomes: dict[str, Outcome | None],
) -> ChunkReport:
    """Write the chunk's results and errors (on a worker thread) and count its rows."""
    rows = _sort_rows(ctx, hashes, source, invalid, outcomes)
    written = 0
    part = None
    if rows.ok_rows:
        part, written = _write_results(ctx, ids, id_type, hashes, source, rows, outcomes)
    if rows.err_rows:
        _write_errors(ctx, first_row, ids, id_type, hashes, rows)
    return ChunkReport(index=index, rows=len(ids), written=written, errors=len(rows.err_rows), part=part)


def _sort_rows(
    ctx: RunContext, hashes: list[str], source: list[int], invalid: dict[int, str], outcomes: dict[str, Outcome | None]
) -> _Sorted:
    stats = ctx.stats
    rows = _Sorted()
    for pos, src in enumerate(source):
        if src == DONE:
            stats.skipped_done += 1
        elif src == PREV_ERROR:
            stats.failed += 1
        elif src == INVALID:
            rows.err_rows.append((pos, "invalid_input", invalid[pos], 0, None))
        else:
            outcome = outcomes.get(hashes[pos])
            if outcome is None:
                stats.not_attempted += 1
            elif not outcome.ok:
                if outcome.retry_auto:
                    rows.auto.add(pos)
                rows.err_rows.append(
                    (
                        pos,
                        outcome.error_type or "error",
                        outcome.error_message or "",
                        outcome.attempts,
                        outcome.raw_reply,
                    )
                )
            else:
                rows.ok_rows.append(pos)
                rows.ok_results.append(outcome.result)
    return rows


def _write_results(
    ctx: RunContext,
    ids: list[Any],
    id_type: pa.DataType,
    hashes: list[str],
    source: list[int],
    rows: _Sorted,
    outcomes: dict[str, Outcome | None],
) -> tuple[str, int]:
    """The results part and how many results it holds."""
    job, stats = ctx.job, ctx.stats
    ok_rows, ok_results = rows.ok_rows, rows.ok_results
    own_ok = sum(1 for pos in ok_rows if source[pos] == OWN)
    rows_per_result = getattr(job, "rows_per_result", None)
    if rows_per_result is not None:
        ok_rows = [p for p, r in zip(ok_rows, ok_results) for _ in range(rows_per_result(r))]
    table = pa.table(
        {
            ctx.output.id_col: pa.array([ids[p] for p in ok_rows], id_type),
            **job.result_arrays(ok_results),
            "content_hash": pa.array([hashes[p] for p in ok_rows], pa.string()),
            "model": pa.array([job.model] * len(ok_rows), pa.string()),
        }
    )
    if ctx.output.served_column and not getattr(job, "stop_on_reroute", False):
        served = {p: outcomes[hashes[p]].served_model for p in set(ok_rows) if outcomes.get(hashes[p])}
        table = table.append_column(
            pa.field("served_model", pa.string()), pa.array([served.get(p) for p in ok_rows], pa.string())
        )
    part = ctx.output.store.write_part(table, errors=False, run_id=ctx.run_id, id_col=ctx.output.id_col)
    stats.parts_written.append(part)
    written = len(ok_results)
    stats.succeeded += own_ok
    stats.deduplicated += written - own_ok
    return part, written


def _write_errors(
    ctx: RunContext, first_row: int, ids: list[Any], id_type: pa.DataType, hashes: list[str], rows: _Sorted
) -> None:
    job, stats = ctx.job, ctx.stats
    err_rows, auto = rows.err_rows, rows.auto
    table = pa.table(
        {
            ctx.output.id_col: pa.array([ids[p] for p, *_ in err_rows], id_type),
            "content_hash": pa.array([hashes[p] for p, *_ in err_rows], pa.string()),
            "error_type": pa.array([e[1] for e in err_rows], pa.string()),
            "error_message": pa.array([e[2] for e in err_rows], pa.string()),
            "attempts": pa.array([e[3] for e in err_rows], pa.int32()),
            "raw_reply": pa.array([e[4] for e in err_rows], pa.string()),
            # "auto": transient errors used up the attempts, the next plain run sends the row
            # again; "on_request": it failed for itself, resent only with --retry-errors.
            "retry": pa.array([RETRY_AUTO if p in auto else RETRY_ON_REQUEST for p, *_ in err_rows], pa.string()),
            "input_row": pa.array([first_row + p for p, *_ in err_rows], pa.int64()),
            "model": pa.array([job.model] * len(err_rows), pa.string()),
            "run_id": pa.array([ctx.run_id] * len(err_rows), pa.string()),
        }
    )
    path = ctx.output.store.write_part(table, errors=True, run_id=ctx.run_id, id_col=ctx.output.id_col)
    stats.error_parts_written.append(path)
    stats.failed += len(err_rows)
    stats.failed_retry_auto += len(auto)
