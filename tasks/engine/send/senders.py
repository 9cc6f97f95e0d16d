"""A process's share of the shared pace: one slot of a counting limit while the rate holds it back.

The processes held back by one shared rate split its pace (see tasks/engine/send/shared_limits.py):
each holds a slot of ``gembatch-senders:<host>:<model>`` while its requests wait for their turn, reads
how many hold one, and paces its own limiter at that share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

__all__ = ["Senders"]

log = logging.getLogger(__name__)

# How often a process held back by the rate counts the others (its share of the pace follows).
SENDERS_POLL_S = 0.5
# A process counts as held back while a request waited behind another within this many seconds; it
# gives its share back after SENDERS_IDLE_S without.
SENDERS_BUSY_S = 2.0
SENDERS_IDLE_S = 5.0
# The senders limit only counts: no process is ever refused a slot of it.
SENDERS_LIMIT = 1_000_000
SENDERS_LEASE_S = 60.0


class Senders:
    """This process's share of the pace: 1 / the processes held back by the same rate, itself included.

    While requests wait here behind one another (the rate, not the work, holds the process back) it
    holds one slot of the senders limit under a lease; every ``SENDERS_POLL_S`` it reads how many slots
    are held and sets ``share``. A process that dies lets its slot go with the lease."""

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name
        self.share = 1.0
        self.busy_at: float | None = None
        self._lease: Any = None
        self._renewed = 0.0
        self._task: asyncio.Task | None = None
        self._step_lock = asyncio.Lock()
        self.most = 1
        self.joins = 0
        self.errors = 0

    async def open(self) -> None:
        """Make the senders limit, unless there is one."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

        try:
            await self.client.read_global_concurrency_limit_by_name(self.name)
        except ObjectNotFound:
            try:
                await self.client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=self.name, limit=SENDERS_LIMIT, slot_decay_per_second=0)
                )
            except ObjectAlreadyExists:  # another process made it in between
                pass

    async def busy(self) -> None:
        """A request waited behind another: the first time, join the count before it goes (its pace is
        then this process's share from the start), and keep counting."""
        self.busy_at = time.monotonic()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
            await self._safe_step()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SENDERS_POLL_S)
            await self._safe_step()

    async def _safe_step(self) -> None:
        try:
            async with self._step_lock:
                await self._step(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - a failed count is tried again; the window still bounds
            self.errors += 1
            if self.errors in (1, 10):
                log.warning("could not count the processes sharing %s: %s", self.name, exc)

    async def _step(self, now: float) -> None:
        busy = self.busy_at is not None and now - self.busy_at < SENDERS_BUSY_S
        idle = self.busy_at is None or now - self.busy_at > SENDERS_IDLE_S
        if busy and self._lease is None:
            answer = await self.client.increment_concurrency_slots_with_lease(
                names=[self.name], slots=1, mode="concurrency", lease_duration=SENDERS_LEASE_S
            )
            self._lease, self._renewed = answer.json()["lease_id"], now
            self.joins += 1
        elif idle and self._lease is not None:
            await self._leave()
        elif self._lease is not None and now - self._renewed > SENDERS_LEASE_S / 3:
            await self.client.renew_concurrency_lease(self._lease, lease_duration=SENDERS_LEASE_S)
            self._renewed = now
        if self._lease is None:
            self.share = 1.0
            return
        held = int((await self.client.read_global_concurrency_limit_by_name(self.name)).active_slots)
        self.most = max(self.most, held)
        self.share = 1.0 / max(1, held)

    async def _leave(self) -> None:
        lease, self._lease = self._lease, None
        self.share = 1.0
        await self.client.release_concurrency_slots_with_lease(lease)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._lease is not None:
            try:
                await self._leave()
            except Exception as exc:  # noqa: BLE001 - the lease ends it
                log.warning("could not let go of %s's slot (%s): its lease ends it", self.name, exc)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "most_sharing": self.most, "joins": self.joins, "errors": self.errors}
