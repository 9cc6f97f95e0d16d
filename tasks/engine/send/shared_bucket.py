"""One Prefect global concurrency limit used as a sliding window: blocks of slots leased, spent, let go.

The lease protocol of tasks/engine/send/shared_limits.py: a process takes slots in blocks (a lease
each), spends them one request (or token) at a time, renews a lease spent late, and lets each block go
a window after its last slot was spent. Every wait ends at a daily-quota stop; an ask is never
cancelled in flight (the slots the server granted would stay taken until their lease ends).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from tasks.engine.send.daily_quota import SharedStop
from tasks.engine.send.shared_rate import RateSettings

__all__ = ["BucketStats", "SharedBucket"]

log = logging.getLogger(__name__)

# The releasing task looks at what is due at least this often.
RELEASE_POLL_S = 1.0
# Longest sleep after a denied ask before asking again.
MAX_RETRY_SLEEP_S = 2.0
# How long a closing bucket waits for the ask of a block asked for ahead.
CLOSE_WAIT_S = 15.0
# Longest sleep after the Prefect server failed to answer an ask.
MAX_TROUBLE_SLEEP_S = 10.0
# Refused for a lease's length and this (the server's repossessor loop and more), an ask is stalled: a warning.
STALL_MARGIN_S = 30.0


@dataclass
class _Block:
    """Slots taken under one lease: spent one by one, let go ``hold_s`` after the last one was spent."""

    lease_id: Any
    slots: int
    left: int
    lease_ends: float  # on this process's clock, counted from the ask (the server's is later)
    last_spent: float | None = None


@dataclass(order=True)
class _Release:
    at: float
    lease_id: Any = field(compare=False)
    slots: int = field(compare=False)


@dataclass
class BucketStats:
    """What one bucket did in a run; :meth:`describe` gives them under these names in ``_runs/``."""

    acquires: int = 0
    denied_423: int = 0  # acquires Prefect refused (423): the limit was full
    slots_taken: int = 0
    slots_unused: int = 0  # taken, never spent (a block retired early)
    slots_released: int = 0
    lease_renewals: int = 0
    blocks_asked_ahead: int = 0  # the next block asked for while this one was being spent
    wait_s: float = 0.0  # waiting for acquires
    asks: int = 0  # acquire requests to the Prefect server
    ask_s: float = 0.0
    slowest_ask_s: float = 0.0
    prefect_server_errors: int = 0

    def describe(self) -> dict[str, Any]:
        """The counters under their names, seconds rounded to ms, ``ask_s`` as the mean ask."""
        described: dict[str, Any] = {}
        for name, value in dataclasses.asdict(self).items():
            if name == "ask_s":
                described["mean_ask_s"] = round(value / self.asks, 4) if self.asks else None
            else:
                described[name] = round(value, 3) if isinstance(value, float) else value
        return described


class SharedBucket:
    """One GCL used as a sliding window: blocks of slots taken under leases, let go a window after use."""

    def __init__(self, client: Any, name: str, settings: RateSettings, stop: SharedStop) -> None:
        self.client = client
        self.name = name
        self.settings = settings
        self._stop = stop
        self._block: _Block | None = None
        # The next block, asked for as soon as this one is being spent (while requests wait): an ask's
        # latency (0.2-0.6 s on a busy server, a block lasts ~1 s) doesn't stall the pace.
        self._next: asyncio.Task | None = None
        self._closing = False
        self._releases: list[_Release] = []
        self._releaser: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.stats = BucketStats()
        self.gone = False

    @property
    def nominal_limit(self) -> int:
        """The limit as declared (the settings are never changed; a 429's cut lowers the server's only)."""
        return self.settings.limit

    async def take(self, amount: int, waiting: int = 1, share: float = 1.0) -> None:
        """Wait until ``amount`` (requests or tokens) may be sent; raises :class:`~tasks.errors.RunStopped`
        as soon as the run must stop (a daily-quota stop), whatever this was waiting for.

        ``waiting``: how many are queued behind this one (the block is no larger than they need);
        ``share``: this process's share of the pace (a block is about ``BLOCK_S`` of it: a block is let
        go as a whole, so one spent slowly would hold its first slots past their window)."""
        need = amount * self.settings.unit
        block = max(self.settings.unit, math.ceil(self.settings.block * share))
        wanted = max(need, min(block, waiting * need))
        self._stop.check()
        async with self._lock:
            while need > 0:
                self._stop.check()
                block = self._block
                if block is None or not block.left:
                    if self.gone:
                        return
                    # The ask is a task of its own, left to close() when the stop comes first: an ask
                    # cancelled in flight would lose the slots the server granted until their lease ends.
                    if self._next is None:
                        self._next = self._ask(min(wanted, self.settings.limit))
                    await self._stop.first(self._next)
                    self._stop.check()
                    task, self._next = self._next, None
                    self._block = task.result()
                    continue
                now = time.monotonic()
                if now + self.settings.hold_s > block.lease_ends and not await self._renew(block):
                    self._retire(block, now)
                    continue
                used = min(need, block.left)
                block.left -= used
                block.last_spent = now
                need -= used
                if not block.left:
                    self._retire(block, now)
                if waiting > 1 and self._next is None and not self.gone:
                    self.stats.blocks_asked_ahead += 1
                    self._next = self._ask(min(wanted, self.settings.limit))

    def _ask(self, slots: int) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self._acquire(slots))

    def _retire(self, block: _Block, now: float) -> None:
        """The block is spent (or its lease is lost): let it go once its last slot left the window."""
        if self._block is block:
            self._block = None
        self.stats.slots_unused += block.left
        block.left = 0
        at = now if block.last_spent is None else block.last_spent + self.settings.hold_s
        heapq.heappush(self._releases, _Release(at, block.lease_id, block.slots))
        if self._releaser is None or self._releaser.done():
            self._releaser = asyncio.get_running_loop().create_task(self._release_loop())

    async def _release_loop(self) -> None:
        # Plain sleeps, at most RELEASE_POLL_S each: a block let go "now" waits that long at most, and
        # cancelling the loop always ends it (3.11's wait_for can swallow a cancel that meets a result).
        while True:
            wait = self._releases[0].at - time.monotonic() if self._releases else RELEASE_POLL_S
            if wait > 0:
                await asyncio.sleep(min(wait, RELEASE_POLL_S))
                continue
            await self._release(heapq.heappop(self._releases))

    async def _release(self, release: _Release) -> None:
        from httpx import HTTPError, HTTPStatusError

        try:
            await self.client.release_concurrency_slots_with_lease(release.lease_id)
            self.stats.slots_released += release.slots
        except HTTPStatusError as exc:
            if exc.response.status_code != 404:  # 404: the lease ended already, its slots are free
                self._release_failed(release, exc)
        except HTTPError as exc:
            self._release_failed(release, exc)

    def _release_failed(self, release: _Release, exc: Exception) -> None:
        self.stats.prefect_server_errors += 1
        log.warning("could not let go of %s slots of %s (%s): their lease ends them", release.slots, self.name, exc)

    async def _renew(self, block: _Block) -> bool:
        """Extend the lease of a block spent late (an ask answered slowly, a quiet spell); False when the
        lease is gone (its slots were freed: the block can't be spent)."""
        from httpx import HTTPError, HTTPStatusError

        asked = time.monotonic()
        try:
            await self.client.renew_concurrency_lease(block.lease_id, lease_duration=self.settings.lease_s)
        except HTTPStatusError as exc:
            if exc.response.status_code in (404, 410):
                return False
            self.stats.prefect_server_errors += 1
            return False
        except HTTPError:
            self.stats.prefect_server_errors += 1
            return False
        self.stats.lease_renewals += 1
        block.lease_ends = asked + self.settings.lease_s
        return True

    async def _acquire(self, slots: int) -> _Block | None:
        from httpx import HTTPError, HTTPStatusError

        started = time.monotonic()
        trouble = 0
        warn_at = started + self.settings.lease_s + STALL_MARGIN_S
        while True:
            # A block no longer wanted (closing, or stopped: nothing more is sent) is not asked for again.
            if self._closing or self._stop.is_set():
                return None
            asked = time.monotonic()
            try:
                try:
                    answer = await self.client.increment_concurrency_slots_with_lease(
                        names=[self.name], slots=slots, mode="concurrency", lease_duration=self.settings.lease_s
                    )
                finally:
                    took = time.monotonic() - asked
                    self.stats.asks += 1
                    self.stats.ask_s += took
                    self.stats.slowest_ask_s = max(self.stats.slowest_ask_s, took)
            except HTTPStatusError as exc:
                status = exc.response.status_code
                if status >= 500 or status == 429:
                    trouble = await self._server_trouble(trouble, exc)
                    continue
                if status == 423:
                    self.stats.denied_423 += 1
                    if time.monotonic() > warn_at:
                        warn_at = math.inf
                        self._stalled(started)
                    await self._stop.sleep(self._retry_after(slots))
                    continue
                if status == 422:  # more than the limit: set to 0 (a pause), or lowered below our block
                    limit = await self._read_limit()
                    if limit is None:
                        continue
                    if limit == 0:
                        await self._stop.check_flag(default=True)
                        continue
                    slots = min(slots, limit)
                    continue
                if status == 404:
                    log.warning("shared limit %s was deleted: this run goes on under its own limiter", self.name)
                    self.gone = True
                    return None
                raise
            except HTTPError as exc:  # the Prefect server unreachable, or too slow to answer
                trouble = await self._server_trouble(trouble, exc)
                continue
            self.stats.acquires += 1
            self.stats.slots_taken += slots
            self.stats.wait_s += time.monotonic() - started
            lease_id = answer.json()["lease_id"]
            return _Block(lease_id, slots, slots, asked + self.settings.lease_s)

    def _stalled(self, started: float) -> None:
        """Refused longer than any slot can be held: say so (the run goes on asking)."""
        log.warning(
            "shared limit %s has refused this process's asks for %.0f s, longer than a slot is held: other "
            "processes take every slot that comes back, or slots of ended processes are still taken (they "
            "come back when their leases end, which takes the Prefect server's lease repossessor: `prefect "
            "server start` runs it, an ephemeral server does not). `prefect gcl inspect %s` shows the slots",
            self.name,
            time.monotonic() - started,
            self.name,
        )

    def _retry_after(self, slots: int) -> float:
        """After a denied ask: about the time the limit takes to turn ``slots`` over (slots are let go at
        the rate they were taken a window ago), with jitter so that processes don't ask in step."""
        per_second = self.settings.limit / self.settings.hold_s
        return min(MAX_RETRY_SLEEP_S, max(0.02, slots / per_second)) * random.uniform(0.5, 1.5)

    async def _server_trouble(self, times: int, exc: Exception) -> int:
        """The Prefect server failed to answer: wait (1 s doubling to ``MAX_TROUBLE_SLEEP_S``) and ask
        again. No request goes out meanwhile — the budget can't be checked — but the run goes on."""
        self.stats.prefect_server_errors += 1
        if times in (0, 5) or times % 30 == 29:
            log.warning("Prefect server failed to answer for shared limit %s (%s): asking again", self.name, exc)
        await self._stop.sleep(min(MAX_TROUBLE_SLEEP_S, 2.0**times))
        return times + 1

    async def _read_limit(self) -> int | None:
        from prefect.exceptions import ObjectNotFound

        try:
            current = await self.client.read_global_concurrency_limit_by_name(self.name)
        except ObjectNotFound:
            self.gone = True
            return None
        return int(current.limit)

    async def set_share(self, factor: float) -> None:
        """Set the limit to ``factor`` of its nominal value (a 429 lowered it, or it recovers)."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        unit = self.settings.unit
        limit = max(unit, math.floor(self.nominal_limit * min(max(factor, 0.0), 1.0) / unit) * unit)
        await self.client.update_global_concurrency_limit(self.name, GlobalConcurrencyLimitUpdate(limit=limit))

    async def close(self) -> None:
        """Let go of what is due: slots never spent at once, spent ones whose window is over. Slots still
        inside their window stay taken until their leases end (``lease_s`` after they were taken) —
        unless the run was stopped: nothing more is sent on this key today, so every slot goes at once."""
        if self._block is not None:
            self._retire(self._block, time.monotonic())
        if self._next is not None:
            # The block being asked for: let its ask finish (cancelled in flight, slots the server granted
            # would stay taken until their lease ends), then let it go at once. Closing (or stopped), it
            # asks no more: only an ask in flight or a denied ask's sleep is waited for.
            task, self._next = self._next, None
            self._closing = True
            if not task.done():
                await asyncio.wait({task}, timeout=CLOSE_WAIT_S)
            if not task.done():
                task.cancel()  # the Prefect server is not answering: the lease ends what it granted
            done = (await asyncio.gather(task, return_exceptions=True))[0]
            if isinstance(done, _Block):
                self._retire(done, time.monotonic())
        if self._releaser is not None:
            self._releaser.cancel()
            await asyncio.gather(self._releaser, return_exceptions=True)
        now = time.monotonic()
        while self._releases and (self._stop.is_set() or self._releases[0].at <= now):
            await self._release(heapq.heappop(self._releases))

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.name,
            "per_window": round(s.per_window, 2),
            "window_s": s.window_s,
            "limit_slots": s.limit,
            "hold_s": s.hold_s,
            "lease_s": s.lease_s,
            "block_slots": s.block,
            "slots_per_unit": s.unit,
            **self.stats.describe(),
        }
