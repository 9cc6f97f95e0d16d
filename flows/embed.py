"""`gembatch embed`: backfill embeddings for a corpus."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from prefect import flow

from flows.common import run_flow_job
from flows.options import Output, job_command
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.embed import MAX_INPUTS_PER_REQUEST, EmbedJob
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.prices import default_model
from tasks.run import DEFAULT_CHUNK_SIZE

__all__ = ["command", "embed_flow", "embed_job"]


@flow(name="gembatch-embed")
async def embed_flow(
    input: str,
    output: str,
    text_col: str = "text",
    model: str | None = None,
    dimensions: int | None = None,
    batch_size: int = MAX_INPUTS_PER_REQUEST,
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
    """Embed ``text_col`` of every row of ``input`` into ``output`` (see README: gembatch embed)."""
    parameters = dict(locals())
    return await run_flow_job(embed_job(parameters), parameters)


def embed_job(parameters: dict[str, Any]) -> EmbedJob:
    """The job for these flow parameters (fills in the provider's default model)."""
    parameters["model"] = parameters.get("model") or default_model(parameters["provider"], "embed")
    return EmbedJob(
        model=parameters["model"],
        text_col=parameters["text_col"],
        dimensions=parameters["dimensions"],
        batch_size=parameters["batch_size"],
    )


@job_command(embed_flow, embed_job)
def command(
    input: Annotated[str, typer.Argument(help="Parquet or CSV file (local path or fsspec URL).")],
    output: Output,
    text_col: Annotated[str, typer.Option("--text-col", help="Column with the text to embed.")] = "text",
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Embedding model (default: gemini-embedding-001; text-embedding-3-small for openai)."
        ),
    ] = None,  # noqa: E501
    dimensions: Annotated[int | None, typer.Option("--dimensions", help="Shorter vectors (normalised here).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per request (Gemini allows 100).")] = 100,
) -> None:
    """Embed a text column: one fixed-size float32 vector per row."""
