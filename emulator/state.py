"""What a running emulator keeps between requests: stats, rate-limit windows, its random source, ids."""

from __future__ import annotations

import itertools
import random
import threading
from typing import Any

from emulator.config import ROUTES, EmulatorConfig
from emulator.limits import Limiter


def empty_stats() -> dict[str, Any]:
    return {
        "requests": 0,
        "by_route": dict.fromkeys(ROUTES, 0),
        "by_status": {},
        "embedding_inputs": 0,
        "faults": {},
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "thinking_tokens": 0,
        "images": 0,
        "connections": 0,
        "in_flight": 0,
        "max_in_flight": 0,
    }


class ServerState:
    """The emulator's counters and memory; the route handlers read and bump it."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.rng = random.Random(config.seed)
        self.models_503_left = config.models_503_first
        self.limiter = Limiter()
        self.ids = itertools.count(1)
        # Requests seen per route, for CannedAnswer.after.
        self.route_hits: dict[str, int] = {}
        # Images answered as URLs (default_image_response = "url"): name -> (bytes, mime type).
        self.images_served: dict[str, tuple[bytes, str]] = {}
        # Where this server listens, once it does.
        self.host = ""
        self.port: int | None = None
        self.lock = threading.Lock()
        self._stats = empty_stats()

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def bump(self, key: str, n: int = 1, sub: str | int | None = None) -> None:
        with self.lock:
            if sub is None:
                self._stats[key] += n
            else:
                bucket = self._stats[key]
                bucket[sub] = bucket.get(sub, 0) + n

    def enter(self) -> None:
        """A request starts its work: counted in flight."""
        with self.lock:
            self._stats["in_flight"] += 1
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._stats["in_flight"])

    def leave(self) -> None:
        with self.lock:
            self._stats["in_flight"] -= 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            snap = dict(self._stats)
            for key in ("by_route", "by_status", "faults"):
                snap[key] = dict(self._stats[key])
            return snap

    def reset_stats(self) -> None:
        with self.lock:
            in_flight = self._stats["in_flight"]
            self._stats = empty_stats()
            self._stats["in_flight"] = in_flight
