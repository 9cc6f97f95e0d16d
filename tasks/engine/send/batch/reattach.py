"""Re-attaching: the batch records no live run holds are taken over, polled and written by this run."""

from __future__ import annotations

import asyncio

from tasks.engine.plan.claims import batch_key
from tasks.engine.plan.claims import log as claims_log
from tasks.engine.send.batch.left import take_back
from tasks.engine.send.batch.records import LOST, PREPARED, SUBMITTED, UPLOADED, WRITTEN
from tasks.engine.send.batch.shared import BatchShared
from tasks.provider.batches import BatchInfo


async def adopt_records(shared: BatchShared) -> None:
    """Take the records nobody live holds: this run polls them (and any batch created from them).

    A record another live run holds is left to it: that run is submitting or polling it."""
    claims, book, watch = shared.claims, shared.book, shared.watch
    listed: list[BatchInfo] | None = None
    for name in await asyncio.to_thread(book.names):
        if name in watch.mine or watch.states.get(name) in (WRITTEN, LOST):
            continue
        record = await asyncio.to_thread(book.read, name)
        if record is None or record["state"] in (WRITTEN, LOST):
            if record is not None:
                watch.states[name] = record["state"]
            continue
        if await asyncio.to_thread(claims.acquire, batch_key(name)) is not None:
            continue  # another live run submits or polls it
        record = await asyncio.to_thread(book.read, name)  # as it is now that this run holds it
        if record is None or record["state"] in (WRITTEN, LOST):
            await asyncio.to_thread(claims.release, batch_key(name))
            continue
        if record["state"] == PREPARED:
            await watch.drop(record)  # never uploaded: nothing was paid, its rows are sent again
            continue
        if record["state"] == UPLOADED:
            # Created but the id not recorded (killed in between)? The provider's list knows.
            if listed is None:
                try:
                    listed = await shared.api.list()
                except Exception:  # noqa: BLE001 - no list route: the file is sent again
                    listed = []
            match = [b for b in listed if b.input_file_id == record["file_id"]]
            if not match:
                await watch.drop(record)
                continue
            record.update(state=SUBMITTED, batch_id=match[0].id, status=match[0].status)
            book.save(record)
        watch.mine.add(name)
        watch.states[name] = SUBMITTED
        shared.totals.reattached += 1
        if shared.left:
            await asyncio.to_thread(take_back, shared.left, book, name)
        if record.get("run_id") != shared.ctx.run_id:
            claims_log.warning(
                "re-attaching to batch %s (%s) of run %s: that run is gone, this run polls and writes it",
                record["batch_id"],
                name,
                record.get("run_id"),
            )
