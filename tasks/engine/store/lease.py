"""A run's lease on its output folder: taken, renewed, given up; the last run out compacts the folder.

The claims themselves are tasks/engine/plan/claims.py."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from tasks.engine.plan.claims import COMPACT_KEY, ClaimBook, ClaimPolicy
from tasks.engine.plan.claims import log as claims_log
from tasks.engine.store.output import OutputStore

if TYPE_CHECKING:
    from tasks.engine.job import Job
    from tasks.engine.options import RunOptions

__all__ = ["claim_output", "compact_if_last", "give_up_lease", "take_lease"]


async def claim_output(store: OutputStore, job: Job, run_id: str, options: RunOptions) -> None:
    """Record this run's job and model as the folder's owner, or refuse another's (:meth:`OutputStore.claim`)."""
    await asyncio.to_thread(
        store.claim,
        job=job.name,
        model=job.model,
        run_id=run_id,
        force=options.force,
        change_model=options.change_model,
    )


async def take_lease(store: OutputStore, run_id: str, policy: ClaimPolicy) -> ClaimBook:
    """Write this run's lease on the output folder and start renewing it (see tasks/engine/plan/claims.py);
    then wait while another run compacts the folder."""
    claims = ClaimBook(store.fs, store.root, run_id, policy)
    await asyncio.to_thread(claims.start)
    claims.heartbeat.ticking = asyncio.create_task(_tick(claims))
    try:
        await _wait_for_compaction(claims)
    except BaseException:
        await give_up_lease(claims)
        raise
    return claims


async def give_up_lease(claims: ClaimBook) -> None:
    if claims.heartbeat.ticking is not None:
        claims.heartbeat.ticking.cancel()
        await asyncio.gather(claims.heartbeat.ticking, return_exceptions=True)
    await asyncio.to_thread(claims.stop)


async def _tick(claims: ClaimBook) -> None:
    """Tell the heartbeat thread the event loop is alive (a stuck loop lets the claims lapse)."""
    while True:
        claims.tick()
        await asyncio.sleep(claims.policy.heartbeat_s / 2)


async def _wait_for_compaction(claims: ClaimBook) -> None:
    """A run compacting the folder rewrites and removes parts: start reading only after it is done.

    This run's lease is already written, so a run about to compact sees it and leaves compaction."""
    told = False
    while (holder := await asyncio.to_thread(claims.holder_of, COMPACT_KEY)) is not None:
        if not told:
            claims_log.warning("waiting: %s is compacting this output folder", holder.describe())
            told = True
        await asyncio.sleep(claims.policy.poll_s)


async def compact_if_last(claims: ClaimBook, store: OutputStore, id_col: str, *, needed: bool) -> tuple[int, str]:
    """Tidy the folder only when no other run works on it: compact (supersede old records) when
    ``needed``, remove what killed runs left (temporary files, stale claims). A live run may be
    reading or writing the parts compaction rewrites, so otherwise the last run to finish does it.

    Returns the rows removed and what happened, for the run metadata."""
    await asyncio.to_thread(claims.end_lease)
    if others := await asyncio.to_thread(claims.other_runs):
        return 0, f"left to the last run: {others[0].describe()} still works on this folder" if needed else "not needed"
    if (holder := await asyncio.to_thread(claims.acquire, COMPACT_KEY)) is not None:
        return 0, f"left to {holder.describe()}, which is compacting" if needed else "not needed"
    try:
        # A run that started meanwhile wrote its lease before looking for this claim: one of us sees the other.
        if others := await asyncio.to_thread(claims.other_runs):
            return 0, f"left to the last run: {others[0].describe()} started on this folder" if needed else "not needed"
        await asyncio.to_thread(store.remove_temporary)
        await asyncio.to_thread(claims.sweep)
        if not needed:
            return 0, "not needed"
        return await asyncio.to_thread(store.compact, id_col), "done"
    finally:
        await asyncio.to_thread(claims.release, COMPACT_KEY)
