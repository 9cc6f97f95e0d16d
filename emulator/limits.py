"""Rate limits like Gemini's: per-model sliding windows for rpm and tpm, a Pacific day for rpd."""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from collections.abc import Iterable

from emulator.config import EmulatorConfig
from emulator.errors import rate_limited


class Limiter:
    """Per-model sliding windows for rpm/tpm and a Pacific-midnight day for rpd, like Gemini."""

    def __init__(self) -> None:
        self.requests: dict[str, deque[float]] = {}
        self.tokens: dict[str, deque[tuple[float, int]]] = {}
        self.token_sums: dict[str, int] = {}
        self.day_counts: dict[str, int] = {}
        self.day: dt.date | None = None
        self.paces: dict[str, tuple[float, float]] = {}  # model: (requests left in the bucket, when)
        # When each admitted request arrived (all models): benchmarks check every window against the limit.
        self.admitted: deque[float] = deque(maxlen=1_000_000)

    def check(self, model: str, tokens: int, cfg: EmulatorConfig) -> None:
        now = time.monotonic()
        window = cfg.window_seconds
        reqs = self.requests.setdefault(model, deque())
        toks = self.tokens.setdefault(model, deque())
        while reqs and reqs[0] <= now - window:
            reqs.popleft()
        total = self.token_sums.get(model, 0)
        while toks and toks[0][0] <= now - window:
            total -= toks.popleft()[1]
        self.token_sums[model] = total

        today, until_midnight = _pacific_day()
        if self.day != today:
            self.day = today
            self.day_counts.clear()
        if cfg.rpd is not None and self.day_counts.get(model, 0) >= cfg.rpd:
            raise rate_limited("rpd", cfg.rpd, model, until_midnight)
        if cfg.rpm is not None and len(reqs) >= cfg.rpm:
            # The oldest request that must leave the window before one more fits.
            idx = len(reqs) - cfg.rpm
            delay = reqs[idx] + window - now if cfg.rpm > 0 else window
            raise rate_limited("rpm", cfg.rpm, model, delay)
        pace_left = None
        if cfg.rpm is not None and cfg.pace_seconds is not None:
            per_second = cfg.rpm / window
            size = max(1.0, per_second * cfg.pace_seconds)
            left, then = self.paces.get(model, (size, now))
            pace_left = min(size, left + (now - then) * per_second)
            if pace_left < 1.0:
                raise rate_limited("rpm", cfg.rpm, model, (1.0 - pace_left) / per_second)
        if cfg.tpm is not None and total + tokens > cfg.tpm:
            delay = window
            if tokens <= cfg.tpm:
                remaining = total
                for t, n in toks:
                    remaining -= n
                    if remaining + tokens <= cfg.tpm:
                        delay = t + window - now
                        break
            raise rate_limited("tpm", cfg.tpm, model, delay)

        if pace_left is not None:
            self.paces[model] = (pace_left - 1.0, now)
        reqs.append(now)
        self.admitted.append(now)
        toks.append((now, tokens))
        self.token_sums[model] = total + tokens
        self.day_counts[model] = self.day_counts.get(model, 0) + 1


def busiest_window(times: Iterable[float], window: float) -> int:
    """The most of ``times`` that fall within any one window of ``window`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _pacific_day() -> tuple[dt.date, float]:
    try:
        from zoneinfo import ZoneInfo

        tz: dt.tzinfo = ZoneInfo("America/Los_Angeles")
    except Exception:  # no tz database: a fixed offset is close enough for an emulator
        tz = dt.timezone(dt.timedelta(hours=-8))
    now = dt.datetime.now(tz)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=tz)
    return now.date(), (midnight - now).total_seconds()
