"""The batch options (``--mode``, ``--batch-*``), what a job needs to go as a batch, and how many files it makes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tasks.defaults import DEFAULT_AUTO_MIN_REQUESTS, DEFAULT_BATCH_POLL_S, MAX_BATCH_REQUESTS
from tasks.errors import ConfigError

MODES = ("live", "batch", "auto")
# OpenAI's documented caps per input file; Gemini's (2 GB a file) are larger. Bytes are kept lower on
# purpose: the OpenAI SDK sends a file in one request body.
MAX_LINES_PER_FILE = MAX_BATCH_REQUESTS
MAX_EMBEDDING_INPUTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 100 * 1024 * 1024
DEFAULT_POLL_S = DEFAULT_BATCH_POLL_S


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    """How a run uses the provider's batch API (the ``--mode`` and ``--batch-*`` options)."""

    mode: str = "live"
    poll_s: float = DEFAULT_POLL_S
    max_lines: int = MAX_LINES_PER_FILE
    max_inputs: int = MAX_EMBEDDING_INPUTS_PER_FILE
    max_bytes: int = MAX_BYTES_PER_FILE
    auto_min_requests: int = DEFAULT_AUTO_MIN_REQUESTS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.poll_s <= 0:
            raise ValueError(f"--batch-poll must be positive, got {self.poll_s}")
        if self.max_lines < 1:
            raise ValueError(f"--batch-max-requests must be at least 1, got {self.max_lines}")
        if self.auto_min_requests < 1:
            raise ValueError(f"--auto-min-requests must be at least 1, got {self.auto_min_requests}")


def check_batch_capable(job: Any, provider: str, base_url: str | None) -> None:
    """Refuse, before any work, a job whose route has no batch form at this provider."""
    if job.name == "images":
        raise ConfigError(
            "--mode batch/auto: image generation has no batch form here (Gemini's OpenAI-compatible batches "
            "take only /v1/chat/completions and /v1/embeddings); run images with --mode live"
        )
    if getattr(job, "api", "chat") == "transcriptions":
        raise ConfigError(
            "--mode batch/auto: audio/transcriptions has no batch form (batches take /v1/chat/completions and "
            "/v1/embeddings); use --api chat, or --mode live"
        )


def files_needed(requests: int, inputs: int, policy: BatchPolicy, embeddings: bool) -> int:
    """How many request files (batches) ``requests`` lines of ``inputs`` items make under the limits."""
    if requests == 0:
        return 0
    by_lines = math.ceil(requests / policy.max_lines)
    by_inputs = math.ceil(inputs / policy.max_inputs) if embeddings else 1
    return max(by_lines, by_inputs)
