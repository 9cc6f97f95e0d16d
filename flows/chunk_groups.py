"""At most about a hundred chunk task runs per flow run, however large the input.

A tracked run used to make one Prefect task run per chunk: 5,000 for ten million rows at the default
``--chunk-size 2000``, which the run page's timeline draws as one unreadable band (and past 10,000 the
server refuses to draw the graph at all). :class:`ChunkGroups` is the run's chunk runner instead:

- a run of at most ``GEMBATCH_CHUNK_TASK_RUNS`` chunks (default 100) keeps one task run per chunk
  (``chunk-0``, ``chunk-1``, …), as before;
- a larger run groups consecutive chunks: chunks 0-49 are the task run ``chunks 0-49``, which starts
  with the first of them and ends when the last of them is written; it fails if one of them failed.

Inside a group, the chunks run exactly as in an untracked run (plain coroutines on the driver's tasks):
cancellation, stops and resume are the engine's, untouched; the group's task run only frames them.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

from tasks.engine.send.chunk import ChunkRunner, process_chunk
from tasks.engine.send.context import ChunkReport, RunContext

__all__ = ["DEFAULT_TASK_RUNS", "TASK_RUNS_ENV", "ChunkGroup", "ChunkGroups", "group_size", "tracked_chunk_groups"]

DEFAULT_TASK_RUNS = 100
TASK_RUNS_ENV = "GEMBATCH_CHUNK_TASK_RUNS"


def _task_runs_wanted() -> int:
    raw = os.environ.get(TASK_RUNS_ENV, "").strip()
    if not raw:
        return DEFAULT_TASK_RUNS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{TASK_RUNS_ENV} must be a whole number, got {raw!r}") from None
    return max(1, value)


def group_size(total_rows: int, chunk_size: int, task_runs: int) -> int:
    """Chunks per task run so that a run of ``total_rows`` makes at most ``task_runs`` of them (1: one per chunk)."""
    chunks = math.ceil(max(total_rows, 0) / max(chunk_size, 1))
    return max(1, math.ceil(chunks / max(task_runs, 1)))


class ChunkGroup:
    """Consecutive chunks shown as one task run: open while chunks of it run, done once closed and idle."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.running = 0
        self.closed = False
        self.done = asyncio.Event()
        self.reports: list[ChunkReport] = []
        self.errors: list[BaseException] = []
        self.task: asyncio.Task | None = None

    def close(self) -> None:
        self.closed = True
        self.settle()

    def settle(self) -> None:
        if self.closed and self.running == 0:
            self.done.set()

    def summary(self) -> dict[str, int]:
        return {
            "chunks": len(self.reports),
            "rows": sum(r.rows for r in self.reports),
            "written": sum(r.written for r in self.reports),
            "errors": sum(r.errors for r in self.reports),
        }

    def __repr__(self) -> str:
        return f"ChunkGroup({self.first}-{self.last})"


async def wait_for_group(first: int, last: int, group: ChunkGroup) -> dict[str, int]:
    """The body of a group's task run: waits for its chunks; fails if one of them failed."""
    await group.done.wait()
    if group.errors:
        error = group.errors[0]
        raise RuntimeError(
            f"{len(group.errors)} of the chunks {first}-{last} did not finish: {type(error).__name__}: {error}"
        ) from (error if isinstance(error, Exception) else None)
    return group.summary()


class ChunkGroups:
    """The chunk runner of a tracked run (see the module's docstring).

    ``per_chunk``: the runner of a small run (the ``chunk`` Prefect task); ``group_task``: the task of a
    group, called as ``group_task(first, last, group)``; ``chunk_size``: the run's rows per chunk.
    """

    def __init__(
        self,
        per_chunk: ChunkRunner,
        group_task: Callable[[int, int, ChunkGroup], Awaitable[Any]],
        *,
        chunk_size: int,
        task_runs: int | None = None,
        run_chunk: ChunkRunner = process_chunk,
    ) -> None:
        self.per_chunk, self.group_task, self.chunk_size = per_chunk, group_task, chunk_size
        self.task_runs = task_runs if task_runs is not None else _task_runs_wanted()
        self.run_chunk = run_chunk
        self.size: int | None = None
        self.open: dict[int, ChunkGroup] = {}
        self.made: list[ChunkGroup] = []

    async def __call__(self, ctx: RunContext, chunk: Any, number: int, first_row: int) -> ChunkReport:
        if self.size is None:
            self.size = group_size(ctx.stats.input_rows, self.chunk_size, self.task_runs)
        if self.size == 1:
            return await self.per_chunk(ctx, chunk, number, first_row)
        group = self._group_of(number)
        group.running += 1
        try:
            report = await self.run_chunk(ctx, chunk, number, first_row)
        except BaseException as exc:
            group.errors.append(exc)
            raise
        finally:
            group.running -= 1
            group.settle()
        group.reports.append(report)
        return report

    def _group_of(self, number: int) -> ChunkGroup:
        index = number // self.size
        # Chunks are offered in order: a chunk of a later group closes the earlier ones. (A chunk left to
        # another run and taken up at the end opens its group again, as a task run of its own.)
        for earlier in [i for i in self.open if i < index]:
            self.open.pop(earlier).close()
        group = self.open.get(index)
        if group is None:
            first = index * self.size
            group = self.open[index] = ChunkGroup(first, first + self.size - 1)
            group.task = asyncio.create_task(self.group_task(group.first, group.last, group))
            self.made.append(group)
        return group

    async def close(self) -> None:
        """Close every group and wait for their task runs (call once the run's chunks are done)."""
        for group in self.open.values():
            group.close()
        self.open.clear()
        tasks = [g.task for g in self.made if g.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


def tracked_chunk_groups(per_chunk: ChunkRunner, *, chunk_size: int) -> ChunkGroups:
    """:class:`ChunkGroups` whose groups are Prefect task runs named ``chunks FIRST-LAST``."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    group_task = task(
        wait_for_group,
        name="chunks",
        task_run_name="chunks {first}-{last}",
        cache_policy=NO_CACHE,
        persist_result=False,
    )
    return ChunkGroups(per_chunk, group_task, chunk_size=chunk_size)
