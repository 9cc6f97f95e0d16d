"""Client-side rate limiting: requests/minute, tokens/minute, and how many requests are in flight.

A user's quota is a rate (RPM, TPM), never a number of requests in flight: that number follows from
the rate and the latency (Little's law: in flight = rate × latency). So:

- With ``--rpm`` (or ``--tpm``) requests start evenly spaced at the declared rate and as many run at
  once as the latency needs, up to a safety ceiling (``MAX_IN_FLIGHT``: sockets and memory).
- Without any rate, requests in flight start at ``START_IN_FLIGHT`` and double while each doubling
  still raises the completion rate (slow start); once it stops helping, the limit holds, and it
  probes again a minute later.
- ``--max-concurrency`` is only a user's own lower cap.

A declared ``--rpm`` is never exceeded in any 60-second window as the server counts it: starts are
spaced ``60 / rpm`` apart, and no start is allowed while ``rpm`` others fall within the last
``60 + WINDOW_GUARD_S`` seconds (room for arrival-time jitter at the server), which costs 0.8%.

The rule after a 429 (docs/explanation/rate-limits.md): once requests are paced (``--rpm``, or a rate learned from
an earlier 429), a 429 only delays its own request (by the server's retry delay) unless 429s are more
than noise — more than one in a minute and more than ``NOISE_SHARE`` of the requests sent in it —
which means the real limit is lower: then the rate is halved. Without ``--rpm`` the first 429 sets the
rate to half of what was observed over the last minute. A cut happens at most once per burst of
429s (a 429 for a request sent before the last cut does not cut again) and pauses new requests for
one interval at the new rate, or the server's retry delay if longer.
After ``RECOVERY_INTERVAL_S`` seconds without a 429 the rate grows by
``RECOVERY_STEP`` of the declared rate (or of the current one), until it is back at ``--rpm``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from tasks.engine.send.in_flight import Gate, SlowStart
from tasks.engine.send.request_times import RequestTimes
from tasks.engine.send.tpm import TokenMeter

__all__ = ["Limits", "AdaptiveLimiter", "MAX_IN_FLIGHT", "SharedBudget"]

# The safety ceiling on requests in flight: one socket each, and each holds its request body and, for
# a while, its reply. 1,024 carries 2,000 requests a minute at 30 s latency.
MAX_IN_FLIGHT = 1024
START_IN_FLIGHT = 16
# A held in-flight limit is probed again after this long (tasks/engine/send/in_flight.py).
PROBE_AGAIN_S = 60.0
MIN_RPM = 1.0
WINDOW_S = 60.0
WINDOW_GUARD_S = 0.5
# How much lateness of the event loop the pacer makes up with earlier starts.
CATCH_UP_S = 1.0
RECOVERY_INTERVAL_S = 10.0
RECOVERY_STEP = 0.10
# With a declared --rpm, this many 429s within a minute are taken as jitter at the window's edge.
TOLERATED_429_PER_MINUTE = 1
# Paced requests: 429s up to this share of the requests sent in a window are noise (a busy server),
# not a sign that the rate is above the limit.
NOISE_SHARE = 0.2
# Tokens may arrive in bursts of at most this many seconds' worth of the TPM budget, so no
# 60-second window ever sees much more than the budget.
TPM_BURST_SECONDS = 6.0


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the provider allows this run: None means no client-side limit (or automatic)."""

    rpm: float | None = None
    tpm: float | None = None
    max_concurrency: int | None = None
    # The provider's rate window: "per minute" quotas are counted over a sliding 60 s. Tests shorten it
    # (with the emulator's window) so that a window's worth of requests takes a second.
    window_s: float = WINDOW_S

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be a positive number, got {value}")
        if self.window_s <= 0:
            raise ValueError(f"the rate window must be positive, got {self.window_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")

    @property
    def ceiling(self) -> int:
        return min(self.max_concurrency or MAX_IN_FLIGHT, MAX_IN_FLIGHT)


class SharedBudget(Protocol):
    """A budget other processes draw on too (tasks/engine/send/shared_limits.py): asked after this limiter."""

    async def take(self, requests: int, tokens: int, waiting: int = 1) -> None:
        """Wait for a permit; ``waiting``: requests queued here, this one included (sizes the block)."""

    def rate_factor(self, factor: float) -> None:
        """This limiter's rate is now ``factor`` of the declared one (a 429 cut it, or it recovers)."""

    @property
    def pace_share(self) -> float:
        """The share of the rate this process paces at: others held back by the same rate take theirs."""


