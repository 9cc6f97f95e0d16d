"""One quota for every process on the same key and model: Prefect global concurrency limits as the budget.

Gemini counts its limits per project and model, so every run that sends to one provider host and model
(the nightly embed, four shards of a backfill on two workers, an extract and a caption at once) draws on
one budget, held in two Prefect global concurrency limits (GCLs):

- ``gembatch-rpm:<host>:<model>``: requests, one slot each, the limit ``--rpm``;
- ``gembatch-tpm:<host>:<model>``: input tokens, one slot each, the limit ``--tpm``.

They are sliding windows built from leases: a process takes slots in blocks (``occupy``, a lease each,
about ``BLOCK_S`` seconds' worth of the rate) and keeps each block until one window and the arrival
jitter (``hold_s`` = window + ``GUARD_S``) have passed since the last of its slots was spent; then it
lets the block go. Every request sent in the last ``hold_s`` seconds still holds its slot, so no window
at the provider sees more than the limit — whatever the latency of the Prefect server or of a busy
event loop, and without the losses of slot decay (an ask answered late doesn't lose its permits, and
Prefect 3.8's decay restarts its clock at every denied ask). A process that dies lets go of its slots
when their leases end (``lease_s`` after they were taken or last renewed, plus the server's repossessor
loop, 15 s by default).

One acquire per request would cap everyone at a few dozen requests a second (PREFECT.md): a block is
spent through the process's own :class:`~tasks.engine.send.limits.AdaptiveLimiter`. A 429 that cuts one
process's rate lowers the shared limit by the same factor, and its recovery raises it again.

The window alone would let N processes start at N times the rate until a window's worth is out, then
wait: bursts that a provider enforcing its limit over short spells (OpenAI: "60,000 requests/minute may
be enforced as 1,000 requests/second") answers with 429s. So the processes held back by the rate also
split its pace: each holds one slot of ``gembatch-senders:<host>:<model>`` (a lease, renewed) while
it has requests waiting for their turn, reads how many hold one every second, and paces its own
limiter at that share of the rate. A process that sends less than the rate allows (decoding images, a
tail of answers) takes no share, and the window still bounds everyone.

A daily-quota stop (tasks/engine/send/daily_quota.py) is recorded in a Prefect variable until the next
Pacific midnight (the limits are left as they are: Prefect 3.8 can't let slots go from a limit of 0);
every run reads it every second, so every process on that key ends ``stopped: daily quota``
(resumable), and so does a run started before the quota resets. Once a process is stopped, every wait
for the budget ends (:class:`~tasks.errors.RunStopped`), no slot is taken any more, and the process
lets go of every slot it holds when it closes: nothing is sent on the key until the quota resets, so
no window needs them (left to their leases, they would keep the first run after the reset waiting, or
for good on a server without its lease repossessor, as a test harness's).

Prefect is imported here and in daily_quota.py only: a run without a Prefect API never loads them.
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

from tasks.engine.send.daily_quota import SharedStop, daily_quota_variable

__all__ = [
    "SLOTS_PER_REQUEST",
    "SharedBucket",
    "SharedLimits",
    "daily_quota_variable",
    "limit_names",
    "open_shared_limits",
    "rate_settings",
]

log = logging.getLogger(__name__)

SLOTS_PER_REQUEST = 1
WINDOW_S = 60.0
# Arrival jitter at the provider (as the in-process limiter's guard): a slot is held this much longer.
GUARD_S = 0.5
# A block is about this many seconds' worth of the shared rate.
BLOCK_S = 1.0
# A lease lasts the hold and this margin (Prefect's shortest lease is 60 s); renewed when a slot is spent
# too close to its end.
LEASE_MARGIN_S = 5.0
MIN_LEASE_S = 60.0
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
# How often a process held back by the rate counts the others (its share of the pace follows).
SENDERS_POLL_S = 0.5
# A process counts as held back while a request waited behind another within this many seconds; it
# gives its share back after SENDERS_IDLE_S without.
SENDERS_BUSY_S = 2.0
SENDERS_IDLE_S = 5.0
# The senders limit only counts: no process is ever refused a slot of it.
SENDERS_LIMIT = 1_000_000
SENDERS_LEASE_S = 60.0


def _clean(host: str, model: str) -> str:
    clean = f"{host}:{model}".replace("/", "_").replace("%", "_").replace("&", "_").replace("<", "_")
    return clean.replace(">", "_")


def limit_names(host: str, model: str) -> tuple[str, str]:
    """The RPM and TPM limits' names for a provider host and model."""
    clean = _clean(host, model)
    return f"gembatch-rpm:{clean}", f"gembatch-tpm:{clean}"


