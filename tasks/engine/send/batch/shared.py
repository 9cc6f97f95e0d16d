"""What the steps of one batch run share: the run, the batch records, the routes, the result writer, the counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.engine.plan.claims import ClaimBook
from tasks.engine.send.batch.left import Left
from tasks.engine.send.batch.policy import BatchPolicy
from tasks.engine.send.batch.records import Book
from tasks.engine.send.batch.results import ResultWriter
from tasks.engine.send.batch.routes import BatchRoutes
from tasks.engine.send.batch.totals import BatchTotals
from tasks.engine.send.batch.watch import RecordWatch
from tasks.engine.send.context import RunContext
from tasks.provider.batches import BatchApi
from tasks.provider.client import Connection


@dataclass(kw_only=True)
class BatchShared:
    """One batch run's collaborators, handed to each of its steps (submit, upload, poll, re-attach).

    ``left``: chunk number -> rows this run left to other runs (see left.py)."""

    ctx: RunContext
    options: Any
    conn: Connection
    api: BatchApi
    book: Book
    claims: ClaimBook
    routes: BatchRoutes
    results: ResultWriter
    totals: BatchTotals
    watch: RecordWatch
    left: dict[int, Left]

    @property
    def policy(self) -> BatchPolicy:
        return self.options.batch

    @property
    def auto(self) -> bool:
        return self.policy.mode == "auto"

    @property
    def unavailable(self) -> str | None:
        return self.routes.unavailable
