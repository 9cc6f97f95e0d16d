"""What a batch run knows of the records in ``OUTPUT/_batches/``: those it holds, their states, what other runs poll."""

from __future__ import annotations

import asyncio
from typing import Any

import pyarrow.parquet as pq

from tasks.engine.plan.claims import ClaimBook, batch_key
from tasks.engine.plan.done import KnownParts
from tasks.engine.plan.key_table import KeyTable
from tasks.engine.plan.keys import hash_keys
from tasks.engine.send.batch.records import LOST, SUBMITTED, WRITTEN, Book
from tasks.engine.send.context import RunContext


class RecordWatch:
    """The batch records as this run last saw them.

    ``mine``: records whose claim this run holds; ``pending_keys``: contents in batches this run polls;
    ``others_pending``: contents in batches other live runs poll (SUBMITTED records whose claim another
    run holds); ``new_parts``: what other runs wrote, as the last :meth:`refresh` found it."""

    def __init__(self, ctx: RunContext, book: Book, claims: ClaimBook) -> None:
        self.ctx = ctx
        self.book = book
        self.claims = claims
        self.mine: set[str] = set()
        self.states: dict[str, str] = {}  # record name -> state last read (final ones are not read again)
        self.pending_keys = KeyTable(payload=False)
        self.others_pending = KeyTable(payload=False)
        self._others_submitted: frozenset[str] = frozenset()
        self._known_parts = KnownParts(ctx.output.index, ctx.stats.parts_written, ctx.stats.error_parts_written)
        self.new_parts: Any = None

    def my_submitted(self) -> list[dict[str, Any]]:
        return [r for r in self.book.records() if r["state"] == SUBMITTED and r["name"] in self.mine]

    def restart_pending(self) -> None:
        """Contents in a batch this run polls (re-attached, or submitted earlier in this run): not sent again."""
        self.pending_keys = KeyTable(payload=False)
        for record in self.my_submitted():
            self.add_pending(record)

    def add_pending(self, record: dict[str, Any], table: KeyTable | None = None) -> None:
        rows = self.book.rows_path(record["name"])
        if not self.book.fs.exists(rows):
            return
        with self.book.fs.open(rows, "rb") as f:
            parquet = pq.ParquetFile(f)
            for batch in parquet.iter_batches(columns=["content_hash"], batch_size=65536):
                (self.pending_keys if table is None else table).add(hash_keys(batch.column(0)))

    def refresh(self) -> None:
        """What other runs did since this run last looked (worker thread): their new parts go into the
        index, and the contents of their submitted batches into ``others_pending``."""
        ctx = self.ctx
        self.new_parts = ctx.output.store.read_new_parts(self._known_parts(), ctx.output.id_col)
        submitted = set()
        for name in self.book.names():
            if name in self.mine:
                continue
            state = self.states.get(name)
            if state not in (WRITTEN, LOST):
                record = self.book.read(name)
                if record is None:
                    continue
                state = self.states[name] = record["state"]
            if state == SUBMITTED:
                submitted.add(name)
        if submitted != self._others_submitted:
            table = KeyTable(payload=False)
            for name in submitted:
                self.add_pending({"name": name}, table)
            self.others_pending, self._others_submitted = table, frozenset(submitted)

    async def look_again(self) -> None:
        await asyncio.to_thread(self.refresh)
        self.new_parts.add_to(self.ctx.output.index)

    async def drop(self, record: dict[str, Any]) -> None:
        """Remove a record that never became a batch (nothing was paid): its rows are free again."""
        await asyncio.to_thread(self.book.remove, record)
        self.states.pop(record["name"], None)
        await asyncio.to_thread(self.claims.release, batch_key(record["name"]))

    async def close(self, record: dict[str, Any], state: str) -> None:
        """A record that reached a final state (WRITTEN, LOST): saved, its files gone, its claim given back."""
        record["state"] = state
        self.book.save(record)
        self.book.remove(record, keep_record=True)
        self.states[record["name"]] = state
        await asyncio.to_thread(self.claims.release, batch_key(record["name"]))
