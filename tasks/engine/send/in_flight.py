"""How many requests are in flight: a resizable gate, and the slow start that sizes it without a rate.

Without ``--rpm`` or ``--tpm`` the requests in flight start at ``START_IN_FLIGHT`` and double while each
doubling still raises the completion rate by ``PROBE_GAIN``; once it stops helping the limit holds, and
it probes again a while later (see tasks/engine/send/limits.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

__all__ = ["Gate", "SlowStart"]

# A doubling of requests in flight must raise the completion rate by this much to count as needed.
PROBE_GAIN = 1.10


class Gate:
    """A semaphore whose size can change while tasks wait on it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.waiting = 0
        self.saturated = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        while self.active >= self.limit:
            self.saturated = True
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            self.waiting += 1
            try:
                await future
            finally:
                self.waiting -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.active
        while free > 0 and self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                free -= 1


class SlowStart:
    """The in-flight limit and how it is probed: doubled while that helps, then held.

    ``probing``: the limit starts low and is probed (no rate is declared); ``again_s``: how long a held
    limit stays before it is probed again."""

    def __init__(self, limit: int, ceiling: int, *, probing: bool, again_s: float, now: float) -> None:
        self.ceiling = ceiling
        self.again_s = again_s
        self.probing = probing
        self.gate = Gate(limit)
        self.probe = _Probe(self.gate.limit, now)

    def paced(self) -> None:
        """The pacer sets the rate from now on: requests in flight follow it up to the ceiling."""
        self.probing = self.probe.holding = False
        self.gate.resize(self.ceiling)

    def completed(self, now: float) -> None:
        """A request finished: every ``2 × limit`` completions, the rate decides the next limit."""
        if not self.probing and not self.probe.holding:
            return
        probe = self.probe
        probe.completions += 1
        if probe.completions < 2 * self.gate.limit:
            return
        rate = probe.completions / max(now - probe.since, 1e-6)
        saturated, self.gate.saturated = self.gate.saturated, False
        if probe.holding:
            if now - probe.held_at >= self.again_s and saturated:
                probe.holding = False
                self.probing = True
                probe.best_rate, probe.best_limit = rate, self.gate.limit
                self.gate.resize(min(self.ceiling, self.gate.limit * 2))
            probe.restart(now)
            return
        if not saturated:
            # The work on hand did not fill the limit: the measure says nothing about a larger one.
            probe.restart(now)
            return
        if rate >= probe.best_rate * PROBE_GAIN and self.gate.limit < self.ceiling:
            probe.best_rate, probe.best_limit = rate, self.gate.limit
            self.gate.resize(min(self.ceiling, self.gate.limit * 2))
        else:
            if rate < probe.best_rate:
                self.gate.resize(probe.best_limit)
            self.probing = False
            probe.holding, probe.held_at = True, now
        probe.restart(now)


@dataclass
class _Probe:
    """The slow start's measurements: completions since the last change of the in-flight limit."""

    best_limit: int
    since: float
    best_rate: float = 0.0
    completions: int = 0
    holding: bool = False
    held_at: float = 0.0

    def restart(self, now: float) -> None:
        self.completions, self.since = 0, now
