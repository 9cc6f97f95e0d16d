"""`gembatch transcribe`: transcribe each recording named in a table, or in a folder or glob."""

from __future__ import annotations

from typing import Any

from flows.common import run_flow
from flows.jobs import transcribe_job
from flows.params import CommonOptions
from flows.prefect_flow import flow
from tasks.defaults import DEFAULT_SEGMENT_FORMAT, DEFAULT_SEGMENT_S
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
    segment_s: float = DEFAULT_SEGMENT_S,
    segment_format: str = DEFAULT_SEGMENT_FORMAT,
    media_root: list[str] | None = None,
    allow_media_scheme: list[str] | None = None,
    allow_private_urls: bool = False,
    options: CommonOptions = CommonOptions(),
) -> dict[str, Any]:
    """Transcribe the recording in ``audio_col`` of every row of ``input`` (or every file of a folder or
    glob ``input``) into ``output``; long recordings go in segments of ``segment_s`` (docs/how-to/transcribe.md)."""
    job = transcribe_job(
        input=input, output=output, audio_col=audio_col, model=model, prompt=prompt, api=api,
        max_inline_bytes=max_inline_bytes, segment_s=segment_s, segment_format=segment_format, media_root=media_root,
        allow_media_scheme=allow_media_scheme, allow_private_urls=allow_private_urls, options=options,
    )  # fmt: skip
    return await run_flow(job)
