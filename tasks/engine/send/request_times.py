"""When a limiter's requests started and how long they took: the facts its run metadata reports."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

__all__ = ["RequestTimes"]


class RequestTimes:
    """The requests sending now (and the most at once), their mean latency, the first and last start."""

    def __init__(self, now: float) -> None:
        self.created = now
        self.created_wall = time.time()
        self.first_start: float | None = None
        self.last_start: float | None = None
        self.sending = 0
        self.peak_sending = 0
        self.latency_sum = 0.0
        self.latency_count = 0

    def started(self, started: float) -> None:
        if self.first_start is None:
            self.first_start = started
        self.last_start = started
        self.sending += 1
        self.peak_sending = max(self.peak_sending, self.sending)

    def ended(self) -> None:
        self.sending -= 1

    def completed(self, latency: float) -> None:
        self.latency_sum += latency
        self.latency_count += 1

    def describe(self) -> dict[str, Any]:
        return {
            "max_in_flight_seen": self.peak_sending,
            "mean_latency_s": round(self.latency_sum / self.latency_count, 3) if self.latency_count else None,
            # When the first and the last request started, in seconds after the limiter was made.
            "first_request_at_s": _since(self.first_start, self.created),
            "last_request_at_s": _since(self.last_start, self.created),
            # The same two moments on the wall clock (UTC), to line up the processes of one sharded run.
            "first_request_at": self._wall(self.first_start),
            "last_request_at": self._wall(self.last_start),
        }

    def _wall(self, moment: float | None) -> str | None:
        if moment is None:
            return None
        return dt.datetime.fromtimestamp(self.created_wall + moment - self.created, dt.UTC).isoformat()


def _since(moment: float | None, origin: float) -> float | None:
    return None if moment is None else round(moment - origin, 3)
