"""`gembatch transcribe`: transcribe the audio file named in each row."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from prefect import flow

from flows.common import run_flow_job
from flows.options import Output, job_command
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.media import base_dir_of
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.prices import default_model
from tasks.run import DEFAULT_CHUNK_SIZE
from tasks.transcribe import APIS, DEFAULT_TRANSCRIPTIONS_MODEL, MAX_INLINE_BYTES, TranscribeJob

__all__ = ["command", "transcribe_flow", "transcribe_job"]


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


def transcribe_job(parameters: dict[str, Any]) -> TranscribeJob:
    """The job for these flow parameters (fills in the default model for the chosen API)."""
    if not parameters.get("model"):
        api = parameters.get("api", "chat")
        parameters["model"] = (
            DEFAULT_TRANSCRIPTIONS_MODEL if api == "transcriptions" else default_model(parameters["provider"], "chat")
        )
    return TranscribeJob(
        model=parameters["model"],
        audio_col=parameters["audio_col"],
        prompt=parameters["prompt"],
        api=parameters["api"],
        max_inline_bytes=parameters["max_inline_bytes"],
        base_dir=base_dir_of(parameters["input"]),
    )


def _check_api(value: str) -> str:
    if value not in APIS:
        raise typer.BadParameter(f"use one of {', '.join(APIS)}")
    return value


@job_command(transcribe_flow, transcribe_job)
def command(
    input: Annotated[str, typer.Argument(help="Parquet or CSV file (local path or fsspec URL).")],
    output: Output,
    audio_col: Annotated[
        str,
        typer.Option("--audio-col", help="Column with audio paths or URLs (relative to the input's folder)."),
    ] = "audio",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model (default: gemini-2.5-flash; gpt-4o-mini for openai; whisper-1 for transcriptions).",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="Instruction (chat; default: verbatim) or style hint (transcriptions)."),
    ] = None,
    api: Annotated[
        str,
        typer.Option(
            "--api",
            callback=_check_api,
            help="chat (input_audio; Gemini) or transcriptions (OpenAI-style servers).",
        ),
    ] = "chat",
    max_inline_bytes: Annotated[
        int, typer.Option("--max-inline-bytes", help="Largest request payload per file (Gemini: 20 MB inline).")
    ] = MAX_INLINE_BYTES,
) -> None:
    """Transcribe an audio column: one transcript (and duration where known) per file."""