def senders_name(host: str, model: str) -> str:
    """The limit whose slots count the processes splitting the pace of a host and model."""
    return f"gembatch-senders:{_clean(host, model)}"


@dataclass(frozen=True)
class RateSettings:
    """A GCL's numbers for a per-window rate: the limit and the block in slots, how long slots are held."""

    per_window: float  # the declared rate (requests or tokens a window)
    unit: int  # slots per request (or per token)
    limit: int  # slots: what may be spent within any window
    block: int  # slots taken at once
    window_s: float = WINDOW_S

    @property
    def hold_s(self) -> float:
        """How long a spent slot stays taken: the window and the arrival jitter."""
        return self.window_s + guard_s(self.window_s)

    @property
    def lease_s(self) -> float:
        return max(MIN_LEASE_S, self.hold_s + LEASE_MARGIN_S)


def guard_s(window_s: float) -> float:
    return min(GUARD_S, window_s * 0.05)


def rate_settings(per_window: float, unit: int, *, window_s: float = WINDOW_S) -> RateSettings:
    """The GCL for ``per_window`` (requests or tokens a ``window_s``): the limit is the rate itself, a
    block about ``BLOCK_S`` seconds' worth of it (at most a quarter of the limit, so that several
    processes can hold blocks at once)."""
    limit = max(1, math.floor(per_window))
    block = max(1, min(math.ceil(per_window / window_s * BLOCK_S), limit // 4))
    return RateSettings(per_window, unit, limit * unit, block * unit, window_s)


def from_limit(limit: int, unit: int, *, window_s: float = WINDOW_S) -> RateSettings:
    """Settings read from an existing GCL (an operator's): its limit is the rate per window."""
    return rate_settings(limit // unit, unit, window_s=window_s)


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
        self.nominal_limit = settings.limit
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


class SharedLimits:
    """The shared RPM/TPM budget of one run's process, and its share of a daily-quota stop."""

    def __init__(self, client: Any, host: str, model: str) -> None:
        self.client = client
        self.host, self.model = host, model
        self.rpm: SharedBucket | None = None
        self.tpm: SharedBucket | None = None
        self.senders = Senders(client, senders_name(host, model))
        self.stop = SharedStop(client, daily_quota_variable(host, model))
        self._tasks: set[asyncio.Task] = set()
        self._factor = 1.0
        self.share_changes = 0

    @property
    def buckets(self) -> list[SharedBucket]:
        return [b for b in (self.rpm, self.tpm) if b is not None]

    @property
    def rpm_per_window(self) -> float | None:
        """The shared requests-per-window limit (an operator's, or this run's --rpm), if there is one."""
        return self.rpm.settings.per_window if self.rpm is not None else None

    @property
    def pace_share(self) -> float:
        """The share of the rate this process's limiter paces at (others held back by it take theirs)."""
        return self.senders.share if self.rpm is not None else 1.0

    async def take(self, requests: int, tokens: int, waiting: int = 1) -> None:
        """Wait for a permit; :class:`~tasks.errors.RunStopped` once the key's daily quota is spent."""
        self.stop.check()
        if self.rpm is not None and waiting > 1:
            await self.senders.busy()
        if self.rpm is not None:
            await self.rpm.take(requests, waiting, self.pace_share)
        if self.tpm is not None and tokens > 0:
            await self.tpm.take(tokens, waiting, self.pace_share)

    def rate_factor(self, factor: float) -> None:
        """The in-process limiter's rate is now ``factor`` of the declared one: the shared limit follows."""
        if self.rpm is None or abs(factor - self._factor) < 1e-6:
            return
        self._factor = factor
        self.share_changes += 1
        task = asyncio.get_running_loop().create_task(self._set_share(factor))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_share(self, factor: float) -> None:
        try:
            for bucket in self.buckets:
                await bucket.set_share(factor)
        except Exception as exc:  # noqa: BLE001 - a failed update must not end the run
            log.warning("could not change the shared limits to %.0f%%: %s", 100 * factor, exc)

    async def stop_everyone(self, message: str) -> None:
        """This run met the daily quota: its own waits for the budget end at once, and the flag that stops
        every other run on the key is written — shielded: the end of this run can't cut it short (a
        cancelled caller leaves it to :meth:`close`, which waits for it)."""
        if self.stop.is_set():
            return
        self.stop.set_here(message)
        task = asyncio.get_running_loop().create_task(self._raise_flag(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def _raise_flag(self, message: str) -> None:
        try:
            await self.stop.raise_flag(message)
        except Exception as exc:  # noqa: BLE001 - the others meet the quota themselves, a request each
            log.warning("could not tell the other runs of the daily-quota stop (%s): %s", self.stop.variable, exc)

    def describe(self) -> dict[str, Any]:
        return {
            "rpm": self.rpm.describe() if self.rpm else None,
            "tpm": self.tpm.describe() if self.tpm else None,
            "daily_quota_variable": self.stop.variable,
            "pace": self.senders.describe(),
            "share_changes_after_429": self.share_changes,
        }

    async def close(self) -> None:
        try:
            if self._factor != 1.0 and self.rpm is not None:
                # Hand the budget back whole: the next run starts at the declared rate, as this one did.
                await self._set_share(1.0)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.senders.close()
            for bucket in self.buckets:
                await bucket.close()
        finally:
            await self.client.__aexit__(None, None, None)


async def _bucket(
    client: Any,
    name: str,
    per_window: float | None,
    unit: int,
    stop: SharedStop,
    window_s: float,
) -> SharedBucket | None:
    """The limit ``name``: created or updated from ``per_window`` when given, else as it stands."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        current = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        current = None
    if per_window is None:
        if current is None:
            return None
        limit, decay = int(current.limit), float(current.slot_decay_per_second or 0.0)
        if decay > 0:
            log.warning(
                "global concurrency limit %s has a slot decay: gembatch holds each request's slot for one "
                "window instead, without decay. Ignored; to share it, `prefect gcl update %s "
                "--slot-decay-per-second 0` and set --limit to the requests (or tokens) a window",
                name,
                name,
            )
            return None
        if limit == 0:  # an operator's pause of every run on the key and model
            await stop.check_flag(default=True)
            limit = unit
        return SharedBucket(client, name, from_limit(limit, unit, window_s=window_s), stop)
    settings = rate_settings(per_window, unit, window_s=window_s)
    stopped = stop.is_set()
    if current is None:
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=0 if stopped else settings.limit, slot_decay_per_second=0)
            )
        except ObjectAlreadyExists:  # another process made it in between
            current = await client.read_global_concurrency_limit_by_name(name)
    if current is not None and not stopped:
        if int(current.limit) != settings.limit or float(current.slot_decay_per_second or 0.0) != 0.0:
            await client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=settings.limit, slot_decay_per_second=0, active=True)
            )
    return SharedBucket(client, name, settings, stop)


async def open_shared_limits(
    host: str, model: str, rpm: float | None, tpm: float | None, *, window_s: float = WINDOW_S
) -> SharedLimits | None:
    """The shared budget for ``host`` and ``model`` on the configured Prefect API: its limits (none
    without --rpm/--tpm or a limit made by an operator) and the daily-quota stop."""
    from prefect.client.orchestration import get_client

    client = get_client()
    await client.__aenter__()
    shared = SharedLimits(client, host, model)
    try:
        await shared.stop.clear_if_over()
        await shared.stop.check_flag()
        rpm_name, tpm_name = limit_names(host, model)
        shared.rpm = await _bucket(client, rpm_name, rpm, SLOTS_PER_REQUEST, shared.stop, window_s)
        shared.tpm = await _bucket(client, tpm_name, tpm, 1, shared.stop, window_s)
        if shared.rpm is not None:
            await shared.senders.open()
    except BaseException:
        await client.__aexit__(None, None, None)
        raise
    return shared
