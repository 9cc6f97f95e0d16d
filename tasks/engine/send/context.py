"""What a run's sending shares: the retry policy, the counts, the run context, a chunk's report."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from tasks.engine.job import Job
from tasks.engine.send.budget import Budget
from tasks.engine.send.context_parts import ProgressSink, RunOutput, Stop, WorkOnHand
from tasks.engine.send.limits import AdaptiveLimiter
from tasks.engine.send.outage import OutageBreaker
from tasks.engine.send.timings import Timings
from tasks.errors import RunStopped
from tasks.provider.client import Connection
from tasks.provider.failures import Failure

RETRY_DELAY_ENV = "GEMBATCH_RETRY_DELAY_S"


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential back-off with jitter; the server's own delay (Retry-After, retryDelay) wins."""

    max_attempts: int = 8
    max_rate_limited_attempts: int = 30
    # A reply whose row part can't be used (invalid JSON, fails the schema) is asked once more.
    max_row_failure_attempts: int = 2
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The default policy; ``GEMBATCH_RETRY_DELAY_S`` scales its back-off (base delay in seconds,
        the cap 60 times it). For tests and developers who drive failures through the command line."""
        raw = os.environ.get(RETRY_DELAY_ENV, "").strip()
        if not raw:
            return cls()
        try:
            base = float(raw)
        except ValueError:
            raise ValueError(f"{RETRY_DELAY_ENV} must be a number of seconds, got {raw!r}") from None
        if base < 0:
            raise ValueError(f"{RETRY_DELAY_ENV} must be 0 or more, got {raw!r}")
        return cls(base_delay_s=base, max_delay_s=60 * base)

    def delay(self, attempt: int, failure: Failure) -> float:
        if failure.retry_after_s is not None:
            return min(failure.retry_after_s, 3600.0) + random.uniform(0, 1.0)
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return random.uniform(backoff / 2, backoff)

    def allows(self, attempts: int, failure: Failure) -> bool:
        limit = self.max_rate_limited_attempts if failure.kind == "rate_limited" else self.max_attempts
        return attempts < limit


@dataclass
class Tokens:
    """Tokens a provider counted: the run's own counts (RunStats), a batch run's, one batch's."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, prompt: int, completion: int, total: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.total_tokens += total

    def add_into(self, other: Tokens) -> None:
        """Add these counts into ``other`` (another tally, or the run's stats)."""
        other.prompt_tokens += self.prompt_tokens
        other.completion_tokens += self.completion_tokens
        other.total_tokens += self.total_tokens

    def as_dict(self) -> dict[str, int]:
        return {"prompt": self.prompt_tokens, "completion": self.completion_tokens, "total": self.total_tokens}


@dataclass
class RunStats(Tokens):
    """The run's counts, each a number the run metadata reports (the tokens are those of Tokens)."""

    input_rows: int = 0
    skipped_done: int = 0
    deduplicated: int = 0
    succeeded: int = 0
    failed: int = 0
    not_attempted: int = 0
    # Rows of ``failed`` recorded in _errors/ with retry "auto" (transient errors only).
    failed_retry_auto: int = 0
    requests: int = 0
    items_sent: int = 0
    retries: int = 0
    rate_limited: int = 0
    transient_errors: int = 0
    estimated_tokens: int = 0
    images: int = 0
    parts_written: list[str] = field(default_factory=list)
    error_parts_written: list[str] = field(default_factory=list)
    # Streamed replies: time to first token (tasks/jobs/chat.py).
    first_token: Timings = field(default_factory=Timings)
    # Rows answered by another model than the one asked for, by that model (the provider rerouted it).
    rerouted: dict[str, int] = field(default_factory=dict)

    def rows_accounted(self) -> int:
        return self.skipped_done + self.deduplicated + self.succeeded + self.failed + self.not_attempted


class RunContext:
    """Everything the chunks of one run share. A plain class on purpose: Prefect walks dataclass
    task parameters field by field, and this one holds (in its output) the done-key index."""

    def __init__(
        self,
        *,
        job: Job,
        conn: Connection,
        limiter: AdaptiveLimiter,
        output: RunOutput,
        run_id: str,
        retry: RetryPolicy | None = None,
        budget: Budget | None = None,
        outage: OutageBreaker | None = None,
    ) -> None:
        self.job = job
        self.conn = conn
        self.limiter = limiter
        self.output = output
        self.run_id = run_id
        self.retry = retry or RetryPolicy()
        self.budget: Budget | None = budget
        self.outage = outage or OutageBreaker()
        self.stats = RunStats()
        self.progress = ProgressSink()
        self.on_hand = WorkOnHand()
        self.stop = Stop()

    def request_stop(self, reason: RunStopped) -> None:
        """Stop the run (the first reason given is the one it reports), waking whoever waits for the provider."""
        self.stop.request(reason)
        self.outage.wake()

    def __repr__(self) -> str:
        return f"RunContext(run_id={self.run_id!r}, job={self.job.name!r})"


@dataclass
class ChunkReport:
    index: int
    rows: int
    written: int
    errors: int
    part: str | None = None  # the results part written, if any


REROUTED = "stopped: model rerouted"


def rerouted_stop(job: Job, served: str, output: str) -> RunStopped:
    return RunStopped(
        REROUTED,
        f"the provider answered requests for {job.model} with {served} (the reply's model says so): it "
        f"rerouted the model. No vector of {served} was written into {output}, which holds {job.model}'s. "
        f"To keep {job.model}, ask the provider; to move the output to the model that answers, rerun with "
        f"--model {served} --change-model (check the rows and cost with --dry-run first), or write it to "
        "another --output",
    )
