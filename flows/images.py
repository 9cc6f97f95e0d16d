"""`gembatch images`: generate PNG images from a column of prompts."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from prefect import flow

from flows.common import run_flow_job
from flows.options import Output, job_command
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.images import DEFAULT_SIZE, ImagesJob
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.prices import default_model
from tasks.run import DEFAULT_CHUNK_SIZE

__all__ = ["command", "images_flow", "images_job"]


@flow(name="gembatch-images")
async def images_flow(
    input: str,
    output: str,
    prompt_col: str = "prompt",
    model: str | None = None,
    size: str = DEFAULT_SIZE,
    n: int = 1,
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
    """Generate ``n`` images for ``prompt_col`` of every row of ``input`` into ``output``/images."""
    parameters = dict(locals())
    return await run_flow_job(images_job(parameters), parameters)


def images_job(parameters: dict[str, Any]) -> ImagesJob:
    """The job for these flow parameters (fills in the provider's default model)."""
    parameters["model"] = parameters.get("model") or default_model(parameters["provider"], "images")
    return ImagesJob(
        model=parameters["model"],
        output=parameters["output"],
        prompt_col=parameters["prompt_col"],
        size=parameters["size"],
        n=parameters["n"],
    )


@job_command(images_flow, images_job)
def command(
    input: Annotated[str, typer.Argument(help="Parquet or CSV file (local path or fsspec URL).")],
    output: Output,
    prompt_col: Annotated[str, typer.Option("--prompt-col", help="Column with the image prompt.")] = "prompt",
    model: Annotated[
        str | None,
        typer.Option("--model", help="Image model (default: gemini-2.5-flash-image; gpt-image-1 for openai)."),
    ] = None,
    size: Annotated[str, typer.Option("--size", help="Image size as WIDTHxHEIGHT.")] = DEFAULT_SIZE,
    n: Annotated[int, typer.Option("--n", help="Images per prompt (one output row each).")] = 1,
) -> None:
    """Generate images from a prompt column: PNGs in OUTPUT/images/, one row per image."""
