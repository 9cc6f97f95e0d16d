"""A run's heartbeat: a thread that renews its claims while the run's event loop says it is alive."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Heartbeat"]

log = logging.getLogger("gembatch.claims")


class Heartbeat:
    """Calls ``renew`` every ``interval_s`` on its own thread, so a busy event loop can't starve it.

    The run's event loop says it is alive (:meth:`tick`); a loop stuck for ``lapse_s`` stops the
    renewals, so a hung run loses its claims like a dead one instead of holding them forever."""

    def __init__(self, renew: Callable[[], None], *, interval_s: float, lapse_s: float, name: str) -> None:
        self.renew = renew
        self.interval_s, self.lapse_s = interval_s, lapse_s
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticked = time.monotonic()
        self.ticking: Any = None  # the run's asyncio task that calls tick()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def tick(self) -> None:
        """The run is making progress (called from its event loop every heartbeat)."""
        self._ticked = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            if time.monotonic() - self._ticked > self.lapse_s:
                log.warning("this run's event loop has not answered for %.0f s: its claims lapse", self.lapse_s)
                continue
            self.renew()
