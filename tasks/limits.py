"""Client-side rate limiting: requests/minute, tokens/minute and requests in flight.

The rule after a 429 (also in the README): the request rate is halved at once (never below
``MIN_RPM``), at most once per burst of 429s — a 429 for a request sent before the last cut does not
cut again. After ``RECOVERY_INTERVAL_S`` seconds without a 429 the rate grows by ``RECOVERY_STEP`` of
the configured rate (or of the current rate when no ``--rpm`` was given), until it is back at
``--rpm``. Without ``--rpm`` there is no request limit until the first 429; the limiter then starts
from half the rate it observed over the last minute.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

__all__ = ["Limits", "AdaptiveLimiter"]

DEFAULT_MAX_CONCURRENCY = 16
MIN_RPM = 1.0
RECOVERY_INTERVAL_S = 10.0
RECOVERY_STEP = 0.10
# Tokens may arrive in bursts of at most this many seconds' worth of the TPM budget, so no
# 60-second window ever sees much more than the budget.
TPM_BURST_SECONDS = 6.0


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the provider allows this run: None means no client-side limit."""

    rpm: float | None = None
    tpm: float | None = None
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be a positive number, got {value}")
        if self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")


class AdaptiveLimiter:
    """Paces requests evenly under RPM and TPM and backs off on 429s.

    Requests are spaced ``60 / rpm`` seconds apart (a bucket of one request), so no 60-second window
    ever holds more than ``rpm`` requests: a larger burst would trip a sliding-window limit.
    """

    def __init__(self, limits: Limits, *, clock=time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._in_flight = asyncio.Semaphore(limits.max_concurrency)
        self._rpm: float | None = limits.rpm
        self._rpm_bucket = _pacer(limits.rpm)
        self._tpm_bucket = AsyncLimiter(limits.tpm * TPM_BURST_SECONDS / 60, TPM_BURST_SECONDS) if limits.tpm else None
        self._last_change = clock()
        self._resume_at = 0.0
        self._recent_starts: deque[float] = deque()
        self.rate_cuts = 0
        self.min_rpm_seen: float | None = limits.rpm
        self._reported_tokens = 0
        self._estimated_tokens = 0

    @property
    def current_rpm(self) -> float | None:
        return self._rpm

    @property
    def token_correction(self) -> float:
        """Reported / estimated tokens so far, applied to later estimates (clamped to 0.25–4)."""
        if self._estimated_tokens < 1000 or self._reported_tokens == 0:
            return 1.0
        return min(4.0, max(0.25, self._reported_tokens / self._estimated_tokens))

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[float]:
        """Wait for a free slot under every limit; yields the time the request started."""
        async with self._in_flight:
            self._maybe_recover()
            while True:
                pause = self._resume_at - self._clock()
                if pause > 0:
                    await asyncio.sleep(pause)
                    continue
                bucket = self._rpm_bucket
                if bucket is not None:
                    await bucket.acquire()
                    # The rate may have been cut while this request waited: wait again under the new one.
                    if bucket is not self._rpm_bucket or self._resume_at > self._clock():
                        continue
                break
            await self._take_tokens(round(estimated_tokens * self.token_correction))
            started = self._clock()
            self._recent_starts.append(started)
            while self._recent_starts and self._recent_starts[0] < started - 60:
                self._recent_starts.popleft()
            yield started

    async def settle_tokens(self, estimated: int, reported: int | None) -> None:
        """Charge the TPM budget for tokens the response reports beyond the estimate."""
        if not reported:
            return
        self._estimated_tokens += estimated
        self._reported_tokens += reported
        extra = reported - round(estimated * self.token_correction)
        if extra > 0:
            await self._take_tokens(extra)

    def on_rate_limited(self, request_started: float, retry_after_s: float | None = None) -> bool:
        """Slow down after a 429. Returns True if this 429 cut the rate.

        A cut also pauses every new request for one interval at the new rate, or for the server's
        retry delay if that is longer: a fresh bucket would otherwise let the next request straight
        through into the same exhausted window.
        """
        if request_started < self._last_change and self.rate_cuts:
            return False
        now = self._clock()
        if self._rpm is None:
            window = max(1.0, min(60.0, now - self._recent_starts[0])) if self._recent_starts else 60.0
            observed = len(self._recent_starts) * 60.0 / window
            new_rpm = max(MIN_RPM, observed / 2)
        else:
            new_rpm = max(MIN_RPM, self._rpm / 2)
        self._set_rpm(new_rpm, now)
        self._resume_at = max(self._resume_at, now + max(60.0 / new_rpm, retry_after_s or 0.0))
        self.rate_cuts += 1
        self.min_rpm_seen = new_rpm if self.min_rpm_seen is None else min(self.min_rpm_seen, new_rpm)
        return True

    def describe(self) -> dict[str, float | int | None]:
        return {
            "rpm": self.limits.rpm,
            "tpm": self.limits.tpm,
            "max_concurrency": self.limits.max_concurrency,
            "rate_cuts_after_429": self.rate_cuts,
            "lowest_rpm_after_429": self.min_rpm_seen if self.rate_cuts else None,
            "final_rpm": self._rpm,
            "token_correction": round(self.token_correction, 3),
        }

    def _maybe_recover(self) -> None:
        if self._rpm is None or not self.rate_cuts:
            return
        target = self.limits.rpm
        if target is not None and self._rpm >= target:
            return
        now = self._clock()
        if now - self._last_change < RECOVERY_INTERVAL_S:
            return
        step = RECOVERY_STEP * (target if target is not None else self._rpm)
        new_rpm = self._rpm + step
        self._set_rpm(min(new_rpm, target) if target is not None else new_rpm, now)

    def _set_rpm(self, rpm: float, now: float) -> None:
        self._rpm = rpm
        self._rpm_bucket = _pacer(rpm)
        self._last_change = now

    async def _take_tokens(self, amount: int) -> None:
        bucket = self._tpm_bucket
        if bucket is None or amount <= 0:
            return
        # A request larger than the bucket is charged in bucket-sized pieces.
        while amount > 0:
            piece = min(amount, bucket.max_rate)
            await bucket.acquire(piece)
            amount -= piece


def _pacer(rpm: float | None) -> AsyncLimiter | None:
    return AsyncLimiter(1, 60.0 / rpm) if rpm else None
