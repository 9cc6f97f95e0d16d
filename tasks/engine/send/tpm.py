"""The tokens-per-minute budget of one process: a token bucket, and the correction of estimated tokens."""

from __future__ import annotations

from aiolimiter import AsyncLimiter

__all__ = ["TokenMeter"]


class TokenMeter:
    """Tokens may arrive in bursts of at most ``burst_s`` seconds' worth of ``tpm`` (none without a TPM);
    the tokens replies report correct later estimates."""

    def __init__(self, tpm: float | None, window_s: float, burst_s: float) -> None:
        self.bucket = AsyncLimiter(tpm * burst_s / window_s, burst_s) if tpm else None
        self.reported = 0
        self.estimated = 0

    @property
    def correction(self) -> float:
        """Reported / estimated tokens so far, applied to later estimates (clamped to 0.25–4)."""
        if self.estimated < 1000 or self.reported == 0:
            return 1.0
        return min(4.0, max(0.25, self.reported / self.estimated))

    async def settle(self, estimated: int, reported: int | None) -> None:
        """Charge the budget for tokens the response reports beyond the estimate."""
        if not reported:
            return
        self.estimated += estimated
        self.reported += reported
        extra = reported - round(estimated * self.correction)
        if extra > 0:
            await self.take(extra)

    async def take(self, amount: int) -> None:
        bucket = self.bucket
        if bucket is None or amount <= 0:
            return
        # A request larger than the bucket is charged in bucket-sized pieces.
        while amount > 0:
            piece = min(amount, bucket.max_rate)
            await bucket.acquire(piece)
            amount -= piece
