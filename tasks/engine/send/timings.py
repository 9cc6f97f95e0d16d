"""A run's latency figures (time to first token of streamed replies) in bounded memory."""

from __future__ import annotations

import random
from typing import Any

__all__ = ["Timings"]

MAX_SAMPLES = 10_000


class Timings:
    """Count, mean and max of every value; percentiles from a uniform reservoir of ``MAX_SAMPLES`` values
    (exact below that many), so a ten-million-row run keeps 80 KB, not 80 MB."""

    def __init__(self, *, max_samples: int = MAX_SAMPLES, seed: int = 0) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self._samples: list[float] = []
        self._max_samples = max_samples
        self._rng = random.Random(seed)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)
        if len(self._samples) < self._max_samples:
            self._samples.append(seconds)
        else:
            k = self._rng.randrange(self.count)
            if k < self._max_samples:
                self._samples[k] = seconds

    def percentile(self, p: float) -> float | None:
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    def describe(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return {
            "count": self.count,
            "mean_s": r(self.total / self.count) if self.count else None,
            "p50_s": r(self.percentile(50)),
            "p95_s": r(self.percentile(95)),
            "max_s": r(self.max) if self.count else None,
        }

    def __repr__(self) -> str:
        return f"Timings({self.describe()})"
