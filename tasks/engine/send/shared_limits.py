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

Prefect is imported by these modules only (here, shared_bucket.py, senders.py, daily_quota.py), inside the
functions that use it: a run without a Prefect API never loads it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tasks.engine.send.daily_quota import SharedStop, daily_quota_variable
from tasks.engine.send.senders import Senders
from tasks.engine.send.shared_bucket import SharedBucket
from tasks.engine.send.shared_rate import (
    SLOTS_PER_REQUEST,
    WINDOW_S,
    from_limit,
    limit_names,
    rate_settings,
    senders_name,
)

__all__ = ["SharedLimits", "open_shared_limits"]

log = logging.getLogger(__name__)


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
