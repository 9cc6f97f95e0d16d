"""`gembatch caption`: describe the image named in each row."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from prefect import flow

from flows.common import run_flow_job
from flows.options import Output, job_command
from tasks.caption import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_SIDE, CaptionJob
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.media import base_dir_of
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.prices import default_model
from tasks.run import DEFAULT_CHUNK_SIZE

__all__ = ["caption_flow", "caption_job", "command"]


@flow(name="gembatch-caption")
async def caption_flow(
    input: str,
    output: str,
    image_col: str = "image",
    prompt: str = DEFAULT_CAPTION_PROMPT,
    model: str | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
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
    """Caption the image in ``image_col`` of every row of ``input`` into ``output`` (see README: gembatch caption)."""
    parameters = dict(locals())
    return await run_flow_job(caption_job(parameters), parameters)


def caption_job(parameters: dict[str, Any]) -> CaptionJob:
    """The job for these flow parameters (fills in the provider's default chat model)."""
    parameters["model"] = parameters.get("model") or default_model(parameters["provider"], "chat")
    return CaptionJob(
        model=parameters["model"],
        image_col=parameters["image_col"],
        prompt=parameters["prompt"],
        max_side=parameters["max_side"],
        base_dir=base_dir_of(parameters["input"]),
    )


@job_command(caption_flow, caption_job)
def command(
    input: Annotated[str, typer.Argument(help="Parquet or CSV file (local path or fsspec URL).")],
    output: Output,
    image_col: Annotated[
        str,
        typer.Option("--image-col", help="Column with image paths or URLs (relative to the input's folder)."),
    ] = "image",
    prompt: Annotated[str, typer.Option("--prompt", help="What to ask about each image.")] = DEFAULT_CAPTION_PROMPT,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Chat model (default: gemini-2.5-flash; gpt-4o-mini for openai)."),
    ] = None,
    max_side: Annotated[
        int, typer.Option("--max-side", help="Downscale images whose longer side exceeds this many pixels.")
    ] = DEFAULT_MAX_SIDE,
) -> None:
    """Caption an image column: one short description per image."""