@dataclass
class _BackOff:
    """The 429s of the last window and the rate cuts they made: when the rate last changed, when
    requests may start again after a cut."""

    last_change: float
    min_rpm_seen: float | None
    resume_at: float = 0.0
    recent_429s: deque[float] = field(default_factory=deque)
    rate_cuts: int = 0
    tolerated_429s: int = 0


class AdaptiveLimiter:
    """Paces requests under RPM and TPM, sizes the requests in flight, and backs off on 429s.

    ``shared``: a budget shared with other processes; each start also takes its permit there."""

    def __init__(self, limits: Limits, *, clock=time.monotonic, shared: SharedBudget | None = None) -> None:
        self.limits = limits
        self.shared = shared
        self._clock = clock
        self._rpm: float | None = limits.rpm
        self._next_start = 0.0
        self._turn = asyncio.Lock()
        self._queued = 0
        burst = TPM_BURST_SECONDS * limits.window_s / WINDOW_S
        self._tokens = TokenMeter(limits.tpm, limits.window_s, burst)
        probing = limits.rpm is None and limits.tpm is None and limits.ceiling > START_IN_FLIGHT
        self._in_flight = SlowStart(
            START_IN_FLIGHT if probing else limits.ceiling,
            limits.ceiling,
            probing=probing,
            again_s=PROBE_AGAIN_S * limits.window_s / WINDOW_S,
            now=clock(),
        )
        self._back_off = _BackOff(last_change=clock(), min_rpm_seen=limits.rpm)
        self._recent_starts: deque[float] = deque()
        self._times = RequestTimes(clock())

    @property
    def _window(self) -> float:
        return self.limits.window_s

    @property
    def _guard(self) -> float:
        # Arrival jitter is absolute (the network, a busy event loop), not a share of the window.
        return min(WINDOW_GUARD_S, self.limits.window_s * 0.05)

    @property
    def _catch_up(self) -> float:
        return CATCH_UP_S * self.limits.window_s / WINDOW_S

    @property
    def _gate(self) -> Gate:
        return self._in_flight.gate

    @property
    def current_rpm(self) -> float | None:
        return self._rpm

    @property
    def in_flight_limit(self) -> int:
        return self._gate.limit

    @property
    def starved(self) -> bool:
        """True when no request is waiting for its turn and the in-flight limit has room: the run
        needs more rows on hand (more chunks) to reach the rate."""
        return self._queued == 0 and self._gate.active < self._gate.limit

    @property
    def token_correction(self) -> float:
        """Reported / estimated tokens so far, applied to later estimates (clamped to 0.25–4)."""
        return self._tokens.correction

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[float]:
        """Wait for a free slot under every limit; yields the time the request started."""
        self._queued += 1
        try:
            await self._gate.acquire()
        except BaseException:
            self._queued -= 1
            raise
        try:
            try:
                tokens = round(estimated_tokens * self.token_correction)
                await self._wait_turn(tokens)
                await self._tokens.take(tokens)
            finally:
                self._queued -= 1
            started = self._clock()
            self._times.started(started)
            self._recent_starts.append(started)
            while self._recent_starts and self._recent_starts[0] < started - self._window - self._guard:
                self._recent_starts.popleft()
            try:
                yield started
            finally:
                self._times.ended()
        finally:
            self._gate.release()
        self._completed(started)

    async def _wait_turn(self, tokens: int) -> None:
        """Wait until the pause after a 429, the even spacing and the sliding window all allow a start.

        One request at a time waits here (the lock is first come, first served) and re-reads the
        rate after every sleep, so a change of rate applies to the very next start. The shared budget
        is asked within the turn too: requests that waited for it go one by one, paced, not together.
        """
        async with self._turn:
            while True:
                self._maybe_recover()
                now = self._clock()
                wait = self._back_off.resume_at - now
                if self._rpm is not None:
                    wait = max(wait, self._next_start - now, self._window_wait(now))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self._rpm is not None:
                # Spaced from the planned start, not from when the sleep ended: a busy event loop wakes
                # late, and the delays would add up to a slower rate. Up to CATCH_UP_S of lateness is
                # made up; later than that the run was idle (its start, a gap between chunks), and the
                # plan starts again from now rather than with a burst.
                share = self.shared.pace_share if self.shared is not None else 1.0
                interval = self._window / (self._rpm * share)
                late = now - self._next_start
                base = self._next_start if late <= self._catch_up else now
                self._next_start = base + interval
            if self.shared is not None:
                asked = self._clock()
                await self.shared.take(1, tokens, max(1, self._queued))
                if self._rpm is not None and self._clock() - asked > self._catch_up:
                    # A wait for the shared budget ends the catching up: the next start is paced from now.
                    self._next_start = max(self._next_start, self._clock() + interval)

    def _window_wait(self, now: float) -> float:
        """Seconds until one more start keeps the declared RPM within every guarded window."""
        declared = self.limits.rpm
        if declared is None or len(self._recent_starts) < declared:
            return 0.0
        oldest_that_counts = self._recent_starts[-math.floor(declared)]
        return oldest_that_counts + self._window + self._guard - now

    def _completed(self, started: float) -> None:
        now = self._clock()
        self._times.completed(now - started)
        self._in_flight.completed(now)

    def give_back(self, started: float) -> None:
        """Free the place in the pacing of a start that sent nothing (the run paused for a provider
        outage while it waited its turn), so the requests queued behind it don't wait for nothing.
        Tokens it took from the TPM bucket are not returned (a few seconds' worth at most)."""
        if self._rpm is not None:
            self._next_start -= self._window / self._rpm
        try:
            self._recent_starts.remove(started)
        except ValueError:
            pass

    async def settle_tokens(self, estimated: int, reported: int | None) -> None:
        """Charge the TPM budget for tokens the response reports beyond the estimate."""
        await self._tokens.settle(estimated, reported)

    def on_rate_limited(self, request_started: float, retry_after_s: float | None = None) -> bool:
        """Slow down after a 429. Returns True if this 429 cut the rate.

        Once requests are paced (a declared or a learned rate), 429s cut only when they are more than
        noise: more than ``TOLERATED_429_PER_MINUTE`` in a window and more than ``NOISE_SHARE`` of the
        requests sent in it. Servers also answer 429 when they are busy, whatever the client's rate; a
        cut for each of those would halve the rate again and again.
        """
        now, back_off = self._clock(), self._back_off
        back_off.recent_429s.append(now)
        while back_off.recent_429s[0] < now - self._window:
            back_off.recent_429s.popleft()
        if request_started < back_off.last_change and back_off.rate_cuts:
            return False
        if self._rpm is not None:
            sent = sum(1 for t in self._recent_starts if t >= now - self._window)
            count = len(back_off.recent_429s)
            if count <= TOLERATED_429_PER_MINUTE or count <= NOISE_SHARE * sent:
                back_off.tolerated_429s += 1
                return False
        if self._rpm is None:
            full = self._window
            window = max(full / 60, min(full, now - self._recent_starts[0])) if self._recent_starts else full
            observed = sum(1 for t in self._recent_starts if t >= now - window) * full / window
            new_rpm = max(MIN_RPM, observed / 2)
        else:
            new_rpm = max(MIN_RPM, self._rpm / 2)
        # From here on the pacer sets the rate; requests in flight follow it up to the ceiling.
        self._in_flight.paced()
        self._set_rpm(new_rpm, now)
        back_off.resume_at = max(back_off.resume_at, now + max(self._window / new_rpm, retry_after_s or 0.0))
        back_off.rate_cuts += 1
        back_off.recent_429s.clear()
        back_off.min_rpm_seen = new_rpm if back_off.min_rpm_seen is None else min(back_off.min_rpm_seen, new_rpm)
        return True

    def describe(self) -> dict[str, float | int | None]:
        return {
            "rpm": self.limits.rpm,
            "tpm": self.limits.tpm,
            "max_concurrency": self.limits.max_concurrency,
            "in_flight_ceiling": self.limits.ceiling,
            "in_flight_limit": self._gate.limit,
            **self._times.describe(),
            "tolerated_429s": self._back_off.tolerated_429s,
            "rate_cuts_after_429": self._back_off.rate_cuts,
            "lowest_rpm_after_429": self._back_off.min_rpm_seen if self._back_off.rate_cuts else None,
            "final_rpm": self._rpm,
            "token_correction": round(self.token_correction, 3),
        }

    def _maybe_recover(self) -> None:
        if self._rpm is None or not self._back_off.rate_cuts:
            return
        target = self.limits.rpm
        if target is not None and self._rpm >= target:
            return
        now = self._clock()
        if now - self._back_off.last_change < RECOVERY_INTERVAL_S * self._window / WINDOW_S:
            return
        step = RECOVERY_STEP * (target if target is not None else self._rpm)
        new_rpm = self._rpm + step
        self._set_rpm(min(new_rpm, target) if target is not None else new_rpm, now)

    def _set_rpm(self, rpm: float, now: float) -> None:
        self._rpm = rpm
        self._next_start = now
        self._back_off.last_change = now
        if self.shared is not None and self.limits.rpm:
            self.shared.rate_factor(min(1.0, rpm / self.limits.rpm))
