"""The settings of one run (the common command-line options, as the engine takes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.defaults import DEFAULT_CHUNK_SIZE
from tasks.engine.plan.claims import ClaimPolicy
from tasks.engine.plan.shard import Shard
from tasks.engine.send.batch.policy import BatchPolicy
from tasks.engine.send.context import RetryPolicy
from tasks.engine.send.limits import Limits
from tasks.engine.send.outage import OutagePolicy
from tasks.provider.client import ProviderSettings

__all__ = ["DEFAULT_CHUNKS_IN_FLIGHT", "RunOptions"]

DEFAULT_CHUNKS_IN_FLIGHT = 4


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Settings shared by every job (the common command-line options)."""

    input: str
    output: str
    id_col: str = "id"
    provider: ProviderSettings = field(default_factory=ProviderSettings)
    limits: Limits = field(default_factory=Limits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # When the provider is down (its max_outage_s is --max-outage): see tasks/engine/send/outage.py.
    outage: OutagePolicy = field(default_factory=OutagePolicy)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunks_in_flight: int = DEFAULT_CHUNKS_IN_FLIGHT
    limit: int | None = None
    retry_errors: bool = False
    progress: bool = False
    max_cost_usd: float | None = None
    force: bool = False
    # --change-model: this run moves the output to its model (see OutputStore.claim).
    change_model: bool = False
    dry_run: bool = False
    # A run whose failed rows are more than this share of its input (in %) is "completed with errors".
    max_failed_pct: float = 0.0
    # --mode live|batch|auto and the batch settings (tasks/engine/send/batch/policy.py).
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    # Only this part of the input (--shard I/N): other shards write into the same output at the same
    # time, so this run deletes and rewrites nothing (no compaction: the parent of the shards does it).
    shard: Shard | None = None
    # Claims on the output's chunks, so concurrent runs never send a row twice: see tasks/engine/plan/claims.py.
    claims: ClaimPolicy = field(default_factory=ClaimPolicy)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be at least 1, got {self.chunk_size}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be 0 or more, got {self.limit}")
        if not 0 <= self.max_failed_pct <= 100:
            raise ValueError(f"--max-failed-pct must be within 0-100, got {self.max_failed_pct}")
