"""`gembatch transcribe`: transcribe the audio file named in each row."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import run_flow_job
from flows.jobs import transcribe_job
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.run import DEFAULT_CHUNK_SIZE
from tasks.transcribe import MAX_INLINE_BYTES

__all__ = ["transcribe_flow", "transcribe_job"]


@flow(name="gembatch-transcribe")
async def transcribe_flow(
    input: str,
    output: str,
    audio_col: str = "audio",
    model: str | None = None,
    prompt: str | None = None,
    api: str = "chat",
    max_inline_bytes: int = MAX_INLINE_BYTES,
    id_col: str = "id",
    provider: str = "gemini",
    base_url: str | None = None,
    api_key_env: str | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
    max_concurrency: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    limit: int | None = None,
    retry_errors: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    dry_run: bool = False,
    max_cost_usd: float | None = None,
    force: bool = False,
    api_key_secret: str | None = None,
    max_outage: float = DEFAULT_MAX_OUTAGE_S,
    max_failed_pct: float = 0.0,
) -> dict[str, Any]:
    """Transcribe the audio in ``audio_col`` of every row of ``input`` into ``output`` (see README)."""
    parameters = dict(locals())
    return await run_flow_job(transcribe_job(parameters), parameters)
