"""Telling "the provider is down" from "this row is bad": a circuit breaker over recent requests.

The rule (also in docs/explanation/outages.md):

- The breaker watches the outcome of every request: a success, or a *transient* failure (5xx, a
  timeout, a broken connection, a body that isn't JSON). 429s and 4xx answers are not counted: the
  server answered, and the limiter (429) or the row (400) deals with them.
- It opens when at least ``min_samples`` of the last ``window`` outcomes are known, at least
  ``open_share`` of them are transient failures, and those failures come from at least
  ``min_distinct`` different requests (a row that always gets a 500 is that row's problem).
- While open nothing is sent but one probe at a time, a real request of a waiting row, after 2 s,
  then 4, 8 … at most 60 s apart. A transient failure while the breaker is open (or of a request
  sent before it last closed) does not use up the row's attempts.
- The probe's success closes it; sending resumes at the limiter's pace, which the outage leaves
  unchanged.
- Open for longer than ``max_outage_s`` (``--max-outage``): the run stops with status
  ``stopped: provider unavailable``; finished rows are kept and a rerun resumes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from tasks.defaults import DEFAULT_MAX_OUTAGE_S
from tasks.errors import RunStopped

__all__ = ["DEFAULT_MAX_OUTAGE_S", "OutagePolicy", "OutageBreaker", "PROVIDER_UNAVAILABLE"]

PROVIDER_UNAVAILABLE = "stopped: provider unavailable"

log = logging.getLogger("gembatch.outage")


@dataclass(frozen=True, kw_only=True)
class OutagePolicy:
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S
    window: int = 20
    min_samples: int = 10
    open_share: float = 0.8
    min_distinct: int = 5
    first_probe_s: float = 2.0
    max_probe_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.max_outage_s > 0:
            raise ValueError(f"--max-outage must be a positive number of seconds, got {self.max_outage_s}")
        if not 0 < self.open_share <= 1:
            raise ValueError(f"open_share must be within (0, 1], got {self.open_share}")
        if self.min_samples < 1 or self.window < self.min_samples:
            raise ValueError("the outage window must hold at least min_samples (>= 1) outcomes")


@dataclass
class OutageFacts:
    """What the breaker saw in a run, for the run metadata."""

    outages: int = 0
    paused_s: float = 0.0
    longest_s: float = 0.0
    probes: int = 0
    failures_not_counted: int = 0


class OutageBreaker:
    """Held by the run context; every request asks :meth:`admit` before it is sent."""

    def __init__(self, policy: OutagePolicy | None = None, *, clock=time.monotonic) -> None:
        self.policy = policy or OutagePolicy()
        self._clock = clock
        self._recent: deque[tuple[bool, str]] = deque(maxlen=self.policy.window)
        self.opened_at: float | None = None
        self._closed_at = -math.inf
        self._interval = self.policy.first_probe_s
        self._next_probe_at = 0.0
        self._probe_out = False
        self._changed = asyncio.Event()
        self.gave_up = False
        self.facts = OutageFacts()

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    async def admit(self, stop: asyncio.Event) -> bool:
        """Wait while the breaker is open. True: the caller sends the probe (and must report its
        outcome). False: send normally — unless ``stop`` is set or :attr:`gave_up` (the caller checks)."""
        while self.opened_at is not None and not stop.is_set():
            now = self._clock()
            deadline = self.opened_at + self.policy.max_outage_s
            if now >= deadline:
                self.gave_up = True
                return False
            if not self._probe_out and now >= self._next_probe_at:
                self._probe_out = True
                self.facts.probes += 1
                return True
            wake = deadline if self._probe_out else min(self._next_probe_at, deadline)
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=max(0.0, wake - now))
            except TimeoutError:
                pass
        return False

    def holding(self, probe: bool) -> bool:
        """True when a request that passed :meth:`admit` must not go out after all: the breaker
        opened while it waited for its turn at the limiter."""
        return self.opened_at is not None and not probe

    def record_success(self, started: float, probe: bool, key: str) -> None:
        if probe:
            self._probe_out = False
        if self.opened_at is not None:
            if probe or started >= self.opened_at:
                self._close()
            return
        self._recent.append((True, key))

    def record_failure(self, kind: str, started: float, probe: bool, key: str) -> bool:
        """Record a failed request. True: the failure is the outage's, not the row's (don't use up
        an attempt; wait for the breaker instead of backing off)."""
        if kind != "transient":
            # The server answered (429, 4xx): no sign either way. A probe so answered lets the next go.
            if probe:
                self._probe_out = False
                self._next_probe_at = self._clock()
                self._notify()
            return False
        now = self._clock()
        if self.opened_at is not None:
            if probe:
                self._probe_out = False
                self._interval = min(self._interval * 2, self.policy.max_probe_s)
                self._next_probe_at = now + self._interval
                self._notify()
            self.facts.failures_not_counted += 1
            return True
        if started < self._closed_at:
            # Sent before the last outage ended: it tells nothing new and is not the row's fault.
            self.facts.failures_not_counted += 1
            return True
        self._recent.append((False, key))
        if self._should_open():
            self._open(now)
            self.facts.failures_not_counted += 1
            return True
        return False

    def wake(self) -> None:
        """Let every waiter look again (the run is stopping)."""
        self._notify()

    def stop(self) -> RunStopped:
        open_for = self._clock() - self.opened_at if self.opened_at is not None else self.facts.longest_s
        return RunStopped(
            PROVIDER_UNAVAILABLE,
            f"the provider answered only with transient errors (5xx, timeouts, broken connections) for "
            f"{open_for:.0f} s, longer than --max-outage {self.policy.max_outage_s:g}; meanwhile only one "
            f"probe at a time was sent ({self.facts.probes} in all). Finished rows are kept; rerun the same command "
            "when the provider is back: the rows not done are sent then.",
        )

    def describe(self) -> dict[str, Any]:
        current = self._clock() - self.opened_at if self.opened_at is not None else 0.0
        return {
            "outages": self.facts.outages,
            "paused_s": round(self.facts.paused_s + current, 3),
            "longest_s": round(max(self.facts.longest_s, current), 3),
            "probes": self.facts.probes,
            "failures_not_counted": self.facts.failures_not_counted,
            "open_at_end": self.opened_at is not None,
            "max_outage_s": self.policy.max_outage_s,
        }

    # -- internals --------------------------------------------------------------------------------
    def _should_open(self) -> bool:
        p = self.policy
        n = len(self._recent)
        failed = [key for ok, key in self._recent if not ok]
        return n >= p.min_samples and len(failed) >= p.open_share * n and len(set(failed)) >= p.min_distinct

    def _open(self, now: float) -> None:
        failed = sum(1 for ok, _ in self._recent if not ok)
        log.warning(
            "the provider looks down (%d of the last %d requests failed with 5xx/timeouts/broken connections): "
            "pausing; one probe at a time from %.0f s on",
            failed,
            len(self._recent),
            self.policy.first_probe_s,
        )
        self.opened_at = now
        self.facts.outages += 1
        self._interval = self.policy.first_probe_s
        self._next_probe_at = now + self._interval
        self._probe_out = False
        self._recent.clear()
        self._notify()

    def _close(self) -> None:
        now = self._clock()
        assert self.opened_at is not None
        lasted = now - self.opened_at
        log.warning("the provider answers again after %.1f s: resuming", lasted)
        self.facts.paused_s += lasted
        self.facts.longest_s = max(self.facts.longest_s, lasted)
        self.opened_at = None
        self._closed_at = now
        self._recent.clear()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
