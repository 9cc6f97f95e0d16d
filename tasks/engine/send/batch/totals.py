"""A batch run's counts: batches made and re-attached, lines answered, failed and unfinished, tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.engine.send.context import RunStats, Tokens


@dataclass
class BatchTotals:
    """What a batch run did, for the run metadata (see BatchRun.describe)."""

    created: int = 0
    reattached: int = 0
    lost: int = 0
    lines_submitted: int = 0
    lines_answered: int = 0
    lines_failed: int = 0
    lines_unfinished: int = 0
    live_rows: int = 0
    tokens: Tokens = field(default_factory=Tokens)

    def lines_ended(self) -> int:
        """Lines that came to an end: answered, failed, or in a batch the provider lost."""
        return self.lines_answered + self.lines_failed + self.lost


@dataclass
class LineTally:
    """What one batch's result files held: lines answered or failed, and the tokens they cost."""

    seen: set[str] = field(default_factory=set)
    answered: int = 0
    failed: int = 0
    tokens: Tokens = field(default_factory=Tokens)

    def add_into(self, totals: BatchTotals, stats: RunStats, lines: Any) -> int:
        """Count this batch into the run's totals and stats (``lines``: its LineRows); returns the lines
        that never ran."""
        self.tokens.add_into(stats)
        self.tokens.add_into(totals.tokens)
        stats.requests += len(self.seen)
        stats.items_sent += sum(len(lines.get(c)[0]) for c in self.seen)
        totals.lines_answered += self.answered
        totals.lines_failed += self.failed
        unfinished = len(lines) - len(self.seen)
        totals.lines_unfinished += unfinished
        return unfinished
