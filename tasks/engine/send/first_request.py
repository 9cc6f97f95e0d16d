"""A limiter whose first request goes alone: a request the provider refuses as a whole stops the run after one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tasks.engine.send.limits import AdaptiveLimiter

__all__ = ["FirstRequestAlone"]


class FirstRequestAlone:
    """The limiter, except that a run's first request goes alone and the others wait for its answer.

    For a job whose every request shares something the provider may refuse as a whole (extract's JSON
    schema): a refusal then stops the run after one request instead of a burst of them. Costs one
    round trip at the start. Everything else is the wrapped limiter's.
    """

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self._limiter = limiter
        self._leader_started = False
        self._answered = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._limiter, name)

    @property
    def starved(self) -> bool:
        # Requests waiting here are not queued in the limiter: it isn't short of rows, only waiting.
        return self._answered.is_set() and self._limiter.starved

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[float]:
        if self._answered.is_set() or self._leader_started:
            await self._answered.wait()
            async with self._limiter.slot(estimated_tokens) as started:
                yield started
            return
        self._leader_started = True
        try:
            async with self._limiter.slot(estimated_tokens) as started:
                yield started
        finally:
            self._answered.set()
