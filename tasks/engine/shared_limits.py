"""One quota for every process on the same key and model: Prefect global concurrency limits as the budget.

Gemini counts its limits per project and model, so every run that sends to one provider host and model
(the nightly embed, four shards of a backfill on two workers, an extract and a caption at once) draws on
one budget, held in Prefect global concurrency limits (GCLs) with slot decay — rate limits:

- ``gembatch-rpm:<host>:<model>``: requests, in units of ``SLOTS_PER_REQUEST`` slots (hundredths of a
  request: the server drops the fraction of its decay at every update, which with whole requests as
  slots costs up to a request per update);
- ``gembatch-tpm:<host>:<model>``: input tokens, one slot each.

A run with ``--rpm``/``--tpm`` creates or updates them; a run without takes what an operator made with
``prefect gcl create`` (see README, "Running at scale"). A limit of capacity ``C`` and decay ``r`` lets at
most ``C + r·L`` through in any ``L`` seconds, and a permit is spent within ``EXPIRY_S`` of being taken, so
``C + r·(window + EXPIRY_S + GUARD_S) <= rpm`` keeps every window at the provider within ``--rpm``:
``C`` is ``BURST_SHARE`` of the rate (at least ``BLOCKS_HELD`` blocks), which leaves about 93% of it
to the decay.

Each process takes permits in blocks (``occupy``: about ``BLOCK_S`` seconds' worth) and spends them through
its own :class:`~tasks.engine.limits.AdaptiveLimiter`: one acquire per request would cap everyone at a few
dozen requests a second (PREFECT.md). A 429 that cuts one process's rate lowers the shared decay by the
same factor, and its recovery raises it again. A daily-quota stop sets the limits to 0 and records
the stop in the Prefect variable ``gembatch-daily-quota-<host>-<model>`` until the next Pacific midnight:
every process on that key then ends ``stopped: daily quota`` (resumable), and so does a run started
before the quota resets.

Prefect is imported here only: a run without a Prefect API never loads this module.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

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

SLOTS_PER_REQUEST = 100
WINDOW_S = 60.0
# A block of permits is spent within this many seconds of being taken, or let go.
EXPIRY_S = 2.0
# Arrival jitter at the provider (as the in-process limiter's guard).
GUARD_S = 0.5
# The burst a GCL holds (its capacity), as a share of the per-window rate.
BURST_SHARE = 0.025
# A block is about this many seconds' worth of the shared rate, and a limit holds at least this many.
BLOCK_S = 0.5
BLOCKS_HELD = 3
# Longest sleep after a 423 before asking again (the server's Retry-After may be longer).
MAX_RETRY_SLEEP_S = 2.0
# Longest sleep after the Prefect server failed to answer an ask.
MAX_TROUBLE_SLEEP_S = 10.0
DAILY_QUOTA = "stopped: daily quota"
# How often a run reads the daily-quota flag (besides finding a limit set to 0).
FLAG_POLL_S = 5.0


def limit_names(host: str, model: str) -> tuple[str, str]:
    """The RPM and TPM limits' names for a provider host and model."""
    clean = f"{host}:{model}".replace("/", "_").replace("%", "_").replace("&", "_").replace("<", "_")
    clean = clean.replace(">", "_")
    return f"gembatch-rpm:{clean}", f"gembatch-tpm:{clean}"


def daily_quota_variable(host: str, model: str) -> str:
    """The Prefect variable that holds a daily-quota stop for a host and model (letters, digits, -, _)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{host}-{model}").strip("-").lower()[:180]
    digest = hashlib.sha256(f"{host}\0{model}".encode()).hexdigest()[:8]
    return f"gembatch-daily-quota-{slug}-{digest}"


@dataclass(frozen=True)
class RateSettings:
    """A GCL's numbers for a per-window rate: capacity and block in slots, decay in slots a second."""

    per_window: float  # the declared rate (requests or tokens a window)
    unit: int  # slots per request (or per token)
    limit: int  # capacity, slots
    decay: float  # slots a second
    block: int  # slots taken at once
    window_s: float = WINDOW_S

    @property
    def shared_per_window(self) -> float:
        """What the decay lets through a window, in requests (or tokens)."""
        return self.decay * self.window_s / self.unit


def expiry_s(window_s: float) -> float:
    """How long a block of permits lives after it was asked for (the answer may take a while on a busy
    Prefect server: a permit that arrives expired is let go)."""
    return EXPIRY_S


def guard_s(window_s: float) -> float:
    return min(GUARD_S, window_s * 0.05)


