"""`gembatch transcribe`: transcribe the audio file named in each row."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import run_flow
from flows.jobs import transcribe_job
from flows.params import CommonOptions
from tasks.jobs.transcribe import MAX_INLINE_BYTES

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
    options: CommonOptions = CommonOptions(),
) -> dict[str, Any]:
    """Transcribe the audio in ``audio_col`` of every row of ``input`` into ``output`` (see README)."""
    return await run_flow(transcribe_job, locals())
