"""The shared limits' names and numbers: which Prefect limits a host and model use, and a rate in slots.

A rate per window becomes a global concurrency limit (the rate itself, in slots), a block (the slots
taken at once, about ``BLOCK_S`` seconds' worth) and a hold (how long a spent slot stays taken: the
window and the arrival jitter). How the slots are taken and let go is tasks/engine/send/shared_bucket.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SLOTS_PER_REQUEST", "RateSettings", "from_limit", "limit_names", "rate_settings", "senders_name"]

SLOTS_PER_REQUEST = 1
WINDOW_S = 60.0
# Arrival jitter at the provider (as the in-process limiter's guard): a slot is held this much longer.
GUARD_S = 0.5
# A block is about this many seconds' worth of the shared rate.
BLOCK_S = 1.0
# A lease lasts the hold and this margin (Prefect's shortest lease is 60 s); renewed when a slot is spent
# too close to its end.
LEASE_MARGIN_S = 5.0
MIN_LEASE_S = 60.0


def _clean(host: str, model: str) -> str:
    clean = f"{host}:{model}".replace("/", "_").replace("%", "_").replace("&", "_").replace("<", "_")
    return clean.replace(">", "_")


def limit_names(host: str, model: str) -> tuple[str, str]:
    """The RPM and TPM limits' names for a provider host and model."""
    clean = _clean(host, model)
    return f"gembatch-rpm:{clean}", f"gembatch-tpm:{clean}"


def senders_name(host: str, model: str) -> str:
    """The limit whose slots count the processes splitting the pace of a host and model."""
    return f"gembatch-senders:{_clean(host, model)}"


@dataclass(frozen=True)
class RateSettings:
    """A GCL's numbers for a per-window rate: the limit and the block in slots, how long slots are held."""

    per_window: float  # the declared rate (requests or tokens a window)
    unit: int  # slots per request (or per token)
    limit: int  # slots: what may be spent within any window
    block: int  # slots taken at once
    window_s: float = WINDOW_S

    @property
    def hold_s(self) -> float:
        """How long a spent slot stays taken: the window and the arrival jitter."""
        return self.window_s + guard_s(self.window_s)

    @property
    def lease_s(self) -> float:
        return max(MIN_LEASE_S, self.hold_s + LEASE_MARGIN_S)


def guard_s(window_s: float) -> float:
    return min(GUARD_S, window_s * 0.05)


def rate_settings(per_window: float, unit: int, *, window_s: float = WINDOW_S) -> RateSettings:
    """The GCL for ``per_window`` (requests or tokens a ``window_s``): the limit is the rate itself, a
    block about ``BLOCK_S`` seconds' worth of it (at most a quarter of the limit, so that several
    processes can hold blocks at once)."""
    limit = max(1, math.floor(per_window))
    block = max(1, min(math.ceil(per_window / window_s * BLOCK_S), limit // 4))
    return RateSettings(per_window, unit, limit * unit, block * unit, window_s)


def from_limit(limit: int, unit: int, *, window_s: float = WINDOW_S) -> RateSettings:
    """Settings read from an existing GCL (an operator's): its limit is the rate per window."""
    return rate_settings(limit // unit, unit, window_s=window_s)