def rate_settings(per_window: float, unit: int, *, window_s: float = WINDOW_S) -> RateSettings:
    """The GCL for ``per_window`` (requests or tokens a ``window_s``) that keeps every window within it.

    The block is about ``BLOCK_S`` seconds' worth of the rate; the capacity at least ``BLOCKS_HELD``
    blocks (what decays while the ask for the next block travels is kept, not lost at a full limit)."""
    block = max(1, math.ceil(per_window / window_s * BLOCK_S))
    capacity = max(BLOCKS_HELD * block, math.floor(per_window * BURST_SHARE))
    if capacity >= per_window / 2:  # a rate too small for blocks: one request at a time
        block, capacity = 1, max(1, min(capacity, math.floor(per_window / 4)))
    span = window_s + expiry_s(window_s) + guard_s(window_s)
    per_second = max(per_window - capacity, 0.0) / span
    return RateSettings(per_window, unit, capacity * unit, per_second * unit, block * unit, window_s)


def from_limit(limit: int, decay: float, unit: int, *, window_s: float = WINDOW_S) -> RateSettings:
    """Settings read from an existing GCL (an operator's): the block follows its decay."""
    capacity = limit // unit
    per_second = decay / unit
    per_window = capacity + per_second * (window_s + expiry_s(window_s) + guard_s(window_s))
    block = max(1, min(max(capacity // BLOCKS_HELD, 1), math.ceil(per_second * BLOCK_S)))
    return RateSettings(per_window, unit, limit, decay, block * unit, window_s)


def next_pacific_midnight(now: dt.datetime | None = None) -> dt.datetime:
    """When Gemini's per-day quotas reset (midnight America/Los_Angeles), in UTC."""
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("America/Los_Angeles")
    local = (now or dt.datetime.now(dt.UTC)).astimezone(tz)
    midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), tz)
    return midnight.astimezone(dt.UTC)


class SharedBucket:
    """One GCL, taken in blocks of permits that each live ``EXPIRY_S`` seconds in this process."""

    def __init__(self, client: Any, name: str, settings: RateSettings, stop: SharedStop) -> None:
        self.client = client
        self.name = name
        self.settings = settings
        self.nominal_decay = settings.decay
        self._stop = stop
        self._credit = 0  # slots left of the current block
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self.acquires = 0
        self.denied = 0
        self.slots_taken = 0
        self.slots_expired = 0
        self.wait_s = 0.0
        self.server_errors = 0
        self.gone = False
        self.ask_s = 0.0  # time in asks (POSTs) that were granted or denied
        self.asks = 0
        self.slowest_ask_s = 0.0
        self.denied_sleep_s = 0.0
        self.blocks_expired = 0

    async def take(self, amount: int, waiting: int = 1) -> None:
        """Wait until ``amount`` (requests or tokens) may be sent; blocks for good once the run must stop.

        ``waiting``: how many are queued behind this one (a block larger than that would expire unused)."""
        need = amount * self.settings.unit
        wanted = max(need, min(self.settings.block, waiting * need))
        async with self._lock:
            while need > 0:
                now = time.monotonic()
                if self._credit and now >= self._expires:
                    self.slots_expired += self._credit
                    self.blocks_expired += 1
                    self._credit = 0
                if not self._credit:
                    if self.gone:
                        return
                    await self._acquire(min(wanted, self.settings.limit))
                    continue
                used = min(need, self._credit)
                self._credit -= used
                need -= used

    async def _acquire(self, slots: int) -> None:
        from httpx import HTTPError, HTTPStatusError

        started = time.monotonic()
        trouble = 0
        while True:
            if self._stop.is_set():
                await asyncio.Event().wait()  # until the run cancels this request
            asked = time.monotonic()
            try:
                try:
                    await self.client.increment_concurrency_slots(names=[self.name], slots=slots, mode="rate_limit")
                finally:
                    took = time.monotonic() - asked
                    self.asks += 1
                    self.ask_s += took
                    self.slowest_ask_s = max(self.slowest_ask_s, took)
            except HTTPStatusError as exc:
                status = exc.response.status_code
                if status >= 500 or status == 429:
                    trouble = await self._server_trouble(trouble, exc)
                    continue
                if status == 423:
                    self.denied += 1
                    pause = await self._until_room(slots)
                    self.denied_sleep_s += pause
                    await asyncio.sleep(pause)
                    continue
                if status == 422:  # more than the limit: set to 0 (a stop), or lowered below our block
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
                    return
                raise
            except HTTPError as exc:  # the Prefect server unreachable, or too slow to answer
                trouble = await self._server_trouble(trouble, exc)
                continue
            self.acquires += 1
            self.slots_taken += slots
            self._credit = slots
            self._expires = asked + expiry_s(self.settings.window_s)
            self.wait_s += time.monotonic() - started
            return

    async def _server_trouble(self, times: int, exc: Exception) -> int:
        """The Prefect server failed to answer: wait (1 s doubling to ``MAX_TROUBLE_SLEEP_S``) and ask
        again. No request goes out meanwhile — the budget can't be checked — but the run goes on."""
        self.server_errors += 1
        if times in (0, 5) or times % 30 == 29:
            log.warning("Prefect server failed to answer for shared limit %s (%s): asking again", self.name, exc)
        await asyncio.sleep(min(MAX_TROUBLE_SLEEP_S, 2.0**times))
        return times + 1

    async def _until_room(self, slots: int) -> float:
        """Seconds until ``slots`` fit, read after a denied ask.

        Prefect 3.8 applies the decay only on a granted ask, yet every denied one restarts the decay's
        clock (its ``updated`` column): asking again and again while the limit is full keeps it full.
        So after a denial (which just restarted the clock) read the limit — a read changes nothing —
        and ask again when the slots held have decayed enough, not at the server's Retry-After."""
        from httpx import HTTPError
        from prefect.exceptions import ObjectNotFound

        try:
            current = await self.client.read_global_concurrency_limit_by_name(self.name)
        except ObjectNotFound:
            return 0.0
        except HTTPError:
            return slots / max(self.settings.decay, 1e-9)
        decay = float(current.slot_decay_per_second or 0.0)
        if decay <= 0 or current.limit < slots:
            return MAX_RETRY_SLEEP_S  # no longer a rate limit, or lowered under our block: _acquire sees it
        excess = current.active_slots + slots - current.limit
        return min(MAX_RETRY_SLEEP_S, max(excess, 0) / decay + random.uniform(0.002, 0.02))

    async def _read_limit(self) -> int | None:
        from prefect.exceptions import ObjectNotFound

        try:
            current = await self.client.read_global_concurrency_limit_by_name(self.name)
        except ObjectNotFound:
            self.gone = True
            return None
        return int(current.limit)

    async def set_share(self, factor: float) -> None:
        """Set the decay to ``factor`` of its nominal value (a 429 lowered it, or it recovers)."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        decay = max(self.nominal_decay * min(max(factor, 0.0), 1.0), self.settings.unit / self.settings.window_s)
        await self.client.update_global_concurrency_limit(
            self.name, GlobalConcurrencyLimitUpdate(slot_decay_per_second=decay)
        )

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.name,
            "per_window": round(s.per_window, 2),
            "shared_per_window": round(s.shared_per_window, 2),
            "window_s": s.window_s,
            "limit_slots": s.limit,
            "slot_decay_per_second": round(s.decay, 4),
            "block_slots": s.block,
            "slots_per_unit": s.unit,
            "acquires": self.acquires,
            "denied_423": self.denied,
            "slots_taken": self.slots_taken,
            "slots_expired_unused": self.slots_expired,
            "wait_s": round(self.wait_s, 3),
            "blocks_expired": self.blocks_expired,
            "asks": self.asks,
            "mean_ask_s": round(self.ask_s / self.asks, 4) if self.asks else None,
            "slowest_ask_s": round(self.slowest_ask_s, 3),
            "denied_sleep_s": round(self.denied_sleep_s, 3),
            "prefect_server_errors": self.server_errors,
        }


class SharedStop:
    """The daily-quota stop of one host and model, shared through a Prefect variable."""

    def __init__(self, client: Any, variable: str) -> None:
        self.client = client
        self.variable = variable
        self.event = asyncio.Event()
        self.message = ""

    def is_set(self) -> bool:
        return self.event.is_set()

    async def check_flag(self, *, default: bool = False) -> bool:
        """Read the flag; set the stop when it is active (``default``: stop even if no flag says why)."""
        value = await self._read()
        if value is not None and _active(value):
            self._set(str(value.get("message") or "the provider's daily quota is used up"), value.get("until"))
            return True
        if default:
            self._set("another run set the shared limit to 0 (the daily quota is used up)", None)
            return True
        return False

    def _set(self, message: str, until: str | None) -> None:
        when = f" (until {until})" if until else ""
        self.message = f"{message}{when}. Rerun after the quota resets: rows already written are kept and skipped."
        self.event.set()

    async def _read(self) -> dict[str, Any] | None:
        from prefect.exceptions import ObjectNotFound

        try:
            variable = await self.client.read_variable_by_name(self.variable)
        except ObjectNotFound:
            return None
        if variable is None or not isinstance(variable.value, dict):
            return None
        return variable.value

    async def raise_flag(self, message: str, buckets: list[SharedBucket]) -> None:
        """Stop everyone on this key and model: limits to 0, the reason in the variable."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate, VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

        saved = {}
        for bucket in buckets:
            saved[bucket.name] = {"limit": bucket.settings.limit, "slot_decay_per_second": bucket.nominal_decay}
        value = {"message": message, "until": next_pacific_midnight().isoformat(), "limits": saved}
        try:
            await self.client.create_variable(VariableCreate(name=self.variable, value=value))
        except ObjectAlreadyExists:
            await self.client.update_variable(VariableUpdate(name=self.variable, value=value))
        for bucket in buckets:
            try:
                await self.client.update_global_concurrency_limit(bucket.name, GlobalConcurrencyLimitUpdate(limit=0))
            except ObjectNotFound:
                pass

    async def watch(self) -> None:
        """Read the flag every ``FLAG_POLL_S`` seconds until it is raised: a run whose requests are not
        gated by a shared limit (none set) hears of another run's daily-quota stop this way."""
        while not self.is_set():
            await asyncio.sleep(FLAG_POLL_S)
            try:
                await self.check_flag()
            except Exception as exc:  # noqa: BLE001 - a failed read is tried again
                log.warning("could not read %s: %s", self.variable, exc)

    async def clear_if_over(self) -> dict[str, Any] | None:
        """At a run's start: a flag whose time has passed is removed; returns the limits it saved."""
        value = await self._read()
        if value is None or _active(value):
            return None
        await self.client.delete_variable_by_name(self.variable)
        return value.get("limits") or {}


def _active(value: dict[str, Any]) -> bool:
    until = value.get("until")
    if not until:
        return True
    try:
        return dt.datetime.now(dt.UTC) < dt.datetime.fromisoformat(until)
    except ValueError:
        return True


class SharedLimits:
    """The shared RPM/TPM budget of one run's process, and its share of a daily-quota stop."""

    def __init__(self, client: Any, host: str, model: str) -> None:
        self.client = client
        self.host, self.model = host, model
        self.rpm: SharedBucket | None = None
        self.tpm: SharedBucket | None = None
        self.stop = SharedStop(client, daily_quota_variable(host, model))
        self._tasks: set[asyncio.Task] = set()
        self._factor = 1.0
        self.share_changes = 0

    @property
    def buckets(self) -> list[SharedBucket]:
        return [b for b in (self.rpm, self.tpm) if b is not None]

    async def take(self, requests: int, tokens: int, waiting: int = 1) -> None:
        if self.stop.is_set():
            await asyncio.Event().wait()
        if self.rpm is not None:
            await self.rpm.take(requests, waiting)
        if self.tpm is not None and tokens > 0:
            await self.tpm.take(tokens, waiting)

    def rate_factor(self, factor: float) -> None:
        """The in-process limiter's rate is now ``factor`` of the declared one: the shared decay follows."""
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
        await self.stop.raise_flag(message, self.buckets)

    def describe(self) -> dict[str, Any]:
        return {
            "rpm": self.rpm.describe() if self.rpm else None,
            "tpm": self.tpm.describe() if self.tpm else None,
            "daily_quota_variable": self.stop.variable,
            "share_changes_after_429": self.share_changes,
        }

    async def close(self) -> None:
        if self._factor != 1.0 and self.rpm is not None:
            # Hand the budget back whole: the next run starts at the declared rate, as this one did.
            await self._set_share(1.0)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.__aexit__(None, None, None)


async def _bucket(
    client: Any,
    name: str,
    per_window: float | None,
    unit: int,
    saved: dict[str, Any],
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
        if limit == 0 and name in saved:  # a daily-quota stop that is over: back to what it was
            limit, decay = int(saved[name]["limit"]), float(saved[name]["slot_decay_per_second"])
            await client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=limit, slot_decay_per_second=decay)
            )
        if decay <= 0:
            log.warning("global concurrency limit %s has no slot decay: not a rate limit, ignored", name)
            return None
        if limit == 0:  # stopped by another run (daily quota), and not over yet
            await stop.check_flag(default=True)
            limit = unit
        return SharedBucket(client, name, from_limit(limit, decay, unit, window_s=window_s), stop)
    settings = rate_settings(per_window, unit, window_s=window_s)
    stopped = stop.is_set()
    if current is None:
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name=name, limit=0 if stopped else settings.limit, slot_decay_per_second=settings.decay
                )
            )
        except ObjectAlreadyExists:  # another process made it in between
            current = await client.read_global_concurrency_limit_by_name(name)
    if current is not None and not stopped:
        if int(current.limit) != settings.limit or abs(float(current.slot_decay_per_second) - settings.decay) > 1e-6:
            await client.update_global_concurrency_limit(
                name,
                GlobalConcurrencyLimitUpdate(limit=settings.limit, slot_decay_per_second=settings.decay, active=True),
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
        saved = await shared.stop.clear_if_over()
        if saved is None:
            await shared.stop.check_flag()
        rpm_name, tpm_name = limit_names(host, model)
        shared.rpm = await _bucket(client, rpm_name, rpm, SLOTS_PER_REQUEST, saved or {}, shared.stop, window_s)
        shared.tpm = await _bucket(client, tpm_name, tpm, 1, saved or {}, shared.stop, window_s)
    except BaseException:
        await client.__aexit__(None, None, None)
        raise
    return shared
